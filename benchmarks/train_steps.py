"""What the model benchmarks share (``short_term.py``, ``objectives.py``, ``baselines.py``): synchronized median
timing, a case's figures or why there are none, and one training step as ``ssltm train`` runs it: a run config
(``ssltm.config.load_config``: a file and ``key=value`` overrides) built into the model
(``ssltm.build.build_model``), its objectives (``ssltm.objectives.build_objectives``) and their
:class:`~ssltm.objectives.TrainStep`, fed a synthetic micro-batch with every key the objectives read, and timed
forward+backward under the run's autocast (no optimizer step)."""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ssltm.build import build_model
from ssltm.objectives import TrainStep, build_objectives
from ssltm.precision import autocast

DTYPES = {"bf16": torch.bfloat16, "fp32": None}  # autocast dtype; None: full precision
GPU_MEMORY = "torch.cuda.max_memory_allocated"
# The tiny CPU model: ResNet-18 with configs/demo.yaml's narrow widths (the short-term modules narrowed alike).
TINY_MODEL = [
    "model.backbone=resnet18",
    "model.kwargs.fpn_dim=64",
    "model.kwargs.ppm_dim=64",
    "model.kwargs.stt_dims=[16,16,32,32]",
    "model.kwargs.stt_depths=[1,1,1,1]",
    "model.kwargs.head_dim=16",
    "model.kwargs.context_dim=64",
    "model.kwargs.head_channels=64",
    "model.kwargs.aux_channels=64",
    "model.st_ocr.channels=64",
    "model.st_ocr.key_channels=32",
    "model.cffm.dim=32",
]


@dataclass(frozen=True)
class Setup:
    """One device's step: classes, square side, clips per micro-batch, autocast dtype (a key of DTYPES), whether it
    is the tiny CPU stand-in, and the overrides that make a config's model tiny."""

    classes: int
    size: int
    batch: int
    dtype: str
    tiny: bool
    overrides: tuple[str, ...] = ()

    def record(self) -> dict:
        """The settings every record of a run carries."""
        return {"tiny": self.tiny, "classes": self.classes, "size": self.size, "batch": self.batch, "dtype": self.dtype}


GPU = Setup(classes=124, size=479, batch=2, dtype="bf16", tiny=False)  # VSPW, the paper's crop, bf16 as `auto`
# 48 px: the pooling branch of the decoder needs 2 values per channel in training at B = 2
TINY = Setup(classes=6, size=48, batch=2, dtype="fp32", tiny=True, overrides=tuple(TINY_MODEL))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Median milliseconds of ``steps`` calls of ``fn`` after ``warmup`` untimed ones, each synchronized."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def guarded(record: dict, figures: Callable[[], dict], device: torch.device) -> dict:
    """``record`` with the ``figures()`` it measured, or marked failed with why (out of memory, an error)."""
    try:
        return {**record, **figures()}
    except torch.cuda.OutOfMemoryError:
        return {**record, "status": "failed", "reason": "out of memory"}
    except Exception as err:  # a broken case must not stop the run; the whole story goes to stderr
        traceback.print_exception(err)
        lines = str(err).splitlines() or [""]
        return {**record, "status": "failed", "reason": f"{type(err).__name__}: {lines[0][:300]}"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def peak_tracking(device: torch.device) -> Callable[[], float | None]:
    """Resets the device's peak memory now; the returned call gives the peak since, in MiB (None on the CPU)."""
    if device.type != "cuda":
        return lambda: None
    torch.cuda.reset_peak_memory_stats(device)
    return lambda: torch.cuda.max_memory_allocated(device) / 2**20


def build_train_step(cfg: DictConfig, classes: int, device: torch.device) -> TrainStep:
    """``cfg``'s model for ``classes`` classes, on ``device`` in training mode, with its objectives (built after it
    is on the device, as the trainer builds them), as the trainer's :class:`TrainStep`."""
    torch.manual_seed(0)
    model = build_model(cfg, classes, pretrained=False).to(device).train()
    return TrainStep(model, build_objectives(cfg, model)).train()


def synthetic_batch(train_step: TrainStep, cfg: DictConfig, setup: Setup, device: torch.device) -> dict:
    """A micro-batch with the keys the trainer's loader gives ``train_step``: ``frames`` (the query and
    ``data.offsets``' adjacent frames), ``reference``, ``label``, ``labeled``; with need ``"strong"``
    ``reference_strong``; with ``"unlabeled"`` ``batch["unlabeled"]``, an unlabelled clip of the same shapes (label
    all 255, ``labeled`` False) with ``reference_strong`` (needs ``"strong"`` or ``"strong_frames"``) and
    ``frames_strong`` (``"strong_frames"``). ``flow`` is left out, as without ``data.flow_in_loader``: the model's
    flow provider computes it within the step."""
    gen = torch.Generator(device=device).manual_seed(0)
    b, side, k = setup.batch, setup.size, setup.classes
    frames = 1 + len(cfg.data.offsets)
    image = lambda *lead: torch.randn(*lead, 3, side, side, generator=gen, device=device)  # noqa: E731
    needs = train_step.needs

    def clip(labeled: bool, strong_reference: bool, strong_frames: bool) -> dict:
        out = {"frames": image(b, frames), "reference": image(b)}
        if labeled:
            out["label"] = torch.randint(0, k, (b, side, side), generator=gen, device=device)
        else:
            out["label"] = torch.full((b, side, side), 255, dtype=torch.long, device=device)
        out["labeled"] = torch.full((b,), labeled, device=device)
        if strong_reference or strong_frames:
            out["reference_strong"] = image(b)
        if strong_frames:
            out["frames_strong"] = image(b, frames)
        return out

    batch = clip(True, "strong" in needs, False)
    if "unlabeled" in needs:
        batch["unlabeled"] = clip(False, "strong" in needs, "strong_frames" in needs)
    return batch


def step_figures(
    train_step: TrainStep, batch: dict, setup: Setup, device: torch.device, warmup: int, steps: int
) -> dict:
    """``step_ms``: the median forward+backward of ``train_step`` on ``batch`` (the run's autocast, its ``total``
    loss, gradients set to None after each: no optimizer step) over ``steps`` calls after ``warmup``; ``peak_mib``
    over them (weights, gradients, activations; a teacher's weights; None on the CPU)."""
    dtype = DTYPES[setup.dtype]

    def step() -> None:
        with autocast(device, dtype):
            total = train_step(batch, 0)["total"]
        total.backward()
        train_step.zero_grad(set_to_none=True)

    peak = peak_tracking(device)
    step_ms = median_ms(step, device, warmup, steps)
    return {"step_ms": step_ms, "peak_mib": peak()}


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
