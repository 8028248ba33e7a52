"""Activation checkpointing (``model.checkpointing``): a training step with it equals the step without it, bit
for bit (losses, every parameter's gradient, the batch norms' running statistics), the recomputation really
happens (the backbone's stages and the STT blocks run twice), dropout replays its masks, batch norm's running
statistics are updated once, the fused ops recompute on the dispatched kernels too (the Triton interpreter),
evaluation is unchanged, and the config key reaches the model through the command line while configs without
it still load. Also the memory benchmark (benchmarks/train_memory.py) on the CPU and its failure rows.

The comparisons run under ``torch.use_deterministic_algorithms``: without it the CPU's accumulating index
backward (the relative position bias's gradient) may sum in another order from one run to the next, with or
without checkpointing (a difference of about 1e-11).
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from benchmark_runs import run_cpu_benchmark
from test_cli import TINY, config_file
from test_model import TINY as TINY_MODEL
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssltm import SSLTM
from ssltm.build import build_model, model_from_checkpoint
from ssltm.checkpoint import load_checkpoint
from ssltm.cli import main
from ssltm.config import from_container, load_config
from ssltm.model.checkpointing import recomputed

K = 5
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "stt0", "stt1", "stt2", "stt3")


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def inputs(batch: int, size: tuple[int, int], adjacent: int = 3):
    gen = torch.Generator().manual_seed(0)
    frames = torch.randn(batch, 1 + adjacent, 3, *size, generator=gen)
    reference = torch.randn(batch, 3, *size, generator=gen)
    labels = torch.randint(0, K, (batch, *size), generator=gen)
    labels[:, :2] = 255
    return frames, reference, labels


def count_runs(model: SSLTM) -> dict[str, int]:
    """Calls of each checkpointed part, counted when it starts (a recomputation may stop before its end)."""
    counts = dict.fromkeys(STAGES, 0)
    parts = {"stem": model.backbone.conv1, **{f"layer{i}": getattr(model.backbone, f"layer{i}") for i in range(1, 5)}}
    parts.update({f"stt{i}": block for i, block in enumerate(model.stt.blocks)})
    for name, module in parts.items():
        module.register_forward_pre_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def training_step(checkpointing: bool, size=(33, 47), batch: int = 2, **kwargs):
    """One forward + backward from the same weights, inputs and RNG: losses, gradients, buffers, part calls."""
    torch.manual_seed(0)
    model = SSLTM(K, **{**TINY_MODEL, **kwargs}, checkpointing=checkpointing).train()
    counts = count_runs(model)
    torch.manual_seed(1)  # the heads' dropout (0.1) draws the same masks in both runs
    out = model(*inputs(batch, size, model.num_adjacent))
    out["losses"]["total"].backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out, grads, {name: b.clone() for name, b in model.named_buffers()}, counts


def assert_same_step(plain, checkpointed) -> None:
    (out, grads, buffers, counts), (out_ck, grads_ck, buffers_ck, counts_ck) = plain, checkpointed
    assert torch.equal(out["logits"], out_ck["logits"])
    assert {k: v.item() for k, v in out["losses"].items()} == {k: v.item() for k, v in out_ck["losses"].items()}
    assert grads.keys() == grads_ck.keys()
    missing = [n for n, g in grads.items() if g is None or not g.any()]
    assert not missing, missing
    differ = [n for n, g in grads.items() if not torch.equal(g, grads_ck[n])]
    assert not differ, f"gradients differ with checkpointing: {differ}"
    assert buffers.keys() == buffers_ck.keys()
    norms = [n for n in buffers if n.startswith("backbone.") and n.endswith("num_batches_tracked")]
    assert norms and all(buffers[n].item() == 1 for n in norms)  # one backbone pass: one update
    differ = [n for n, b in buffers.items() if not torch.equal(b, buffers_ck[n])]
    assert not differ, f"buffers differ with checkpointing: {differ}"
    assert counts == dict.fromkeys(STAGES, 1)
    assert counts_ck == dict.fromkeys(STAGES, 2)  # the forward, then the recomputation in the backward


def test_checkpointed_step_equals_the_plain_step():
    """2 clips of 4 frames at 33x47 (odd sizes), two units at stride 4, dropout on: identical to the bit."""
    assert_same_step(training_step(False), training_step(True))


def test_checkpointed_step_on_the_dispatched_kernels(monkeypatch):
    """The fused ops (window attention, depthwise conv, soft region pooling, GCC assignment) on the dispatched
    backend (Triton, in the interpreter on the CPU) recompute what their forward saved: identical steps. One
    clip, one adjacent frame, 32x32, one unit per stride keep the interpreter's work small."""
    monkeypatch.delenv("SSLTM_BACKEND")
    small = dict(size=(32, 32), batch=1, num_adjacent=1, window_size=(2, 7, 7), stt_depths=(1, 1, 1, 1))
    assert_same_step(training_step(False, **small), training_step(True, **small))


def test_evaluation_and_inference_do_not_recompute():
    torch.manual_seed(0)
    model = SSLTM(K, **TINY_MODEL, checkpointing=True)
    counts = count_runs(model)
    frames, reference, labels = inputs(1, (32, 32))
    model.eval()
    model(frames, reference, labels)["losses"]["total"].backward()  # evaluation mode: no checkpoint
    model.train()
    with torch.no_grad():
        model(frames, reference, labels)  # no autograd: nothing to recompute for
    assert counts == dict.fromkeys(STAGES, 2)


def test_recomputation_replays_dropout_and_updates_batch_norm_once():
    """A part with dropout and batch norm: the same output and gradients as without checkpointing, and the
    running statistics of one update, where torch's checkpoint alone updates them a second time."""
    inputs = torch.randn(8, 6)

    def step(run):
        torch.manual_seed(0)
        part = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.BatchNorm1d(6), nn.Linear(6, 3))
        x = inputs.clone().requires_grad_()
        torch.manual_seed(1)
        y = run(part, x)
        y.square().sum().backward()
        norm = part[2]
        return y, x.grad.clone(), part[0].weight.grad, (norm.running_mean, norm.running_var, norm.num_batches_tracked)

    def plain_checkpoint(part, x):
        return checkpoint(part, x, use_reentrant=False)

    y, dx, dw, stats = step(lambda part, x: part(x))
    y_ck, dx_ck, dw_ck, stats_ck = step(recomputed)
    assert torch.equal(y, y_ck) and torch.equal(dx, dx_ck) and torch.equal(dw, dw_ck)
    assert all(torch.equal(a, b) for a, b in zip(stats, stats_ck, strict=True)) and stats[2].item() == 1
    *_, stats_twice = step(plain_checkpoint)
    assert stats_twice[2].item() == 2 and not torch.equal(stats_twice[0], stats[0])


def test_recomputed_function_needs_its_module():
    with pytest.raises(TypeError, match="norms must name the module of"):
        recomputed(torch.relu, torch.ones(2, requires_grad=True))


def test_config_key_through_the_command_line_and_old_configs(tmp_path):
    """``--set model.checkpointing=true`` trains a model with it on, to the weights of a run without it; the
    checkpoint's config holds the key, and a config without it (an older checkpoint's) loads with it off."""
    runs = {}
    for on in (False, True):
        work = tmp_path / f"checkpointing_{on}"
        args = ["train", config_file(tmp_path), "--set", *TINY, "train.max_iters=1", "train.batch_size=2"]
        args += ["train.validate=false", f"model.checkpointing={str(on).lower()}", "--work-dir", str(work)]
        assert main(args) == 0
        runs[on] = load_checkpoint(work / "latest.pt")
    assert runs[True]["config"]["model"]["checkpointing"] is True
    assert runs[False]["config"]["model"]["checkpointing"] is False
    for key, value in runs[False]["model"].items():
        assert torch.equal(value, runs[True]["model"][key]), key

    checkpointing = load_config(None, [*TINY, "model.checkpointing=true"])
    model = build_model(checkpointing, K)
    assert model.backbone.checkpointing and model.stt.checkpointing

    old = runs[True]
    del old["config"]["model"]["checkpointing"]
    cfg = from_container(old["config"])
    assert cfg.model.checkpointing is False
    model = model_from_checkpoint(cfg, old, "old.pt")
    assert not model.backbone.checkpointing and not model.stt.checkpointing
    assert all(torch.equal(v, old["model"][k]) for k, v in model.state_dict().items())
    # and a checkpoint trained without it loads into a model with it
    assert model_from_checkpoint(checkpointing, runs[False], "plain.pt").backbone.checkpointing


# ------------------------------------------------------------------------------- the memory benchmark
def test_train_memory_benchmark_runs_each_setting_in_a_fresh_process(tmp_path):
    proc, rows = run_cpu_benchmark(
        "train_memory",
        *("--backbone", "resnet18", "--crop", "32", "--batch", "1", "--classes", "5", "--checkpointing", "on"),
        results_dir=tmp_path,
        timeout=300,
    )
    assert "peak memory as peak RSS less the peak before the model" in proc.stdout
    assert "batch 1, checkpointing on: " in proc.stdout and "resnet18  32x32" in proc.stdout
    (row,) = rows
    assert row["benchmark"] == "train_memory" and row["device"] == "cpu" and row["error"] is None
    assert (row["backbone"], row["crop"], row["batch"], row["checkpointing"], row["amp"]) == (
        "resnet18",
        32,
        1,
        True,
        "off",
    )
    assert row["peak_mib"] > 0 and row["step_s"] > 0
    with torch.device("meta"):
        assert row["params"] == sum(p.numel() for p in SSLTM(5, backbone="resnet18").parameters())


@pytest.mark.parametrize(
    ("returncode", "stderr", "error"),
    [
        (-9, "", "killed by signal 9 (out of memory?)"),
        (1, "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "out of memory"),
        (1, "Traceback ...\nValueError: bad thing", "ValueError: bad thing"),
    ],
)
def test_train_memory_benchmark_reports_a_failed_setting(monkeypatch, returncode, stderr, error):
    from benchmarks import train_memory as bench

    done = subprocess.CompletedProcess([], returncode, stdout="", stderr=stderr)
    monkeypatch.setattr(bench.subprocess, "run", lambda *args, **kwargs: done)
    row = bench.run_setting({"device": "cpu", "batch": 2})
    assert row["error"] == error and row["peak_mib"] is None and row["batch"] == 2


@pytest.mark.parametrize("args", [["--crop", "16"], ["--batch", "0"], ["--checkpointing", "maybe"], ["--amp", "fp8"]])
def test_train_memory_benchmark_refuses_bad_options(args):
    from benchmarks import train_memory as bench

    with pytest.raises(SystemExit):
        bench.parse_args(args)
