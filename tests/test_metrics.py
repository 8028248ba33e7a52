"""ssltm.metrics against hand-computed values and a direct transliteration of VSPW's definitions."""

import math
import pickle
import re

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.optical_flow import raft_small

from ssltm.metrics import (
    RAFT_FLOW_UPDATES,
    RaftFlow,
    VideoMetrics,
    confusion_matrix,
    dis_flow,
    format_table,
    fwiou,
    load_raft,
    make_flow,
    mean_class_accuracy,
    miou,
    mvc,
    per_class_iou,
    pixel_accuracy,
    tc,
    tc_confusion,
)


def constant_flow(dx, dy=0.0):
    """A flow function moving every pixel by (dx, dy) from frame t to frame t+1."""

    def flow(frame_t, frame_t1):
        h, w = frame_t.shape[:2]
        return np.dstack([np.full((h, w), dx, np.float32), np.full((h, w), dy, np.float32)])

    return flow


def textured_frames(width, height=64, shift=5, seed=0):
    """Two uint8 gray frames; the content of the first appears ``shift`` px further right in the second."""
    rng = np.random.default_rng(seed)
    noise = rng.random((height, width + shift)).astype(np.float32)
    tex = cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 1.5), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return tex[:, shift:].copy(), tex[:, :width].copy()


def correlated_video(rng, t, h=6, w=7, k=4, p_change=0.1):
    """(t, h, w) int64 labels where each pixel keeps its label from frame to frame with probability 1 - p_change."""
    frames = [rng.integers(0, k, (h, w))]
    for _ in range(t - 1):
        change = rng.random((h, w)) < p_change
        frames.append(np.where(change, rng.integers(0, k, (h, w)), frames[-1]))
    return np.stack(frames)


def vspw_mvc_reference(videos, n, min_frames=17):
    """VSPW's get_common loop written out literally: window starts range(len - n), nanmean over all windows."""
    ratios = []
    for preds, gts in videos:
        if len(gts) < min_frames:
            continue
        for i in range(len(gts) - n):
            gt_agree = np.all([gts[i] == gts[i + j] for j in range(1, n)], axis=0)
            pred_agree = np.all([preds[i] == preds[i + j] for j in range(1, n)], axis=0)
            ratios.append((gt_agree & pred_agree).sum() / gt_agree.sum() if gt_agree.sum() else math.nan)
    ratios = np.array(ratios)
    return float(np.nanmean(ratios)) if np.any(~np.isnan(ratios)) else math.nan


# --- confusion matrix, IoU, mIoU, FWIoU ------------------------------------------------------------


def test_confusion_matrix_rows_gt_cols_pred_and_ignore():
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [2, 200, 2]])  # 200 sits on an ignored pixel: not counted, not an error
    conf = confusion_matrix(pred, gt, 3)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 1, 1], [0, 0, 1]])


def test_confusion_matrix_accepts_torch_and_any_shape():
    gt = torch.tensor([[[0, 1], [1, 1]]], dtype=torch.uint8)
    pred = torch.tensor([[[0, 1], [0, 1]]])
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 2), [[1, 0], [1, 2]])


def test_confusion_matrix_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"pred \(2, 3\).*gt \(3, 2\)"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 2)
    with pytest.raises(ValueError, match="pred holds label 5"):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="pred holds label -1"):
        confusion_matrix(np.array([-1, 0]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="gt holds label 2"):
        confusion_matrix(np.array([0, 1]), np.array([0, 2]), 2)
    with pytest.raises(TypeError, match="pred must hold integer"):
        confusion_matrix(np.array([0.0, 1.0]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(np.array([0]), np.array([0]), 0)


def test_iou_absent_class_and_predicted_but_never_in_gt():
    # class 2 is predicted once but never in the ground truth; class 3 appears nowhere.
    conf = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1]), 4)
    iou = per_class_iou(conf)
    np.testing.assert_allclose(iou[:3], [1.0, 0.5, 0.0])
    assert math.isnan(iou[3])
    assert miou(conf) == pytest.approx(0.75)  # VSPW: classes 0 and 1 (present in the ground truth)
    assert miou(conf, mode="mmseg") == pytest.approx(0.5)  # mmseg: classes 0, 1, 2 (non-empty union)
    assert fwiou(conf) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    assert isinstance(miou(conf), float) and isinstance(fwiou(conf), float)


def test_fwiou_weights_by_ground_truth_frequency():
    # gt: 6 px of class 0 (5 right), 2 px of class 1 (1 right, 1 -> class 0).
    conf = np.array([[5, 1], [1, 1]])
    iou0, iou1 = 5 / 7, 1 / 3
    assert fwiou(conf) == pytest.approx(6 / 8 * iou0 + 2 / 8 * iou1)
    assert miou(torch.from_numpy(conf)) == pytest.approx((iou0 + iou1) / 2)


def test_pixel_and_mean_class_accuracy_by_hand():
    # rows ground truth: class 0 has 4 px (3 right), class 1 has 2 px (0 right), class 2 none but is predicted
    # once, class 3 appears nowhere. Ignored pixels (255) count in neither.
    gt = np.array([0, 0, 0, 0, 1, 1, 255, 255])
    pred = np.array([0, 0, 0, 2, 0, 0, 1, 3])
    conf = confusion_matrix(pred, gt, 4)
    np.testing.assert_array_equal(conf, [[3, 0, 1, 0], [2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert pixel_accuracy(conf) == pytest.approx(3 / 6)
    # mmsegmentation: nanmean of intersect / label area, over the classes in the ground truth (0 and 1)
    assert mean_class_accuracy(conf) == pytest.approx((3 / 4 + 0 / 2) / 2)
    # a class only predicted (2) changes neither
    assert mean_class_accuracy(np.array([[3, 0, 0], [0, 1, 1], [0, 0, 0]])) == pytest.approx((1 + 0.5) / 2)
    empty = np.zeros((3, 3), np.int64)
    assert math.isnan(pixel_accuracy(empty)) and math.isnan(mean_class_accuracy(empty))
    assert isinstance(pixel_accuracy(torch.from_numpy(conf)), float)
    with pytest.raises(ValueError, match=r"conf must be a square.*\(2, 3\)"):
        mean_class_accuracy(np.zeros((2, 3)))


def test_video_metrics_accuracies_merge_like_one_pass():
    rng = np.random.default_rng(7)
    k = 5
    videos = [(rng.integers(0, k, (3, 6, 7)), rng.integers(0, k, (3, 6, 7))) for _ in range(3)]
    for _, gt in videos:
        gt[gt == 4] = 255  # some ignored pixels; class 4 is predicted but never in the ground truth
    whole, first, second = (VideoMetrics(k, tc=False) for _ in range(3))
    for v, (pred, gt) in enumerate(videos):
        whole.update(v, pred, gt)
        (first if v < 2 else second).update(v, pred, gt)
    first.merge(pickle.loads(pickle.dumps(second)))
    conf = sum(confusion_matrix(p, g, k) for p, g in videos)
    for metrics in (whole, first):
        out = metrics.compute()
        assert out["aAcc"] == pytest.approx(np.trace(conf) / conf.sum())
        assert out["mAcc"] == pytest.approx(np.mean([conf[c, c] / conf[c].sum() for c in range(4)]))
    assert 0 < whole.compute()["aAcc"] < 1


def test_empty_confusion_is_nan():
    conf = confusion_matrix(np.array([1, 2]), np.array([255, 255]), 3)
    assert conf.sum() == 0
    assert math.isnan(miou(conf)) and math.isnan(miou(conf, mode="mmseg")) and math.isnan(fwiou(conf))
    assert np.isnan(per_class_iou(conf)).all()


def test_iou_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        miou(np.eye(2), mode="mean")
    with pytest.raises(ValueError, match=r"conf must be a square.*\(2, 3\)"):
        per_class_iou(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="conf must hold non-negative"):
        fwiou(np.array([[1, -1], [0, 1]]))


# --- mVC ----------------------------------------------------------------------------------------------

# Four frames of a 1x3 video (hand-computed below).
HAND_GTS = np.array([[[0, 1, 2]], [[0, 1, 1]], [[0, 1, 1]], [[0, 0, 1]]])
HAND_PREDS = np.array([[[0, 1, 2]], [[0, 2, 2]], [[0, 2, 1]], [[1, 1, 1]]])


def test_mvc_hand_computed_with_vspw_loop_bounds():
    # n = 2, windows start at range(4 - 2) = {0, 1}; the last window (frames 2-3, score 1) is not scored.
    #   i=0: gt agrees at px 0, 1; preds agree at px 0 of those -> 1/2
    #   i=1: gt agrees at px 0, 1, 2; preds agree at px 0, 1 -> 2/3
    assert mvc([(HAND_PREDS, HAND_GTS)], 2, min_frames=1) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # n = 3: one window (i=0): gt agrees at px 0, 1; preds only at px 0 -> 1/2
    assert mvc([(list(HAND_PREDS), list(HAND_GTS))], 3, min_frames=1) == pytest.approx(0.5)
    # predictions are compared with each other only: wrong but constant predictions are consistent
    assert mvc([(np.full_like(HAND_GTS, 3), HAND_GTS)], 2, min_frames=1) == pytest.approx(1.0)


def test_mvc_means_over_windows_of_all_videos_and_drops_empty_windows():
    # video 2: three frames, n = 2 -> one scored window (i=0): gt agrees at px 0 only, preds disagree there -> 0
    gts2 = np.array([[[5, 1, 2]], [[5, 2, 1]], [[9, 9, 9]]])
    preds2 = np.array([[[0, 0, 0]], [[1, 0, 0]], [[0, 0, 0]]])
    # video 3: gt agrees nowhere -> its window is 0/0 and left out (VSPW's nanmean)
    gts3 = np.array([[[0, 1, 2]], [[1, 2, 0]], [[2, 0, 1]]])
    videos = [(HAND_PREDS, HAND_GTS), (preds2, gts2), (gts3, gts3)]
    # mean over the 3 scored windows, not the mean of per-video means ((7/12 + 0) / 2)
    assert mvc(videos, 2, min_frames=1) == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert math.isnan(mvc([(gts3, gts3)], 2, min_frames=1))


def test_mvc_ignore_pixels_count_by_default_and_can_be_excluded():
    gts = HAND_GTS.copy()
    gts[:, 0, 0] = 255  # pixel 0 is unlabelled in every frame
    # VSPW's script compares raw labels: a pixel that stays 255 counts like any class -> unchanged 7/12
    assert mvc([(HAND_PREDS, gts)], 2, min_frames=1) == pytest.approx(7 / 12)
    # excluded: i=0: A = {px 1}, preds disagree -> 0; i=1: A = {px 1, 2}, preds agree at px 1 -> 1/2
    assert mvc([(HAND_PREDS, gts)], 2, min_frames=1, ignore_index=255) == pytest.approx(0.25)


def test_mvc_skips_videos_of_16_frames_or_fewer_for_every_n():
    gts16 = np.zeros((16, 2, 2), np.int64)
    flicker16 = np.arange(16)[:, None, None] % 2 * np.ones((1, 2, 2), np.int64)  # never consistent
    gts17 = np.zeros((17, 2, 2), np.int64)
    assert math.isnan(mvc([(flicker16, gts16)], 8))  # 16 frames: skipped although 16 - 8 windows exist
    assert mvc([(flicker16, gts16), (gts17, gts17)], 8) == pytest.approx(1.0)
    assert mvc([(flicker16, gts16)], 8, min_frames=16) == pytest.approx(0.0)
    assert mvc([(gts17, gts17)], 16) == pytest.approx(1.0)  # 17 frames: one window for n = 16


def test_mvc_matches_literal_vspw_loop_on_random_videos():
    rng = np.random.default_rng(1)
    videos = []
    for t in (17, 20, 25, 12):
        gts = correlated_video(rng, t, p_change=0.03)
        preds = np.where(rng.random(gts.shape) < 0.02, rng.integers(0, 4, gts.shape), gts)
        videos.append((preds, gts))
    for n in (2, 8, 16):
        expected = vspw_mvc_reference(videos, n)
        assert not math.isnan(expected)
        assert mvc(videos, n) == pytest.approx(expected, rel=1e-12)


def test_mvc_bad_arguments():
    with pytest.raises(ValueError, match="n must be an int >= 2"):
        mvc([(HAND_PREDS, HAND_GTS)], 1)
    with pytest.raises(ValueError, match="preds has 3 frames but gts has 4"):
        mvc([(HAND_PREDS[:3], HAND_GTS)], 2, min_frames=1)
    with pytest.raises(ValueError, match="preds frame shape"):
        mvc([(HAND_PREDS[:, :, :2], HAND_GTS)], 2, min_frames=1)


# --- TC -----------------------------------------------------------------------------------------------


def test_tc_hand_computed_with_pluggable_flow():
    frames = np.zeros((2, 1, 4), np.uint8)  # ignored by the pluggable flow
    preds = np.array([[[0, 0, 1, 1]], [[0, 1, 1, 1]]])
    # exact, zero flow: preds[1] against preds[0]: IoU0 = 1/2, IoU1 = 2/3
    assert tc(preds, frames, 2, flow=constant_flow(0), protocol="exact") == pytest.approx((1 / 2 + 2 / 3) / 2)
    # exact, flow +1: warped(x) = preds[1](x + 1) = [1, 1, 1, out]; x = 3 left the frame and is not counted
    #   against preds[0][:3] = [0, 0, 1]: IoU0 = 0, IoU1 = 1/3
    assert tc(preds, frames, 2, flow=constant_flow(1), protocol="exact") == pytest.approx(1 / 6)
    # vspw, zero flow: x reads rint(x * 4/3 - 0.5) = 0, 1, 2, 4 (3.5 ties to even): the last pixel reads
    #   outside, class 0: warped = [0, 1, 1, 0] against [0, 0, 1, 1]: IoU0 = IoU1 = 1/3
    assert tc(preds, frames, 2, flow=constant_flow(0)) == pytest.approx(1 / 3)
    # vspw, flow +1: rint((x + 1) * 4/3 - 0.5) = 1, 2, 4, 5: warped = [1, 1, 0, 0]: no pixel agrees
    assert tc(preds, frames, 2, flow=constant_flow(1), protocol="vspw") == 0.0


def test_tc_pools_the_pairs_of_a_video():
    frames = np.zeros((3, 1, 4), np.uint8)
    preds = np.array([[[0, 0, 1, 1]], [[0, 1, 1, 1]], [[0, 1, 1, 1]]])
    conf = tc_confusion(preds, frames, 2, flow=constant_flow(0), protocol="exact")
    np.testing.assert_array_equal(conf, [[2, 1], [0, 5]])
    # mIoU of the pooled confusion (2/3, 5/6), not the mean of the per-pair mIoUs ((7/12 + 1) / 2)
    assert tc(preds, frames, 2, flow=constant_flow(0), protocol="exact") == pytest.approx((2 / 3 + 5 / 6) / 2)
    assert math.isnan(tc(preds[:1], frames[:1], 2, flow=constant_flow(0)))


def test_dis_flow_and_tc_on_a_5px_shift():
    width = 96
    frame0, frame1 = textured_frames(width)  # content moves 5 px to the right from frame 0 to frame 1
    flow = dis_flow(frame0, frame1)
    assert flow.shape == (64, width, 2) and flow.dtype == np.float32
    assert np.median(flow[..., 0]) == pytest.approx(5.0, abs=0.1)
    assert np.median(np.abs(flow[..., 1])) < 0.1
    stripes = (np.arange(width + 5) // 16 % 4)[None].repeat(64, axis=0)
    preds = [stripes[:, 5:], stripes[:, :width]]  # the labels move with the content
    assert tc(preds, [frame0, frame1], 4, protocol="exact") > 0.99
    rgb = [np.dstack([f] * 3) for f in (frame0, frame1)]
    assert tc([torch.from_numpy(p) for p in preds], rgb, 4, protocol="exact") > 0.99
    # the exact flow gives exactly 1; the opposite direction (-5) does not
    assert tc(preds, [frame0, frame1], 4, flow=constant_flow(5), protocol="exact") == pytest.approx(1.0)
    assert tc(preds, [frame0, frame1], 4, flow=constant_flow(-5), protocol="exact") < 0.6
    # VSPW's sampling reads class 0 where the moved points leave the frame
    assert 0.8 < tc(preds, [frame0, frame1], 4, flow=constant_flow(5)) < 0.99


def test_tc_bad_arguments():
    preds = np.zeros((2, 3, 4), np.int64)
    frames = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(ValueError, match=r"flow must return an \(H, W, 2\)"):
        tc(preds, frames, 2, flow=lambda a, b: np.zeros((3, 4)))
    with pytest.raises(TypeError, match="frame_t must be uint8"):
        tc(preds, frames.astype(np.float32), 2)
    with pytest.raises(ValueError, match="preds has 2 frames but frames has 1"):
        tc(preds, frames[:1], 2)
    with pytest.raises(ValueError, match="frames must match preds"):
        tc(preds, np.zeros((2, 5, 4), np.uint8), 2)
    with pytest.raises(ValueError, match="preds holds label 7"):
        tc(np.full((2, 3, 4), 7), frames, 2, flow=constant_flow(0))
    for fn in (tc, tc_confusion):
        with pytest.raises(ValueError, match=r"protocol must be one of \('vspw', 'exact'\), got 'etc'"):
            fn(preds, frames, 2, flow=constant_flow(0), protocol="etc")


def vspw_tc_reference(preds, flows, k):
    """TC_cal.py's confusion matrix, transcribed from its arithmetic in float64: the grid ``p + f`` normalised by
    (W - 1, H - 1) and read by ``grid_sample(mode="nearest", align_corners=False)``, i.e. at
    ``rint((x + f) * W / (W - 1) - 0.5)`` (ties to even), class 0 outside the frame (zero padding); the
    Evaluator counts every pixel whose preds[t] is in [0, k) against the warped preds[t + 1]."""
    total = np.zeros((k, k), np.int64)
    for t in range(len(preds) - 1):
        h, w = preds[t].shape
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
        ix = np.rint((xs + flows[t][..., 0]) * w / (w - 1) - 0.5).astype(np.int64)
        iy = np.rint((ys + flows[t][..., 1]) * h / (h - 1) - 0.5).astype(np.int64)
        inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        warped = np.zeros((h, w), np.int64)
        warped[inside] = preds[t + 1][iy[inside], ix[inside]]
        gt = preds[t]
        counted = (gt >= 0) & (gt < k)
        total += np.bincount(k * gt[counted] + warped[counted], minlength=k * k).reshape(k, k)
    return total


def flows_by_frame(flows):
    """A flow function returning ``flows[t]`` for the pair (t, t+1): frame t is an image filled with t."""
    return lambda frame_t, frame_t1: flows[int(frame_t[0, 0])]


def away_from_ties(flows):
    """Sub-pixel flows moved by 0.01 px where the sample (x + f) * W / (W - 1) - 0.5 is within 1e-3 of a
    rounding tie, where float32 and float64 arithmetic could round to different pixels."""
    out = []
    for f in flows:
        f = f.copy()
        h, w = f.shape[:2]
        for axis, size in ((0, w), (1, h)):
            grid = np.mgrid[0:h, 0:w][1 - axis].astype(np.float64)
            sample = (grid + f[..., axis]) * size / (size - 1) - 0.5
            near = np.abs(sample - np.floor(sample) - 0.5) < 1e-3
            f[..., axis][near] += np.float32(0.01)
            sample = (grid + f[..., axis]) * size / (size - 1) - 0.5
            assert (np.abs(sample - np.floor(sample) - 0.5) >= 1e-3).all()
        out.append(f)
    return out


@pytest.mark.parametrize("h,w", [(6, 8), (7, 9), (5, 12)])
@pytest.mark.parametrize("kind", ["zero", "integer", "subpixel"])
def test_tc_vspw_matches_tc_cal_arithmetic(h, w, kind):
    rng = np.random.default_rng([h, w, len(kind)])
    k, t = 5, 4
    preds = rng.integers(0, k, (t, h, w))
    frames = np.stack([np.full((h, w), i, np.uint8) for i in range(t)])
    if kind == "zero":
        flows = [np.zeros((h, w, 2), np.float32)] * (t - 1)
    elif kind == "integer":
        flows = [rng.integers(-3, 4, (h, w, 2)).astype(np.float32) for _ in range(t - 1)]
    else:
        flows = away_from_ties([rng.uniform(-3, 3, (h, w, 2)).astype(np.float32) for _ in range(t - 1)])
    expected = vspw_tc_reference(preds, flows, k)
    got = tc_confusion(preds, frames, k, flow=flows_by_frame(flows), protocol="vspw")
    np.testing.assert_array_equal(got, expected)
    assert got.sum() == (t - 1) * h * w  # VSPW counts every pixel, those read from outside as class 0
    assert tc(preds, frames, k, flow=flows_by_frame(flows)) == pytest.approx(miou(expected))
    exact = tc_confusion(preds, frames, k, flow=flows_by_frame(flows), protocol="exact")
    # With zero flow VSPW's sampling is the identity when W and H are odd (the last pixel, at W - 0.5, ties
    # down to W - 1); when one is even its last column or row reads outside, class 0.
    identity = kind == "zero" and h % 2 == 1 and w % 2 == 1
    assert np.array_equal(exact, expected) == identity


def test_tc_exact_is_100_on_an_integer_shift():
    rng = np.random.default_rng(7)
    h, w, t, (dx, dy) = 9, 11, 4, (2, -1)
    canvas = rng.integers(0, 4, (h + 2 * t, w + 2 * t))
    ys, xs = np.mgrid[0:h, 0:w]
    # frame i shows the canvas moved by i * (dx, dy): the label at p in frame i is at p + (dx, dy) in frame i + 1
    preds = np.stack([canvas[ys - i * dy + t, xs - i * dx + t] for i in range(t)])
    np.testing.assert_array_equal(preds[1][: h + dy, dx:], preds[0][-dy:, : w - dx])
    frames = np.zeros((t, h, w), np.uint8)
    assert tc(preds, frames, 4, flow=constant_flow(dx, dy), protocol="exact") == 1.0
    assert tc(preds, frames, 4, flow=constant_flow(dx, dy)) < 0.95  # VSPW: class 0 where points leave the frame


class FakeRaft(nn.Module):
    """Records RAFT's inputs and returns, as the final flow, each padded pixel's own (x, y) coordinates."""

    def forward(self, image1, image2, num_flow_updates=12):
        self.inputs = (image1, image2, num_flow_updates)
        ys, xs = torch.meshgrid(torch.arange(image1.shape[2]), torch.arange(image1.shape[3]), indexing="ij")
        return [torch.zeros(1, 2, *xs.shape), torch.stack([xs, ys]).float()[None]]


def test_raft_flow_scales_pads_and_crops():
    fake = FakeRaft()
    h, w = 133, 141  # padded to 136 x 144: rows 1 above and 2 below, columns 1 left and 2 right
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb[0, 0], rgb[1, 1] = 0, 255
    gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
    out = RaftFlow(fake, num_flow_updates=3)(rgb, gray)
    assert out.shape == (h, w, 2) and out.dtype == np.float32
    ys, xs = np.mgrid[0:h, 0:w]
    np.testing.assert_array_equal(out[..., 0], xs + 1)  # the padded frame's pixel (x + 1, y + 1) is (x, y)
    np.testing.assert_array_equal(out[..., 1], ys + 1)
    image1, image2, updates = fake.inputs
    assert updates == 3 and image1.shape == image2.shape == (1, 3, 136, 144)
    # [-1, 1] as Raft_Large_Weights.transforms(); gray repeated to 3 channels
    scaled = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(image1[0, :, 1 : 1 + h, 1 : 1 + w], scaled, atol=1e-6, rtol=0)
    assert image1.min() == -1.0 and image1.max() == 1.0
    assert torch.equal(image2[0, 0], image2[0, 1]) and torch.equal(image2[0, 0], image2[0, 2])
    # edge pixels repeated into the padding
    assert torch.equal(image1[0, :, 0], image1[0, :, 1]) and torch.equal(image1[0, :, -1], image1[0, :, -3])
    assert torch.equal(image1[0, :, :, 0], image1[0, :, :, 1]) and torch.equal(image1[0, :, :, -1], image1[0, :, :, -3])
    assert RaftFlow(fake).num_flow_updates == RAFT_FLOW_UPDATES == 20


def test_raft_from_a_local_file(raft_file):
    model = load_raft(raft_file)
    assert not model.training
    saved = torch.load(raft_file, weights_only=True)
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    flow = make_flow("raft", raft_file)
    assert isinstance(flow, RaftFlow) and flow.num_flow_updates == 20
    frame0, frame1 = textured_frames(60, height=44)  # padded to 128 x 128, the least torchvision's RAFT takes
    # one refinement step keeps this test fast (seconds on a CPU); evaluation uses RAFT_FLOW_UPDATES
    out = RaftFlow(model, num_flow_updates=1)(frame0, frame1)
    assert out.shape == (44, 60, 2) and out.dtype == np.float32 and np.isfinite(out).all()


def test_raft_and_flow_errors(tmp_path):
    missing = tmp_path / "raft.pth"
    for load in (load_raft, lambda p: make_flow("raft", p)):
        with pytest.raises(FileNotFoundError, match=f"RAFT weights not found: no file at {re.escape(str(missing))}"):
            load(missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"RAFT weights {re.escape(str(garbage))} are not a torch state dict"):
        load_raft(garbage)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match="are not a state dict"):
        load_raft(tensor)
    small = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None, progress=False).state_dict(), small)
    with pytest.raises(ValueError, match=f"{re.escape(str(small))} are not a state dict of torchvision's raft_large: "):
        load_raft(small)
    with pytest.raises(ValueError, match=r"flow must be one of \('dis', 'raft'\), got 'farneback'"):
        make_flow("farneback")
    with pytest.raises(ValueError, match="flow 'raft' needs raft_weights"):
        make_flow("raft")
    assert make_flow("dis") is dis_flow
    with pytest.raises(ValueError, match="num_flow_updates must be a positive int"):
        RaftFlow(FakeRaft(), num_flow_updates=0)


# --- VideoMetrics -------------------------------------------------------------------------------------


def random_dataset(rng, lengths=(20, 12, 18), k=4, h=6, w=7):
    videos = []
    for t in lengths:
        gts = correlated_video(rng, t, h, w, k, p_change=0.02)
        gts[:, 0, :2] = 255  # some unlabelled pixels
        preds = np.where(rng.random(gts.shape) < 0.1, rng.integers(0, k, gts.shape), np.where(gts == 255, 0, gts))
        frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
        videos.append((preds, gts, frames))
    return videos


def state_nbytes(obj, seen=None):
    """Bytes of all numpy arrays reachable from obj's attributes (a proxy for the accumulator's memory)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(state_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(state_nbytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return state_nbytes(vars(obj), seen)
    return 0


def test_video_metrics_equals_one_shot_functions():
    rng = np.random.default_rng(2)
    k = 4
    videos = random_dataset(rng)

    def flow(frame_t, frame_t1):  # depends on the frames, so that it sees whether they are the right ones
        dx = 1.0 if frame_t.mean() > frame_t1.mean() else -1.0
        return constant_flow(dx, -1.0)(frame_t, frame_t1)

    metrics = VideoMetrics(k, flow=flow)
    for vid, (preds, gts, frames) in enumerate(videos):
        if vid == 0:  # frame by frame, from buffers the caller reuses
            pred_buf, gt_buf, frame_buf = (
                torch.zeros(preds.shape[1:], dtype=torch.int64),
                gts[0].copy(),
                frames[0].copy(),
            )
            for p, g, f in zip(preds, gts, frames, strict=True):
                pred_buf.copy_(torch.from_numpy(p))
                gt_buf[...], frame_buf[...] = g, f
                metrics.update(f"v{vid}", pred_buf, gt_buf, frame_buf)
        else:  # consecutive chunks of frames
            for start in range(0, len(preds), 5):
                sl = slice(start, start + 5)
                metrics.update(f"v{vid}", preds[sl], gts[sl], frames[sl])
    out = metrics.compute()

    conf = sum(confusion_matrix(p, g, k) for p, g, _ in videos)
    assert out["mIoU"] == pytest.approx(miou(conf))
    assert out["FWIoU"] == pytest.approx(fwiou(conf))
    for n in (8, 16):
        expected = mvc([(p, g) for p, g, _ in videos], n)
        assert expected == pytest.approx(vspw_mvc_reference([(p, g) for p, g, _ in videos], n))
        assert out[f"mVC{n}"] == pytest.approx(expected)
    tc_conf = sum(tc_confusion(p, f, k, flow=flow) for p, _, f in videos)
    assert out["TC"] == pytest.approx(miou(tc_conf))
    assert 0.0 < out["TC"] < 1.0 and 0.0 < out["mIoU"] < 1.0
    assert out["per_class"] == pytest.approx(list(per_class_iou(conf)))
    assert set(out) == {"mIoU", "FWIoU", "mVC8", "mVC16", "TC", "aAcc", "mAcc", "per_class"}
    # compute() leaves the last video open: more frames of it can follow
    metrics.update("v2", videos[2][0][:1], videos[2][1][:1], videos[2][2][:1])


def test_video_metrics_tc_protocol_and_tc_videos():
    rng = np.random.default_rng(4)
    k = 4
    videos = random_dataset(rng, lengths=(5, 6, 4))
    flow = constant_flow(1.0, -1.0)
    conf = sum(confusion_matrix(p, g, k) for p, g, _ in videos)
    results = {}
    for protocol in ("vspw", "exact"):
        metrics = VideoMetrics(k, flow=flow, tc_protocol=protocol, tc_video_ids={"v0", "v2"})
        for vid, (preds, gts, frames) in enumerate(videos):
            metrics.update(f"v{vid}", preds, gts, None if vid == 1 else frames)  # v1 is not a TC video
        out = metrics.compute()
        tc_conf = sum(tc_confusion(videos[v][0], videos[v][2], k, flow=flow, protocol=protocol) for v in (0, 2))
        assert out["TC"] == pytest.approx(miou(tc_conf))
        assert out["mIoU"] == pytest.approx(miou(conf))  # every video
        results[protocol] = out
        # a pickled copy (what distributed evaluation gathers) leaves the flow out and computes the same
        copy = pickle.loads(pickle.dumps(metrics))
        assert copy.flow is None and repr(copy.compute()) == repr(out)
    assert results["vspw"]["TC"] != results["exact"]["TC"]
    everything = VideoMetrics(k, flow=flow)
    for vid, (preds, gts, frames) in enumerate(videos):
        everything.update(f"v{vid}", preds, gts, frames)
    assert everything.compute()["TC"] != results["vspw"]["TC"]
    with pytest.raises(ValueError, match="frame is required when TC is computed .* on video 'v0'"):
        VideoMetrics(k, tc_video_ids=["v0"]).update("v0", videos[0][0], videos[0][1])
    with pytest.raises(ValueError, match=r"cannot merge .*\['tc_protocol', 'tc_video_ids'\]"):
        VideoMetrics(k).merge(VideoMetrics(k, tc_protocol="exact", tc_video_ids=["v0"]))
    with pytest.raises(ValueError, match=r"tc_protocol must be one of \('vspw', 'exact'\), got 'etc'"):
        VideoMetrics(k, tc_protocol="etc")
    with pytest.raises(TypeError, match="tc_video_ids must be a collection"):
        VideoMetrics(k, tc_video_ids="v0")


def test_video_metrics_per_class_nan_for_classes_outside_the_mean():
    metrics = VideoMetrics(4, tc=False, mvc_lengths=(2,))
    metrics.update("a", np.array([[0, 0, 1, 2]]), np.array([[0, 0, 1, 1]]))
    out = metrics.compute()
    assert out["per_class"][:2] == pytest.approx([1.0, 0.5])
    assert math.isnan(out["per_class"][2]) and math.isnan(out["per_class"][3])  # not in the ground truth
    assert out["mIoU"] == pytest.approx(0.75) and "TC" not in out and math.isnan(out["mVC2"])
    mm = VideoMetrics(4, tc=False, miou_mode="mmseg")
    mm.update("a", np.array([[0, 0, 1, 2]]), np.array([[0, 0, 1, 1]]))
    out = mm.compute()
    assert out["mIoU"] == pytest.approx(0.5) and out["per_class"][2] == 0.0 and math.isnan(out["per_class"][3])


def test_video_metrics_state_is_bounded():
    rng = np.random.default_rng(3)
    h, w = 16, 20

    def feed(metrics, num_videos, t):
        for v in range(num_videos):
            gts = correlated_video(rng, t, h, w)
            for g in gts:
                metrics.update(v, g, g, rng.integers(0, 256, (h, w), dtype=np.uint8))

    short, long = VideoMetrics(4, flow=constant_flow(0)), VideoMetrics(4, flow=constant_flow(0))
    feed(short, 1, 20)
    feed(long, 3, 60)
    assert state_nbytes(long) == state_nbytes(short)
    frame_bytes = h * w * 8
    assert state_nbytes(long) <= 8 * frame_bytes  # a few per-pixel maps, never the video


def test_video_metrics_errors():
    metrics = VideoMetrics(3)
    g = np.zeros((2, 2), np.int64)
    with pytest.raises(ValueError, match="frame is required"):
        metrics.update("a", g, g)
    with pytest.raises(ValueError, match=r"pred .*\(2, 2\) and gt .*\(2, 3\)"):
        metrics.update("a", g, np.zeros((2, 3), np.int64), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="frame holds 1 images for 2 predictions"):
        metrics.update("a", np.stack([g, g]), np.stack([g, g]), np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="frame must match pred"):
        metrics.update("a", g, g, np.zeros((3, 2), np.uint8))
    metrics.update("a", g, g, np.zeros((2, 2), np.uint8))
    metrics.update("b", g, g, np.zeros((2, 2), np.uint8))
    before = metrics.compute()
    with pytest.raises(ValueError, match="video_id 'a' was already closed"):
        metrics.update("a", g, g, np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match=r"video 'b' changed shape: \(3, 2\) after \(2, 2\)"):
        metrics.update("b", np.zeros((3, 2), np.int64), np.zeros((3, 2), np.int64), np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match="pred holds label 3"):
        metrics.update("b", g + 3, g, np.zeros((2, 2), np.uint8))
    assert repr(metrics.compute()) == repr(before)  # the rejected frames left no trace
    assert metrics.conf.sum() == 8 and metrics._tracker.frames == 1
    with pytest.raises(ValueError, match="mvc_lengths entries must be an int >= 2"):
        VideoMetrics(3, mvc_lengths=(1,))
    with pytest.raises(ValueError, match="must not repeat"):
        VideoMetrics(3, mvc_lengths=(8, 8))
    with pytest.raises(ValueError, match="miou_mode"):
        VideoMetrics(3, miou_mode="mean")


# --- format_table -------------------------------------------------------------------------------------


def test_format_table_percent_two_decimals():
    results = {"mIoU": 0.41234, "FWIoU": 0.6, "mVC16": 0.8, "mVC8": 0.85556, "TC": math.nan, "per_class": [0.5, 1.0]}
    table = format_table(results, class_names=["sky", "road"])
    lines = table.splitlines()
    assert lines[0] == "| mIoU  | FWIoU | TC  | mVC8  | mVC16 |"
    assert lines[2] == "| 41.23 | 60.00 | n/a | 85.56 | 80.00 |"
    # the accuracies follow the paper's columns
    with_accuracy = format_table({"aAcc": 0.9, "mAcc": 0.755, **results}).splitlines()
    assert with_accuracy[0] == "| mIoU  | FWIoU | TC  | mVC8  | mVC16 | aAcc  | mAcc  |"
    assert with_accuracy[2] == "| 41.23 | 60.00 | n/a | 85.56 | 80.00 | 90.00 | 75.50 |"
    assert lines[-2:] == ["| sky   |  50.00 |", "| road  | 100.00 |"]
    assert "sky" not in format_table(results)
    with pytest.raises(ValueError, match="class_names must name every per_class entry"):
        format_table(results, class_names=["sky"])
