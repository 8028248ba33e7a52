"""ONNX export of the streaming predictor (:class:`ssltm.model.VideoPredictor`) and a predictor that runs the
exported graphs in onnxruntime (:class:`OnnxPredictor`).

``export_onnx(checkpoint, out)`` writes into the folder ``out``:

- ``encoder.onnx``: one normalised frame ``(1, 3, H, W)`` -> the four encoded levels ``level0..level3``
  ``(1, h_i, w_i, d_i)`` at strides 4, 8, 16, 32 (``SSLTM.encode``: what the predictor caches per frame);
- ``reference.onnx`` (models with RFCE and ``context: reference``): the reference frame's levels -> its category
  representations ``categories (1, K, D)`` (``SSLTM.reference_context``, once per video: frame 0 when streaming);
- ``decoder.onnx``: the clip's levels ``clip0..clip3`` ``(1, T, h_i, w_i, d_i)`` (the query frame, then its
  adjacent frames; ``T = 1`` without STT), the reference ``categories`` where the model has them and the frame
  size ``size`` (int64 ``[H, W]``) -> ``logits (1, K, H, W)`` and ``labels (1, H, W)`` int64 (``SSLTM.decode``);
- ``export.json``: the graphs' inputs and outputs, the clip offsets, the normalisation, the classes and palette,
  and the smallest frame the graphs take.

The graphs are the kernels' PyTorch reference (the fused custom ops have no ONNX form), traced by
``torch.export`` with symbolic height and width. Two modules get an export form with the same arithmetic: the
PPM's adaptive average pooling (as two pooling matrices built from the input's size) and the STT window
attention (zero-padding before ``qkv``, as Video Swin's block does, then the op's reference on the padded
volume). The window attention shrinks a window to a level smaller than it (Video Swin), which changes the
arithmetic, so the graphs take frames whose every STT level is larger than the window: at least
``32 * window + 1`` pixels a side (225 for the default 7x7 windows; ``min_size`` in ``export.json``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssltm_kernels import WindowAttention3D
from ssltm_kernels.ops.window_attention_3d.reference import WindowAttentionCall, _reference, window_geometry

from .model import SSLTM
from .model.ssltm import MIN_SIZE
from .outputs import check_replaceable_folder, staged_folder

EXPORTED_SHORT_TERM = ("none", "stt")  # the modules that read neither frames, flow nor a per-video state
ENCODER, REFERENCE, DECODER, MANIFEST = "encoder.onnx", "reference.onnx", "decoder.onnx", "export.json"
OUTPUTS = (ENCODER, REFERENCE, DECODER, MANIFEST)
OPSET = 18  # run by onnxruntime 1.18 and later
STRIDES = (4, 8, 16, 32)
INSTALL_HINT = "pip install ssltm[export]"
FORMAT = 1  # version of export.json's layout


def require_onnx() -> None:
    """Raise an ImportError with the install command unless onnx and onnxscript (torch's exporter) import."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs the onnx and onnxscript packages ({err.name} is missing): {INSTALL_HINT}"
        ) from None


# ------------------------------------------------------------------------------------- export forms of modules
class ExportAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d(bins)`` as ``P_h @ x @ P_w^T``, the pooling matrices built from the input's size
    (bin ``i`` of ``n`` positions averages ``floor(i n / bins) .. ceil((i + 1) n / bins) - 1``, as PyTorch's)."""

    def __init__(self, bins: int) -> None:
        super().__init__()
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matrix(x.shape[-2], x) @ x @ self._matrix(x.shape[-1], x).transpose(0, 1)

    def _matrix(self, n, x: torch.Tensor) -> torch.Tensor:
        i = torch.arange(self.bins, device=x.device)
        start, end = (i * n) // self.bins, ((i + 1) * n + self.bins - 1) // self.bins
        j = torch.arange(n, device=x.device)
        inside = (j[None] >= start[:, None]) & (j[None] < end[:, None])
        return inside.to(x.dtype) / (end - start)[:, None].to(x.dtype)


class ExportWindowAttention(nn.Module):
    """A ``WindowAttention3D`` (its parameters, shared) on ``(B, T, H, W, C)`` volumes whose height and width are
    larger than the window: the volume is zero-padded to whole windows before ``qkv`` (so padded tokens attend as
    the qkv bias, as in the op) and the op's reference runs on the padded volume, whose geometry is symbolic."""

    def __init__(self, attention: WindowAttention3D) -> None:
        super().__init__()
        if attention.rel_pos_mode != "swin":
            raise ValueError(f"export: window attention with rel_pos_mode={attention.rel_pos_mode!r} is not supported")
        self.attention = attention

    def forward(self, x: torch.Tensor, *, shift_size=(0, 0, 0)) -> torch.Tensor:
        a = self.attention
        t, h, w = x.shape[1:4]
        # the geometry of a volume larger than the window in height and width (time is static)
        larger = max(a.window_size) + 1
        geom = window_geometry((t, larger, larger), a.window_size, shift_size, a.rel_pos_mode)
        wt, wh, ww = geom.window
        x = F.pad(x, (0, 0, 0, (-w) % ww, 0, (-h) % wh, 0, (-t) % wt))
        geom = dataclasses.replace(geom, sizes=tuple(x.shape[1:4]))
        q, k, v = a.qkv(x).unflatten(-1, (3, a.num_heads, -1)).unbind(-3)
        call = WindowAttentionCall(q, k, v, geom, a.relative_position_bias_table, None, None, None, a.scale)
        out = _reference(call)[:, :t, :h, :w]
        return a.proj(out.flatten(-2))


def exportable(model: SSLTM) -> SSLTM:
    """Put ``model`` in eval mode and replace its adaptive poolings and window attentions, in place, by their export
    forms (which share the parameters); returns ``model``. Raises a ValueError for what they do not support."""
    if model.decoder != "upernet":
        raise ValueError(f"export: decoder {model.decoder!r} is not supported (supported: upernet)")
    if model.short_term not in EXPORTED_SHORT_TERM:
        raise ValueError(
            f"export: short_term {model.short_term!r} is not supported (the decoder graph takes encoded levels only; "
            f"supported: {', '.join(EXPORTED_SHORT_TERM)})"
        )
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.AdaptiveAvgPool2d):
                setattr(parent, name, ExportAdaptiveAvgPool2d(_pool_bins(child)))
            elif isinstance(child, WindowAttention3D):
                setattr(parent, name, ExportWindowAttention(child))
    return model.eval()


def _pool_bins(pool: nn.AdaptiveAvgPool2d) -> int:
    bins = pool.output_size
    if isinstance(bins, int):
        return bins
    if len(set(bins)) != 1 or bins[0] is None:
        raise ValueError(f"export: adaptive pooling to {bins} is not supported (square bins only)")
    return bins[0]


def min_frame_size(model: SSLTM) -> tuple[int, int]:
    """The smallest frame ``(H, W)`` the exported graphs of ``model`` take: every level with STT units larger
    than the window (a level of stride ``s`` has ``ceil(H / s)`` rows)."""
    if not model.use_stt:
        return MIN_SIZE, MIN_SIZE
    size = [MIN_SIZE, MIN_SIZE]
    for stride, block in zip(STRIDES, model.stt.blocks, strict=True):
        for unit in block:
            for axis, window in enumerate(unit.attn.window_size[1:]):
                size[axis] = max(size[axis], stride * window + 1)
    return size[0], size[1]


# -------------------------------------------------------------------------------------------- the three graphs
class _Encoder(nn.Module):
    def __init__(self, model: SSLTM) -> None:
        super().__init__()
        self.model = model

    def forward(self, frame: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.encode(frame))


class _Reference(nn.Module):
    def __init__(self, model: SSLTM) -> None:
        super().__init__()
        self.model = model

    def forward(self, *levels: torch.Tensor) -> torch.Tensor:
        return self.model.reference_context(levels)


class _Decoder(nn.Module):
    def __init__(self, model: SSLTM) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *inputs, size = inputs
        clip, categories = (inputs[:4], inputs[4]) if self.model.uses_reference else (inputs, None)
        logits = self.model.decode(clip, categories)
        height, width = size.tolist()
        torch._check(height >= MIN_SIZE)
        torch._check(width >= MIN_SIZE)
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits, logits.argmax(1)


@contextlib.contextmanager
def reference_backend() -> Iterator[None]:
    """``SSLTM_BACKEND=reference`` inside (every op runs its PyTorch reference), the variable restored after."""
    saved = os.environ.get("SSLTM_BACKEND")
    os.environ["SSLTM_BACKEND"] = "reference"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["SSLTM_BACKEND"]
        else:
            os.environ["SSLTM_BACKEND"] = saved


# ----------------------------------------------------------------------------------------------------- export
def check_export_out(out: str | Path) -> Path:
    """Raise a ValueError naming ``--out`` unless ``out`` can take the export (a new folder, or an earlier
    export's, which it replaces)."""
    return check_replaceable_folder(out, "--out", lambda p: p.name in OUTPUTS, "an earlier export's")


def export_onnx(checkpoint: str | Path, out: str | Path) -> dict:
    """Write the streaming predictor of ``checkpoint`` as ONNX graphs and ``export.json`` into the folder ``out``
    (see the module's documentation), which appears whole or not at all; returns the contents of ``export.json``.

    Raises:
        ValueError: ``out`` cannot be written; the checkpoint's model cannot be exported.
        ImportError: onnx or onnxscript is not installed.
        FileNotFoundError, ValueError: the checkpoint (as :func:`ssltm.checkpoint.load_checkpoint`).
    """
    from .build import load_model
    from .data import IMAGENET_MEAN, IMAGENET_STD

    out = check_export_out(out)
    require_onnx()
    model, cfg, meta = load_model(checkpoint, torch.device("cpu"))
    offsets = tuple(cfg.data.offsets)
    height, width = min_frame_size(model)
    start = time.perf_counter()
    with staged_folder(out) as staging:
        graphs = _export_graphs(model, staging)
        manifest = {
            "format": FORMAT,
            "checkpoint": str(checkpoint),
            "opset": OPSET,
            "num_classes": model.num_classes,
            "classes": list(meta["classes"]),
            "palette": [list(c) for c in meta["palette"]],
            "input": {
                "layout": "RGB",
                "scale": 255.0,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
                "frame": "(rgb / scale - mean) / std, float32 (1, 3, H, W)",
            },
            "min_size": [height, width],
            "offsets": list(offsets),
            "clip": {
                "frames": _clip_frames(model),
                "order": "frame t, then frame max(t - offset, 0) for each offset (the first clip_frames of these)",
            },
            "reference": {"frame": 0, "graph": "reference"} if model.uses_reference else None,
            "graphs": graphs,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"exported in {time.perf_counter() - start:.1f} s to {out}: {', '.join(g['file'] for g in graphs.values())}")
    return manifest


def _clip_frames(model: SSLTM) -> int:
    """Frames of a decoder clip: the query and its adjacent frames, the query alone without STT."""
    return 1 + model.num_adjacent if model.use_stt else 1


def _export_graphs(model: SSLTM, folder: Path) -> dict:
    """Trace the encoder, reference (if the model has one) and decoder graphs into ``folder``; their descriptions."""
    from torch.export import Dim

    height, width = min_frame_size(model)
    # Traced on a frame whose coarsest level has more cells than any PPM bin count (a size that equals one would
    # skip its resize, which is the identity, and fix the trace to that size), not a multiple of a stride or window
    bins = max((_pool_bins(m) for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)), default=0)
    frame = torch.zeros(1, 3, max(height, 32 * bins + 1) + 2, max(width, 32 * bins + 1) + 6)
    ex = exportable(copy.deepcopy(model))
    levels_in = [f"level{i}" for i in range(len(STRIDES))]
    clip_in = [f"clip{i}" for i in range(len(STRIDES))]
    sides = [(Dim(f"h{i}", min=-(-height // s)), Dim(f"w{i}", min=-(-width // s))) for i, s in enumerate(STRIDES)]
    level_dims = [{1: h, 2: w} for h, w in sides]  # (1, h, w, d)
    clip_dims = [{2: h, 3: w} for h, w in sides]  # (1, T, h, w, d)
    with reference_backend(), torch.no_grad():
        levels = ex.encode(frame)
        clip = [torch.stack([x] * _clip_frames(model), dim=1) for x in levels]
        size = torch.tensor(frame.shape[-2:])
        specs = [
            (ENCODER, _Encoder(ex), (frame,), ({2: Dim("height", min=MIN_SIZE), 3: Dim("width", min=MIN_SIZE)},),
             ["frame"], levels_in),
        ]  # fmt: skip
        decoder_args, decoder_in, decoder_dims = (*clip, size), [*clip_in, "size"], [*clip_dims, None]
        if model.uses_reference:
            categories = ex.reference_context(levels)
            specs.append((REFERENCE, _Reference(ex), tuple(levels), (tuple(level_dims),), levels_in, ["categories"]))
            decoder_args = (*clip, categories, size)
            decoder_in, decoder_dims = [*clip_in, "categories", "size"], [*clip_dims, None, None]
        specs.append((DECODER, _Decoder(ex), decoder_args, (tuple(decoder_dims),), decoder_in, ["logits", "labels"]))
        graphs = {}
        for file, module, args, dynamic_shapes, inputs, outputs in specs:
            path = folder / file
            with contextlib.redirect_stdout(None):  # the exporter reports its steps on stdout
                torch.onnx.export(
                    module.eval(),
                    args,
                    path,
                    dynamo=True,
                    opset_version=OPSET,
                    dynamic_shapes=dynamic_shapes,
                    input_names=inputs,
                    output_names=outputs,
                    external_data=False,
                )
            graphs[file.removesuffix(".onnx")] = describe_graph(path)
    return graphs


def describe_graph(path: Path) -> dict:
    """The file, inputs and outputs (name, dtype, shape: a name for each symbolic axis) of the ONNX graph at
    ``path``. Raises a RuntimeError if it holds a node outside the standard ONNX domain (a custom op) or if a frame
    axis (height, width) became a fixed size when it was traced."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    custom = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise RuntimeError(f"{path.name} holds nodes without an ONNX form: {', '.join(custom)}")

    def values(infos) -> list[dict]:
        return [
            {
                "name": v.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in infos
        ]

    inputs = values(graph.input)
    for value in inputs:
        frame_axes = value["shape"][-2:] if value["name"] == "frame" else value["shape"][-3:-1]
        if value["name"] not in ("categories", "size") and not all(isinstance(d, str) for d in frame_axes):
            raise RuntimeError(f"{path.name}: the height and width of {value['name']} were fixed when it was traced")
    return {"file": path.name, "inputs": inputs, "outputs": values(graph.output)}


# ------------------------------------------------------------------------------------------------ deployment
class OnnxPredictor:
    """Streams a video frame by frame through an export folder's graphs in onnxruntime (needs only onnxruntime and
    numpy): the class maps :class:`ssltm.model.VideoPredictor`'s ``step`` gives.

    ``step(frame)`` takes an RGB ``uint8 (H, W, 3)`` array (normalised here with ``export.json``'s mean and std)
    or a normalised ``float32 (3, H, W)`` array, and returns the class map ``(H, W)`` int64; ``reset()`` starts
    another video. Each frame goes through ``encoder.onnx`` once and its levels stay cached while a later clip
    needs them; frame 0's categories (``reference.onnx``) serve the whole video. ``providers``: onnxruntime's
    execution providers (default: its CPU provider).
    """

    def __init__(self, folder: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ImportError(f"OnnxPredictor needs onnxruntime: {INSTALL_HINT}") from None
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise FileNotFoundError(f"no {MANIFEST} in {folder}: not a folder `ssltm export` wrote")
        self.manifest = json.loads((folder / MANIFEST).read_text())
        self._sessions = {
            name: onnxruntime.InferenceSession(str(folder / graph["file"]), providers=list(providers))
            for name, graph in self.manifest["graphs"].items()
        }
        self._levels_in = [v["name"] for v in self.manifest["graphs"]["encoder"]["outputs"]]
        self.offsets = tuple(self.manifest["offsets"])
        norm = self.manifest["input"]
        self._scale = np.float32(norm["scale"])
        self._mean = np.array(norm["mean"], np.float32).reshape(3, 1, 1)
        self._std = np.array(norm["std"], np.float32).reshape(3, 1, 1)
        self.reset()

    def reset(self) -> None:
        """Forget the current video: cached levels, reference categories, frame count and frame size."""
        self._levels: dict[int, list[np.ndarray]] = {}
        self._categories: np.ndarray | None = None
        self._frames_seen = 0
        self._size: tuple[int, int] | None = None

    def step(self, frame: np.ndarray) -> np.ndarray:
        """The next frame of the streamed video -> its class map ``(H, W)`` int64."""
        x = self._check_frame(frame)
        index, self._frames_seen = self._frames_seen, self._frames_seen + 1
        self._levels[index] = self._sessions["encoder"].run(None, {"frame": x})
        feeds = {}
        if self.manifest["reference"] is not None:
            if self._categories is None:  # the reference of every streamed frame is frame 0
                levels = dict(zip(self._levels_in, self._levels[0], strict=True))
                self._categories = self._sessions["reference"].run(None, levels)[0]
            feeds["categories"] = self._categories
        frames = [index, *(max(index - o, 0) for o in self.offsets)][: self.manifest["clip"]["frames"]]
        for i in range(len(self._levels_in)):
            feeds[f"clip{i}"] = np.stack([self._levels[f][i] for f in frames], axis=1)
        feeds["size"] = np.array(self._size, np.int64)
        labels = self._sessions["decoder"].run(["labels"], feeds)[0]
        oldest_needed = index + 1 - max(self.offsets, default=0)
        for i in [i for i in self._levels if i < oldest_needed]:
            del self._levels[i]
        return labels[0]

    def _check_frame(self, frame: np.ndarray) -> np.ndarray:
        """``frame`` as the encoder's normalised ``(1, 3, H, W)`` float32, checked against the video's first."""
        if not isinstance(frame, np.ndarray):
            raise TypeError(f"frame must be a numpy array, got {type(frame).__name__}")
        if frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3:
            x = (frame.transpose(2, 0, 1).astype(np.float32) / self._scale - self._mean) / self._std
        elif frame.dtype == np.float32 and frame.ndim == 3 and frame.shape[0] == 3:
            x = frame
        else:
            raise ValueError(
                f"frame must be RGB uint8 (H, W, 3) or normalised float32 (3, H, W), got {frame.dtype} {frame.shape}"
            )
        size = x.shape[1:]
        min_size = tuple(self.manifest["min_size"])
        if size[0] < min_size[0] or size[1] < min_size[1]:
            raise ValueError(f"frame is {size[0]}x{size[1]} pixels; the exported graphs take at least {min_size}")
        if self._size is None:
            self._size = size
        elif size != self._size:
            raise ValueError(
                f"frame is {size} but this video's frames are {self._size} (call reset() to start another)"
            )
        return np.ascontiguousarray(x[None])
