"""Benchmark: the whole SSLTM model with the kernels against the same model on the reference backend.

    python benchmarks/ssltm_model.py [--quick] [--cases train,infer,stream] [--providers kernels,reference]
                                     [--backbone NAME] [--size N] [--no-save] [--results-dir DIR] [--cpu]
                                     [--threads N]

Providers (one model, the same weights):

    kernels    automatic dispatch: each op takes the first backend that runs (cuda -> triton -> reference)
    reference  every op forced to its PyTorch reference (SSLTM_BACKEND=reference during the forward; each
               op's backward runs the backend its forward chose)

Cases on a GPU, under bf16 autocast, dropout off (so that the providers' outputs compare):

    train   ResNet-50, 124 classes (VSPW), B=2 clips of 4+1 frames (query, 3 adjacent, reference), 480x480:
            one training step, the forward with labels and the backward of the total loss (fwd+bwd)
    infer   the same model and clips in eval mode: one forward without gradients (fwd), the logits compared
    stream  ResNet-101, 124 classes: ``VideoPredictor.step`` on 480x854 (480p) frames once its cache is full
            (one backbone pass per frame); items/s is frames/s; class maps compared by pixel agreement

``--backbone`` and ``--size`` change the train and infer cases' backbone and square input side
(scripts/gpu_check.sh: ``--backbone resnet101 --size 479``, the VSPW model on an odd size).

Step time, peak memory and frames/s go to JSON lines in ``benchmarks/results/ssltm_model.jsonl``, then the
targets are evaluated: training step >= 1.5x faster than the reference backend with peak memory <= 0.7x of
it; streaming >= 25 frames/s.

Without a GPU (or with ``--cpu``): the same three cases on a tiny fp32 model (ResNet-18, narrow widths,
64x64); on the CPU both providers run the references (Triton only runs there under TRITON_INTERPRET=1),
so the rows show that the benchmark runs and the providers agree, not kernel performance.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from benchmarks import harness
from ssltm import SSLTM, VideoPredictor
from ssltm.model.backbone import RESNETS

BENCHMARK = "ssltm_model"
PROVIDERS = ("kernels", "reference")
CASES = ("train", "infer", "stream")
OFFSETS = (3, 6, 9)
MIN_STREAM_FPS = 25.0
TRAIN_SPEEDUP, TRAIN_MEMORY = 1.5, 0.7
STREAM_AGREEMENT = 0.99  # fraction of pixels whose class the providers must agree on


@dataclass(frozen=True)
class Setup:
    """One device's problem sizes: the model config of the step cases and of the streaming case."""

    clips: int
    size: tuple[int, int]
    stream_size: tuple[int, int]
    num_classes: int
    model: dict = field(default_factory=dict)
    stream_model: dict = field(default_factory=dict)


GPU = Setup(
    clips=2,
    size=(480, 480),
    stream_size=(480, 854),
    num_classes=124,
    model=dict(backbone="resnet50"),
    stream_model=dict(backbone="resnet101"),
)
TINY = dict(
    backbone="resnet18",
    fpn_dim=32,
    ppm_dim=32,
    stt_dims=(32, 32, 32, 32),
    stt_depths=(1, 1, 1, 1),
    context_dim=32,
    head_channels=16,
    aux_channels=16,
)
CPU = Setup(clips=1, size=(64, 64), stream_size=(64, 64), num_classes=5, model=TINY, stream_model=TINY)


@contextlib.contextmanager
def backend(provider: str):
    """``SSLTM_BACKEND`` as the provider needs it, restored after."""
    saved = os.environ.pop("SSLTM_BACKEND", None)
    if provider == "reference":
        os.environ["SSLTM_BACKEND"] = "reference"
    try:
        yield
    finally:
        os.environ.pop("SSLTM_BACKEND", None)
        if saved is not None:
            os.environ["SSLTM_BACKEND"] = saved


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def make_clips(setup: Setup, device: torch.device, seed: int = 0):
    """frames (B, 4, 3, H, W), reference (B, 3, H, W), labels (B, H, W) with a few ignore rows."""
    gen = torch.Generator(device=device).manual_seed(seed)
    b, (h, w) = setup.clips, setup.size
    frames = torch.randn(b, 1 + len(OFFSETS), 3, h, w, generator=gen, device=device)
    reference = torch.randn(b, 3, h, w, generator=gen, device=device)
    labels = torch.randint(0, setup.num_classes, (b, h, w), generator=gen, device=device)
    labels[:, : h // 16] = 255
    return frames, reference, labels


def build_model(setup: Setup, config: dict, device: torch.device) -> SSLTM:
    torch.manual_seed(0)
    return SSLTM(setup.num_classes, **config, dropout=0.0).to(device)


def step_providers(names: Sequence[str], model: SSLTM, inputs, device, dtype, train: bool) -> dict[str, harness.Impl]:
    """One training step (the total loss, then the harness's backward) or one inference forward."""
    frames, reference, labels = inputs

    def run(provider: str) -> torch.Tensor:
        model.train(train)
        with backend(provider), autocast(device, dtype), torch.set_grad_enabled(train):
            out = model(frames, reference, labels if train else None)
        return out["losses"]["total"] if train else out["logits"]

    modes = ("fwd+bwd",) if train else ("fwd",)
    reason = "a training step is forward + backward" if train else "inference has no backward"
    return {name: harness.Impl(lambda name=name: run(name), modes=modes, reason=reason) for name in names}


def fp32_reference(model: SSLTM, inputs, train: bool) -> harness.Exact:
    """The correctness gate's yardstick: the fp32 reference-backend output (the loss of a training step, the
    logits of inference). Only the output is checked, not the parameters' gradients: the op benchmarks gate
    the ops' gradients, and the model's leaves are its parameters as they are (the yardstick ignores the
    widened copies it is handed)."""
    frames, reference, labels = inputs

    def run(*_parameters) -> torch.Tensor:
        model.train(train)
        with backend("reference"), torch.no_grad():
            out = model(frames, reference, labels if train else None)
        return out["losses"]["total"] if train else out["logits"]

    return harness.Exact(run, grads=False)


def streaming_step(
    model: SSLTM,
    offsets: Sequence[int],
    size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype | None,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Callable[[], torch.Tensor]:
    """``VideoPredictor(model, offsets).step`` on one random ``(3, *size)`` frame under ``context()`` and autocast to
    ``dtype`` (None or float32: none), its cache filled first (steady state: one new frame, one backbone pass
    per call)."""
    frame = torch.randn(3, *size, generator=torch.Generator(device=device).manual_seed(1), device=device)
    predictor = VideoPredictor(model, offsets)

    def step() -> torch.Tensor:
        with context(), autocast(device, dtype or torch.float32):
            return predictor.step(frame)

    for _ in range(max(offsets, default=0) + 1):
        step()
    return step


def stream_providers(names: Sequence[str], model: SSLTM, setup: Setup, device, dtype) -> dict[str, harness.Impl]:
    """``VideoPredictor.step`` per provider (:func:`streaming_step`)."""
    return {
        name: harness.Impl(
            streaming_step(model, OFFSETS, setup.stream_size, device, dtype, lambda name=name: backend(name)),
            modes=("fwd",),
            reason="inference has no backward",
            note="items/s = frames/s; max|err| = fraction of pixels with another class",
        )
        for name in names
    }


def class_agreement(name: str, out: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    """Tolerance of the streaming case: ``(fraction of pixels that differ, agreement >= STREAM_AGREEMENT)``."""
    differ = (out != ref).float().mean().item() if out.shape == ref.shape else 1.0
    return differ, differ <= 1.0 - STREAM_AGREEMENT


# ------------------------------------------------------------------------------------------------ targets
def evaluate_targets(rows: Sequence[harness.Row]) -> list[harness.TargetResult]:
    """Training step (fwd+bwd) >= 1.5x the reference backend's speed with <= 0.7x its peak memory; streaming
    >= 25 frames/s. A target whose numbers are missing is "n/a"; a mismatched output fails its targets."""
    by = {(r.case.split("-")[0], r.provider, r.mode): r for r in rows if r.ok}
    results = []

    def status(ok: bool, row: harness.Row) -> str:
        return "FAIL (incorrect)" if row.correct is False else "PASS" if ok else "FAIL"

    ours, ref = by.get(("train", "kernels", "fwd+bwd")), by.get(("train", "reference", "fwd+bwd"))
    target = f"training step >= {TRAIN_SPEEDUP}x reference"
    if ours and ref:
        speedup = ref.ms / ours.ms
        results.append(
            harness.TargetResult(
                ours.case, target, "kernels", f"{speedup:.2f}x", status(speedup >= TRAIN_SPEEDUP, ours)
            )
        )
    else:
        results.append(harness.TargetResult("train", target, "kernels", "-", "n/a (a training step has no time)"))
    target = f"training step peak memory <= {TRAIN_MEMORY}x reference"
    if ours and ref and ours.peak_mib is not None and ref.peak_mib:
        ratio = ours.peak_mib / ref.peak_mib
        results.append(
            harness.TargetResult(
                ours.case,
                target,
                "kernels",
                f"{ratio:.2f}x ({ours.peak_mib:.0f} / {ref.peak_mib:.0f} MiB)",
                status(ratio <= TRAIN_MEMORY, ours),
            )
        )
    else:
        results.append(harness.TargetResult("train", target, "kernels", "-", "n/a (no memory measurement)"))
    stream = by.get(("stream", "kernels", "fwd"))
    target = f"streaming >= {MIN_STREAM_FPS:g} frames/s"
    if stream and stream.items_per_s:
        results.append(
            harness.TargetResult(
                stream.case,
                target,
                "kernels",
                f"{stream.items_per_s:.1f} frames/s",
                status(stream.items_per_s >= MIN_STREAM_FPS, stream),
            )
        )
    else:
        results.append(harness.TargetResult("stream", target, "kernels", "-", "n/a (no streaming time)"))
    return results


# ------------------------------------------------------------------------------------------- command line
def options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cases",
        type=harness.csv_choices(CASES, "case"),
        default=list(CASES),
        help=f"comma-separated subset of {','.join(CASES)}",
    )
    p.add_argument(
        "--backbone",
        choices=tuple(RESNETS),
        default=None,
        help=f"backbone of the train and infer cases (default {GPU.model['backbone']} on a GPU, "
        f"{CPU.model['backbone']} on the CPU)",
    )
    p.add_argument(
        "--size",
        type=positive_int,
        default=None,
        help=f"square input side of the train and infer cases (default {GPU.size[0]} on a GPU, "
        f"{CPU.size[0]} on the CPU)",
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def chosen_setup(args: argparse.Namespace, on_gpu: bool) -> Setup:
    """The device's :class:`Setup` with ``--backbone`` and ``--size`` applied to the train and infer cases."""
    setup = GPU if on_gpu else CPU
    if args.backbone:
        setup = replace(setup, model={**setup.model, "backbone": args.backbone})
    if args.size:
        setup = replace(setup, size=(args.size, args.size))
    return setup


# ------------------------------------------------------------------------------------------------- cases
def models(args: argparse.Namespace, on_gpu: bool) -> list[tuple[str, Setup]]:
    """The models the ``--cases`` need, each with the device's setup: "steps" (the train and infer cases share
    one model, inference after the training steps) and "stream"."""
    setup = chosen_setup(args, on_gpu)
    return [
        (model, setup)
        for model, needs in (("steps", {"train", "infer"}), ("stream", {"stream"}))
        if needs & set(args.cases)
    ]


def _labels(run: harness.Context) -> tuple[str, str]:
    """The case names' suffix ("-cpu" on the CPU) and the precision the titles name."""
    return "" if run.on_gpu else "-cpu", str(run.dtype).removeprefix("torch.") + (" autocast" if run.on_gpu else "")


def step_cases(setup: Setup, run: harness.Context):
    """The train and infer cases of ``--cases`` on one model: inference after the training steps."""
    tag, precision = _labels(run)
    model = build_model(setup, setup.model, run.device)
    inputs = make_clips(setup, run.device)
    leaves = list(model.parameters())
    shape = {
        "clips": setup.clips,
        "frames": 1 + len(OFFSETS) + 1,
        "size": setup.size,
        "classes": setup.num_classes,
        **setup.model,
    }
    for case_name in (c for c in ("train", "infer") if c in run.args.cases):
        train = case_name == "train"
        title = (
            f"{'training step' if train else 'inference'}: {setup.model['backbone']}, {setup.clips} clips "
            f"of {len(OFFSETS) + 1}+1 frames at {setup.size[0]}x{setup.size[1]}, {precision}"
        )
        case = harness.Case(case_name + tag, shape, run.dtype, title=title, items=setup.clips)
        yield harness.Measurement(
            case,
            step_providers(run.args.providers, model, inputs, run.device, run.dtype, train),
            leaves=leaves,
            exact=fp32_reference(model, inputs, train),
            references=("reference",),
            modes=("fwd+bwd",) if train else ("fwd",),
        )


def stream_cases(setup: Setup, run: harness.Context):
    """The streaming case."""
    tag, precision = _labels(run)
    model = build_model(setup, setup.stream_model, run.device)
    h, w = setup.stream_size
    title = f"streaming VideoPredictor.step: {setup.stream_model['backbone']}, {h}x{w} frames, {precision}"
    case = harness.Case(
        "stream" + tag,
        {"size": setup.stream_size, "offsets": OFFSETS, "classes": setup.num_classes, **setup.stream_model},
        run.dtype,
        title=title,
        items=1,
    )
    providers = stream_providers(run.args.providers, model, setup, run.device, run.dtype)
    yield harness.Measurement(
        case, providers, leaves=[], references=("reference",), modes=("fwd",), tolerance=class_agreement
    )


def cases(model: tuple[str, Setup], run: harness.Context):
    name, setup = model
    return (stream_cases if name == "stream" else step_cases)(setup, run)


SPEC = harness.BenchmarkSpec(
    BENCHMARK,
    __doc__,
    PROVIDERS,
    ("kernels",),
    models,
    cases,
    targets=lambda rows, _: evaluate_targets(rows),
    target_cases=("train", "stream"),
    options=options,
    quick_help="shorter timing budgets",
    dtype_option=False,
    modes_option=False,
    cpu_run="tiny",
)

if __name__ == "__main__":
    harness.run_benchmark(SPEC)
