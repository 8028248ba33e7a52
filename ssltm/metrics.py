"""Evaluation metrics for video semantic segmentation: mIoU, FWIoU, mVC_n, TC, aAcc and mAcc.

The definitions follow the evaluation code the paper's VSPW numbers come from (VSPW's
``CVPR2021_VSPW_Implement``: ``VC_perclip.py``, ``TC_cal.py`` and its ``Evaluator``), so that
results can be compared with the paper's tables:

- **Confusion matrix** ``conf[g, p]``: number of pixels of ground-truth class ``g`` predicted as
  ``p`` (rows ground truth, columns prediction); pixels whose ground truth is ``ignore_index``
  are not counted.
- **IoU** of class ``k``: ``conf[k, k] / (row_k + col_k - conf[k, k])``.
- **mIoU**, ``mode="vspw"``: the mean IoU over the classes present in the ground truth
  (``row_k > 0``), as VSPW's ``Evaluator``; a class that is predicted but never in the ground
  truth does not count. ``mode="mmseg"``: the mean over the classes with a non-empty union, as
  mmsegmentation's ``nanmean``; such a class counts with IoU 0.
- **FWIoU** (the paper's "WIoU"): ``sum_k (row_k / total) * IoU_k`` over the classes present in
  the ground truth.
- **aAcc** and **mAcc** (mmsegmentation's ``IoUMetric``, ``total_area_to_metrics``): the overall
  pixel accuracy ``trace / total``, and the mean over the classes present in the ground truth of
  their accuracy ``conf[k, k] / row_k`` (mmsegmentation's ``nanmean`` of ``intersect / label area``
  leaves out the classes with no ground-truth pixel).
- **mVC_n**: see :func:`mvc`. **TC**: see :func:`tc` (``protocol="vspw"``, the default, is
  ``TC_cal.py``'s arithmetic; the flow is OpenCV DIS by default, VSPW's is RAFT: :class:`RaftFlow`).

Every metric is a fraction in [0, 1] returned as a Python ``float``; a metric with nothing to
average (no valid pixel, no window, no frame pair) is ``nan``. :func:`format_table` prints
percent with two decimals, as the paper's tables do.

:class:`VideoMetrics` accumulates everything for an evaluation loop that feeds predictions frame
by frame (or a few consecutive frames at a time), keeping only running sums and O(1) frames of
state.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .flow import FLOWS, RAFT_FLOW_UPDATES, FlowFn, RaftFlow, _to_numpy, dis_flow, load_raft, make_flow

__all__ = [
    "FLOWS",
    "RAFT_FLOW_UPDATES",
    "TC_PROTOCOLS",
    "RaftFlow",
    "VideoMetrics",
    "confusion_matrix",
    "dis_flow",
    "format_table",
    "fwiou",
    "load_raft",
    "make_flow",
    "mean_class_accuracy",
    "miou",
    "mvc",
    "per_class_iou",
    "pixel_accuracy",
    "tc",
    "tc_confusion",
]

# VSPW's mVC scripts skip every video of at most 16 frames (`if len(images) <= 16: continue`, for
# mVC8 as well as mVC16), so the default keeps only videos of 17 frames or more.
VSPW_MVC_MIN_FRAMES = 17

# cv2.remap and grid_sample work on float32 label maps; integers up to 2**24 are exact in float32.
_MAX_TC_CLASSES = 2**24

# How TC samples the warped prediction: "vspw" is TC_cal.py's arithmetic (the paper's numbers), "exact" the
# nearest pixel of p + f(p) with the points that left the frame not counted. See tc().
TC_PROTOCOLS = ("vspw", "exact")


def _labels(x, name: str) -> np.ndarray:
    arr = _to_numpy(x, name)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    return arr


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def _check_window(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"{name} must be an int >= 2 (a window of frames), got {n!r}")
    return int(n)


def _check_range(values: np.ndarray, num_classes: int, name: str) -> None:
    if values.size == 0:
        return
    lo, hi = values.min(), values.max()
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds label {int(bad)}, outside [0, num_classes={num_classes}) and not ignore_index")


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Count ground-truth / predicted class pairs.

    Args:
        pred: predicted labels, integer torch tensor or numpy array of any shape.
        gt: ground-truth labels, the same shape as ``pred``.
        num_classes: ``K``.
        ignore_index: pixels whose ``gt`` equals it are not counted (whatever ``pred`` holds there).

    Returns:
        int64 numpy array ``(K, K)``, ``conf[g, p]`` = number of counted pixels with ground truth
        ``g`` and prediction ``p``.

    Raises:
        ValueError: shapes differ, or a counted pixel of ``pred`` or ``gt`` is outside [0, K).
        TypeError: ``pred`` or ``gt`` is not an integer array.
    """
    k = _check_num_classes(num_classes)
    p = _labels(pred, "pred")
    g = _labels(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got pred {tuple(p.shape)} and gt {tuple(g.shape)}")
    counted = g != ignore_index
    g = g[counted].astype(np.int64)
    p = p[counted].astype(np.int64)
    _check_range(g, k, "gt")
    _check_range(p, k, "pred")
    return np.bincount(g * k + p, minlength=k * k).reshape(k, k)


def _conf(conf) -> np.ndarray:
    arr = _to_numpy(conf, "conf")
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"conf must be a square (K, K) matrix, got shape {tuple(arr.shape)}")
    if arr.size and arr.min() < 0:
        raise ValueError("conf must hold non-negative counts")
    return arr.astype(np.float64)


def per_class_iou(conf) -> np.ndarray:
    """IoU of every class.

    Args:
        conf: ``(K, K)`` confusion matrix (rows ground truth), torch or numpy.

    Returns:
        float64 numpy array ``(K,)``: ``conf[k, k] / (row_k + col_k - conf[k, k])``, ``nan`` where
        the union is empty (class neither in the ground truth nor predicted).
    """
    c = _conf(conf)
    inter = np.diag(c)
    union = c.sum(axis=1) + c.sum(axis=0) - inter
    iou = np.full(c.shape[0], np.nan)
    np.divide(inter, union, out=iou, where=union > 0)
    return iou


def miou(conf, mode: str = "vspw") -> float:
    """Mean IoU.

    Args:
        conf: ``(K, K)`` confusion matrix (rows ground truth), torch or numpy.
        mode: ``"vspw"``: mean over the classes present in the ground truth (row sum > 0), as
            VSPW's evaluation; ``"mmseg"``: mean over the classes with a non-empty union, so a
            class predicted but absent from the ground truth counts with IoU 0.

    Returns:
        The mean IoU in [0, 1], ``nan`` when no class qualifies (an empty confusion matrix).
    """
    if mode not in ("vspw", "mmseg"):
        raise ValueError(f"mode must be 'vspw' or 'mmseg', got {mode!r}")
    iou = per_class_iou(conf)
    keep = _conf(conf).sum(axis=1) > 0 if mode == "vspw" else ~np.isnan(iou)
    return float(iou[keep].mean()) if keep.any() else math.nan


def fwiou(conf) -> float:
    """Frequency-weighted IoU (the paper's "WIoU").

    Args:
        conf: ``(K, K)`` confusion matrix (rows ground truth), torch or numpy.

    Returns:
        ``sum_k (row_k / total) * IoU_k`` over the classes present in the ground truth, in [0, 1];
        ``nan`` for an empty confusion matrix.
    """
    c = _conf(conf)
    rows = c.sum(axis=1)
    total = rows.sum()
    if total == 0:
        return math.nan
    present = rows > 0
    return float((rows[present] / total * per_class_iou(c)[present]).sum())


def pixel_accuracy(conf) -> float:
    """Overall pixel accuracy (mmsegmentation's "aAcc").

    Args:
        conf: ``(K, K)`` confusion matrix (rows ground truth), torch or numpy.

    Returns:
        ``trace / total``: the fraction of the counted (non-ignored) pixels predicted as their ground truth;
        ``nan`` for an empty confusion matrix.
    """
    c = _conf(conf)
    total = c.sum()
    return float(np.trace(c) / total) if total > 0 else math.nan


def mean_class_accuracy(conf) -> float:
    """Mean class accuracy (mmsegmentation's "mAcc").

    Args:
        conf: ``(K, K)`` confusion matrix (rows ground truth), torch or numpy.

    Returns:
        The mean over the classes present in the ground truth (``row_k > 0``) of ``conf[k, k] / row_k``
        (the recall of class ``k``), as mmsegmentation's ``nanmean`` of ``intersect / label area``; a class
        only predicted does not count. ``nan`` for an empty confusion matrix.
    """
    c = _conf(conf)
    rows = c.sum(axis=1)
    present = rows > 0
    return float((np.diag(c)[present] / rows[present]).mean()) if present.any() else math.nan


class _ConsistencyTracker:
    """VSPW's video consistency of one video, streamed frame by frame for several window lengths.

    VSPW's ``get_common`` takes, for a window of n frames starting at ``i``, the pixels where
    ``gt[i] == gt[i + j]`` for all ``j`` in 1..n-1 and scores the fraction of them where
    ``pred[i] == pred[i + j]`` likewise. "All n labels equal" is "the run of equal labels ending at
    the window's last frame is at least n long", so a per-pixel run length (capped at the longest
    n) and the previous frame are all the state needed, whatever the video's length.
    """

    def __init__(self, lengths: Sequence[int], ignore_index: int | None):
        self.lengths = tuple(lengths)
        self.ignore_index = ignore_index
        self.frames = 0
        self.shape: tuple[int, ...] | None = None
        self.prev_pred = self.prev_gt = None
        self.pred_run = self.gt_run = None
        # Sum and count of the per-window ratios of this video; windows whose ground truth agrees
        # nowhere (ratio 0/0) are left out, as VSPW's final np.nanmean leaves out their nan.
        self.ratio_sum = dict.fromkeys(self.lengths, 0.0)
        self.windows = dict.fromkeys(self.lengths, 0)

    def push(self, pred: np.ndarray, gt: np.ndarray) -> None:
        if self.shape is None:
            self.shape = gt.shape
        elif gt.shape != self.shape:
            raise ValueError(f"all frames of a video must have one shape, got {gt.shape} after {self.shape}")
        if self.prev_gt is None:
            self.pred_run = np.ones(gt.shape, np.int16)
            self.gt_run = np.ones(gt.shape, np.int16)
        else:
            # VSPW loops `for i in range(len - n)`: the window ending at frame t - 1 counts only
            # once a frame t exists, so a video's last window is never scored. Score it now.
            for n in self.lengths:
                if self.frames >= n:
                    self._score(n)
            cap = max(self.lengths, default=1)
            self.pred_run = np.where(pred == self.prev_pred, np.minimum(self.pred_run + 1, cap), 1).astype(np.int16)
            self.gt_run = np.where(gt == self.prev_gt, np.minimum(self.gt_run + 1, cap), 1).astype(np.int16)
        # Copies: the caller may reuse its buffers, and a view would keep a whole batch of frames alive.
        self.prev_pred, self.prev_gt = pred.copy(), gt.copy()
        self.frames += 1

    def _score(self, n: int) -> None:
        gt_agree = self.gt_run >= n
        if self.ignore_index is not None:
            gt_agree &= self.prev_gt != self.ignore_index
        denom = np.count_nonzero(gt_agree)
        if denom:
            self.ratio_sum[n] += np.count_nonzero(gt_agree & (self.pred_run >= n)) / denom
            self.windows[n] += 1


def _frames_of(x, name: str) -> list[np.ndarray]:
    """A sequence of per-frame arrays (a list, or an array with frames on axis 0) as numpy arrays."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return list(_to_numpy(x, name))
    return [_to_numpy(item, name) for item in x]


def mvc(
    videos: Iterable[tuple[Sequence, Sequence]],
    n: int,
    min_frames: int = VSPW_MVC_MIN_FRAMES,
    ignore_index: int | None = None,
) -> float:
    """Mean video consistency mVC_n, VSPW's definition (``get_common`` in ``VC_perclip.py``).

    For each video of at least ``min_frames`` frames (VSPW: more than 16) and each window start
    ``i in range(len(video) - n)`` (VSPW's bound: the last possible window, starting at
    ``len - n``, is not scored), let ``A`` be the pixels where the ground-truth labels of frames
    ``i .. i+n-1`` are all equal, and ``B`` the pixels of ``A`` where the n predictions are also
    all equal to each other. The window scores ``|B| / |A|``, and is left out when ``A`` is empty.
    mVC_n is the mean of the window scores over all windows of all videos. The predictions are
    compared with each other only, not with the ground truth: a consistently wrong prediction is
    consistent.

    VSPW's script does not treat ignored pixels specially: a pixel whose ground truth stays at the
    ignore label counts in ``A`` like any class (the default, ``ignore_index=None``). Pass an
    ``ignore_index`` to leave such pixels out of ``A`` instead.

    Args:
        videos: iterable of ``(preds, gts)`` per video; each a sequence of ``(H, W)`` integer
            label maps (torch or numpy, or one ``(T, H, W)`` array), ``len(preds) == len(gts)``.
        n: window length (VSPW reports n = 8 and n = 16).
        min_frames: shorter videos are skipped.
        ignore_index: ``None`` for VSPW's behaviour, else the label excluded from ``A``.

    Returns:
        mVC_n in [0, 1]; ``nan`` if no window was scored.
    """
    n = _check_window(n, "n")
    ratio_sum, windows = 0.0, 0
    for index, (preds, gts) in enumerate(videos):
        preds, gts = _frames_of(preds, "preds"), _frames_of(gts, "gts")
        if len(preds) != len(gts):
            raise ValueError(f"video {index}: preds has {len(preds)} frames but gts has {len(gts)}")
        if len(gts) < min_frames:
            continue
        tracker = _ConsistencyTracker((n,), ignore_index)
        for pred, gt in zip(preds, gts, strict=True):
            pred, gt = _labels(pred, "preds"), _labels(gt, "gts")
            if pred.shape != gt.shape:
                raise ValueError(f"video {index}: preds frame shape {pred.shape} differs from gts {gt.shape}")
            tracker.push(pred, gt)
        ratio_sum += tracker.ratio_sum[n]
        windows += tracker.windows[n]
    return ratio_sum / windows if windows else math.nan


def _check_protocol(protocol) -> str:
    if protocol not in TC_PROTOCOLS:
        raise ValueError(f"protocol must be one of {TC_PROTOCOLS}, got {protocol!r}")
    return protocol


def _warp_exact(labels: np.ndarray, f: np.ndarray, h: int, w: int) -> np.ndarray:
    """``labels(round(p + f(p)))`` as float32, -1 where ``p + f(p)`` is outside the frame."""
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = xs + f[..., 0].astype(np.float32)
    map_y = ys + f[..., 1].astype(np.float32)
    return cv2.remap(
        labels.astype(np.float32), map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=-1
    )


def _warp_vspw(labels: np.ndarray, f: np.ndarray, h: int, w: int) -> np.ndarray:
    """TC_cal.py's ``flowwarp``: ``p + f(p)`` normalised by ``(W - 1, H - 1)`` to [-1, 1], then sampled by
    ``grid_sample`` (nearest, zero padding) with ``align_corners=False``, which reads the grid as if it
    had been normalised by ``(W, H)``: the pixel read is ``rint((x + f) * W / (W - 1) - 0.5)`` (and
    likewise in y), and class 0 where that is outside the frame. The same float32 operations in the
    same order, on the CPU and in float32 whatever autocast the caller runs under, so that rounding ties
    fall the same way."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    flow = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))
    gx = 2.0 * (xs + flow[..., 0]) / max(w - 1, 1) - 1.0
    gy = 2.0 * (ys + flow[..., 1]) / max(h - 1, 1) - 1.0
    source = torch.from_numpy(labels.astype(np.float32))[None, None]
    grid = torch.stack([gx, gy], dim=-1)[None]
    with torch.autocast("cpu", enabled=False):
        warped = F.grid_sample(source, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return warped[0, 0].numpy()


def _pair_confusion(
    pred_t,
    pred_t1,
    frame_t,
    frame_t1,
    num_classes: int,
    flow: FlowFn,
    ignore_index: int,
    protocol: str,
    name: str = "preds",
):
    """Confusion of ``pred_t`` (rows) against ``pred_t1`` warped back to frame t (columns)."""
    # Checked here, under the caller's argument name, since below the maps play gt and pred.
    for labels in (pred_t, pred_t1):
        _check_range(labels[labels != ignore_index], num_classes, name)
    f = _to_numpy(flow(frame_t, frame_t1), "flow")
    h, w = pred_t.shape
    if f.shape != (h, w, 2):
        raise ValueError(f"flow must return an (H, W, 2) = ({h}, {w}, 2) array, got shape {tuple(f.shape)}")
    reference = pred_t.astype(np.int64)
    if protocol == "exact":
        warped = _warp_exact(pred_t1, f, h, w)
        # Points that left the frame have no label to compare: not counted.
        lost = (warped < 0) | (warped == ignore_index)
    else:
        # Points that left the frame read class 0 and count, as in TC_cal.py.
        warped = _warp_vspw(pred_t1, f, h, w)
        lost = warped == ignore_index
    reference[lost] = ignore_index
    warped[lost] = 0
    return confusion_matrix(warped.astype(np.int64), reference, num_classes, ignore_index)


def _video_inputs(preds, frames) -> tuple[list[np.ndarray], list[np.ndarray]]:
    preds, frames = _frames_of(preds, "preds"), _frames_of(frames, "frames")
    if len(preds) != len(frames):
        raise ValueError(f"preds has {len(preds)} frames but frames has {len(frames)}")
    for pred, frame in zip(preds, frames, strict=True):
        if pred.ndim != 2:
            raise ValueError(f"preds must be (H, W) label maps, got shape {pred.shape}")
        if frame.shape[:2] != pred.shape:
            raise ValueError(f"frames must match preds in (H, W), got frames {frame.shape} and preds {pred.shape}")
    return [_labels(p, "preds") for p in preds], frames


def _check_tc_classes(num_classes) -> int:
    k = _check_num_classes(num_classes)
    if k > _MAX_TC_CLASSES:
        raise ValueError(f"num_classes must be at most {_MAX_TC_CLASSES} for TC, got {k}")
    return k


def tc_confusion(
    preds,
    frames,
    num_classes: int,
    flow: FlowFn | None = None,
    ignore_index: int = 255,
    protocol: str = "vspw",
) -> np.ndarray:
    """The confusion matrix behind :func:`tc`, summed over all consecutive frame pairs of a video.

    Summing these over several videos and taking :func:`miou` (``mode="vspw"``) gives the TC of
    those videos together, as :class:`VideoMetrics` does.

    Args: as :func:`tc`.

    Returns:
        int64 ``(K, K)``; rows: labels of ``preds[t]``, columns: ``preds[t + 1]`` warped to frame t.
    """
    k = _check_tc_classes(num_classes)
    protocol = _check_protocol(protocol)
    preds, frames = _video_inputs(preds, frames)
    flow = dis_flow if flow is None else flow
    total = np.zeros((k, k), np.int64)
    for t in range(len(preds) - 1):
        total += _pair_confusion(preds[t], preds[t + 1], frames[t], frames[t + 1], k, flow, ignore_index, protocol)
    return total


def tc(
    preds,
    frames,
    num_classes: int,
    flow: FlowFn | None = None,
    ignore_index: int = 255,
    protocol: str = "vspw",
) -> float:
    """Temporal consistency of one video, VSPW's definition (``TC_cal.py``, after ETC).

    For each consecutive pair (t, t+1): the flow ``f = flow(frames[t], frames[t+1])`` from frame t
    to frame t+1 (``frames[t](p)`` is seen at ``p + f(p)`` in ``frames[t+1]``) backward-warps
    ``preds[t+1]`` to frame t with nearest-neighbour sampling. The confusion of the warped map
    against ``preds[t]`` (as the ground truth) is summed over all pairs, and TC is its mIoU
    (``mode="vspw"``: over the classes present in ``preds[t]``). VSPW pools the pairs this way
    rather than averaging a per-pair mIoU. Where the sample is taken, per ``protocol``:

    - ``"vspw"`` (default; the paper's numbers): TC_cal.py's ``flowwarp``, bit for bit. It normalises
      ``p + f(p)`` by ``(W - 1, H - 1)`` but samples with ``grid_sample(..., align_corners=False)``,
      so the pixel read at ``p = (x, y)`` is ``rint((x + f_x) * W / (W - 1) - 0.5)`` (likewise in y,
      ties to even): up to half a pixel off ``p + f(p)``, towards the image's edges. Pixels whose
      sample falls outside the frame read class 0 (``grid_sample``'s zero padding) and count. With
      zero flow and an even ``W``, the last column reads outside, hence class 0 (the same for rows).
    - ``"exact"``: ``warped(p) = preds[t+1](round(p + f(p)))`` (``cv2.remap``, ``INTER_NEAREST``);
      pixels whose ``p + f(p)`` falls outside the frame are not counted. With the same flow its TC is
      usually a little higher than ``"vspw"``'s (no class-0 border, no half-pixel offset).

    VSPW computes the flow with RAFT (``raft-things``, 20 iterations): :class:`RaftFlow`. The default
    here, OpenCV DIS, needs no weights but is a different flow, so TC values differ from RAFT's.

    Args:
        preds: ``T`` integer label maps ``(H, W)`` (a sequence, or one ``(T, H, W)`` array).
        frames: the ``T`` images; ``(H, W)`` gray or ``(H, W, 3)`` RGB, uint8 for the built-in flows.
        num_classes: ``K``; predictions must be in [0, K) or ``ignore_index`` (not counted).
        flow: ``flow(frame_t, frame_t1) -> (H, W, 2)`` float flow from frame t to t+1 (x, y), given
            the frames as numpy arrays exactly as passed; default :func:`dis_flow` (OpenCV DIS,
            medium preset, on 8-bit gray frames); :class:`RaftFlow` or :func:`make_flow` for RAFT.
        ignore_index: label never counted, in ``preds[t]`` or in the warped ``preds[t+1]`` (VSPW's
            predictions hold none).
        protocol: ``"vspw"`` or ``"exact"``, see above.

    Returns:
        TC in [0, 1]; ``nan`` for fewer than two frames.
    """
    return miou(tc_confusion(preds, frames, num_classes, flow, ignore_index, protocol), mode="vspw")


class VideoMetrics:
    """Accumulates mIoU, FWIoU, mVC_n, TC, aAcc and mAcc over videos fed in temporal order.

    Feed every video's frames consecutively and in order, one frame at a time (``pred`` and ``gt``
    ``(H, W)``, ``frame`` one image) or a few consecutive frames at a time (``(T, H, W)``, ``frame``
    ``T`` images). A new ``video_id`` closes the previous video; feeding a closed video again is
    an error. State is bounded whatever the number of frames: the ``(K, K)`` confusion matrices,
    scalar sums, the ids of the closed videos, and for the current video only copies of its
    previous frame, prediction and ground truth plus two per-pixel run-length maps.

    mIoU, FWIoU, aAcc and mAcc pool all frames' pixels (all four come from one confusion matrix);
    mVC_n follows :func:`mvc` (videos of at least 17 frames, VSPW's rule; ignore pixels not treated
    specially); TC follows :func:`tc`, pooling the frame pairs of all TC videos into one confusion
    matrix, so it equals ``miou(sum of tc_confusion over those videos)``.

    A copy made by pickling (e.g. gathered from another process) leaves the flow function out: it
    can be merged and computed, not fed more frames for TC.

    Args:
        num_classes: ``K``.
        ignore_index: ground-truth label not counted in mIoU / FWIoU (and in TC, see :func:`tc`).
        mvc_lengths: the window lengths n of the mVC_n reported (keys ``"mVC{n}"``); may be empty.
        tc: compute TC; then every ``update`` of a TC video needs the frames.
        flow: flow function for TC, see :func:`tc`; default OpenCV DIS.
        miou_mode: ``"vspw"`` or ``"mmseg"``, see :func:`miou`.
        tc_protocol: ``"vspw"`` or ``"exact"``, see :func:`tc`.
        tc_video_ids: the ids of the videos TC is computed on (VSPW's script scores the first 100
            validation videos); ``None``: every video. The other videos need no frames.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        mvc_lengths: Sequence[int] = (8, 16),
        tc: bool = True,
        flow: FlowFn | None = None,
        miou_mode: str = "vspw",
        tc_protocol: str = "vspw",
        tc_video_ids: Collection | None = None,
    ):
        self.num_classes = _check_tc_classes(num_classes) if tc else _check_num_classes(num_classes)
        if miou_mode not in ("vspw", "mmseg"):
            raise ValueError(f"miou_mode must be 'vspw' or 'mmseg', got {miou_mode!r}")
        if tc_protocol not in TC_PROTOCOLS:
            raise ValueError(f"tc_protocol must be one of {TC_PROTOCOLS}, got {tc_protocol!r}")
        if isinstance(tc_video_ids, (str, bytes)):
            raise TypeError(f"tc_video_ids must be a collection of video ids or None, got the string {tc_video_ids!r}")
        lengths = tuple(_check_window(n, "mvc_lengths entries") for n in mvc_lengths)
        if len(set(lengths)) != len(lengths):
            raise ValueError(f"mvc_lengths must not repeat a length, got {mvc_lengths!r}")
        self.ignore_index = ignore_index
        self.mvc_lengths = lengths
        self.tc = tc
        self.flow = dis_flow if flow is None else flow
        self.miou_mode = miou_mode
        self.tc_protocol = tc_protocol
        self.tc_video_ids = None if tc_video_ids is None else frozenset(tc_video_ids)
        k = self.num_classes
        self.conf = np.zeros((k, k), np.int64)
        self.tc_conf = np.zeros((k, k), np.int64)
        self.mvc_sum = dict.fromkeys(self.mvc_lengths, 0.0)
        self.mvc_windows = dict.fromkeys(self.mvc_lengths, 0)
        self._closed: set = set()
        self._video = None
        self._tracker: _ConsistencyTracker | None = None
        self._prev_frame: np.ndarray | None = None

    def update(self, video_id, pred, gt, frame=None) -> None:
        """Add the next frame(s) of video ``video_id``.

        Args:
            video_id: any hashable naming the video.
            pred: integer labels, ``(H, W)`` for one frame or ``(T, H, W)`` for T consecutive frames.
            gt: ground truth of the same shape (``ignore_index`` where unlabelled).
            frame: the image(s), required when TC is computed on this video: ``(H, W)`` /
                ``(H, W, 3)`` for one frame, a leading ``T`` axis (or a length-T sequence) for T
                frames; uint8 for the built-in flows. Not used for the other videos.
        """
        p, g = _labels(pred, "pred"), _labels(gt, "gt")
        if p.shape != g.shape:
            raise ValueError(f"pred and gt must have the same shape, got pred {p.shape} and gt {g.shape}")
        if p.ndim not in (2, 3):
            raise ValueError(f"pred must be (H, W) or (T, H, W), got shape {p.shape}")
        if self.scores_tc(video_id):
            if frame is None:
                raise ValueError(f"frame is required when TC is computed (tc=True) on video {video_id!r}")
        else:
            frame = None
        if p.ndim == 2:
            p, g = p[None], g[None]
            frames = None if frame is None else [_to_numpy(frame, "frame")]
        else:
            frames = None if frame is None else _frames_of(frame, "frame")
        if frames is not None:
            if len(frames) != len(p):
                raise ValueError(f"frame holds {len(frames)} images for {len(p)} predictions")
            for f in frames:
                if f.shape[:2] != p.shape[1:]:
                    raise ValueError(f"frame must match pred in (H, W), got frame {f.shape} and pred {p.shape[1:]}")
        if video_id != self._video or self._tracker is None:
            self._start(video_id)
        elif p.shape[1:] != self._tracker.shape:
            raise ValueError(
                f"pred frames of video {video_id!r} changed shape: {p.shape[1:]} after {self._tracker.shape}"
            )
        for i in range(len(p)):
            self._add(p[i], g[i], None if frames is None else frames[i])

    def scores_tc(self, video_id) -> bool:
        """Whether TC is computed on video ``video_id``."""
        return self.tc and (self.tc_video_ids is None or video_id in self.tc_video_ids)

    def _start(self, video_id) -> None:
        if video_id in self._closed:
            raise ValueError(f"video_id {video_id!r} was already closed: feed each video's frames consecutively")
        self._close_current()
        self._video = video_id
        self._tracker = _ConsistencyTracker(self.mvc_lengths, None)
        self._prev_frame = None

    def _close_current(self) -> None:
        if self._tracker is None:
            return
        for n, (ratio_sum, windows) in self._video_mvc().items():
            self.mvc_sum[n] += ratio_sum
            self.mvc_windows[n] += windows
        self._closed.add(self._video)
        self._tracker = None

    def _video_mvc(self) -> dict[int, tuple[float, int]]:
        """The current video's mVC contributions: nothing while it is shorter than VSPW's minimum."""
        tr = self._tracker
        if tr is None or tr.frames < VSPW_MVC_MIN_FRAMES:
            return {}
        return {n: (tr.ratio_sum[n], tr.windows[n]) for n in self.mvc_lengths}

    def _add(self, pred: np.ndarray, gt: np.ndarray, frame: np.ndarray | None) -> None:
        # Everything that can raise runs before any state changes, so a bad frame leaves no trace.
        k, ign = self.num_classes, self.ignore_index
        conf = confusion_matrix(pred, gt, k, ign)
        prev_pred = self._tracker.prev_pred  # None at a video's first frame
        if frame is not None and prev_pred is not None:
            self.tc_conf += _pair_confusion(
                prev_pred, pred, self._prev_frame, frame, k, self.flow, ign, self.tc_protocol, "pred"
            )
        self.conf += conf
        self._tracker.push(pred, gt)
        if frame is not None:
            self._prev_frame = frame.copy()

    def merge(self, other: VideoMetrics) -> None:
        """Add the videos ``other`` was fed (e.g. on another process of a distributed evaluation) to these.

        ``other``'s current video is closed first; afterwards the results are those of one
        ``VideoMetrics`` fed all videos of both. Both must have the same settings and no video in common.
        """
        settings = ("num_classes", "ignore_index", "mvc_lengths", "tc", "miou_mode", "tc_protocol", "tc_video_ids")
        differ = [s for s in settings if getattr(self, s) != getattr(other, s)]
        if differ:
            raise ValueError(f"cannot merge VideoMetrics with different settings: {differ}")
        other._close_current()
        mine = self._closed | ({self._video} if self._tracker is not None else set())
        common = mine & other._closed
        if common:
            raise ValueError(f"cannot merge VideoMetrics that both hold video(s) {sorted(map(str, common))[:5]}")
        self.conf += other.conf
        self.tc_conf += other.tc_conf
        for n in self.mvc_lengths:
            self.mvc_sum[n] += other.mvc_sum[n]
            self.mvc_windows[n] += other.mvc_windows[n]
        self._closed |= other._closed

    def __getstate__(self) -> dict:
        # Merging and computing need no flow, and a RAFT flow would pickle its whole model.
        return {**self.__dict__, "flow": None}

    def compute(self) -> dict:
        """The metrics so far (the current video included; it stays open for more frames).

        Returns:
            ``{"mIoU", "FWIoU", "mVC{n}" for each n, "TC" (only when tc=True), "aAcc", "mAcc", "per_class"}``:
            floats in [0, 1] or ``nan``; ``"per_class"`` a list of K IoUs, ``nan`` for the
            classes the mIoU leaves out (absent from the ground truth for ``"vspw"``, empty union
            for ``"mmseg"``), so that mIoU is the mean of its non-nan entries.
        """
        out = {"mIoU": miou(self.conf, self.miou_mode), "FWIoU": fwiou(self.conf)}
        current = self._video_mvc()
        for n in self.mvc_lengths:
            ratio_sum, windows = current.get(n, (0.0, 0))
            ratio_sum += self.mvc_sum[n]
            windows += self.mvc_windows[n]
            out[f"mVC{n}"] = ratio_sum / windows if windows else math.nan
        if self.tc:
            out["TC"] = miou(self.tc_conf, "vspw")
        out["aAcc"] = pixel_accuracy(self.conf)
        out["mAcc"] = mean_class_accuracy(self.conf)
        iou = per_class_iou(self.conf)
        if self.miou_mode == "vspw":
            iou[self.conf.sum(axis=1) == 0] = np.nan
        out["per_class"] = [float(v) for v in iou]
        return out


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def format_table(results: dict, class_names: Sequence[str] | None = None) -> str:
    """A Markdown table of :meth:`VideoMetrics.compute`'s results, in percent with two decimals.

    The summary row holds mIoU, FWIoU (the paper's "WIoU"), TC and the mVC_n present, in the
    paper's column order, then aAcc and mAcc when present; ``nan`` prints as ``n/a``. With
    ``class_names`` (one per entry of ``results["per_class"]``) a per-class IoU table follows.
    """
    mvc_keys = sorted((k for k in results if k.startswith("mVC") and k[3:].isdigit()), key=lambda k: int(k[3:]))
    accuracies = [k for k in ("aAcc", "mAcc") if k in results]
    keys = [k for k in ("mIoU", "FWIoU", "TC") if k in results] + mvc_keys + accuracies
    values = [_percent(results[k]) for k in keys]
    widths = [max(len(a), len(b)) for a, b in zip(keys, values, strict=True)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(keys, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths, strict=True)) + " |",
    ]
    if class_names is not None:
        per_class = results.get("per_class")
        if per_class is None or len(class_names) != len(per_class):
            got = "no per_class" if per_class is None else f"{len(per_class)} per_class entries"
            raise ValueError(f"class_names must name every per_class entry: {len(class_names)} names, {got}")
        width = max([len("class"), *(len(str(c)) for c in class_names)])
        lines += ["", f"| {'class'.ljust(width)} | IoU    |", f"|{'-' * (width + 2)}|--------|"]
        for name, value in zip(class_names, per_class, strict=True):
            lines.append(f"| {str(name).ljust(width)} | {_percent(value).rjust(6)} |")
    return "\n".join(lines)
