"""The command line end to end on CPU: training, resume, DDP, checkpoints, evaluation, inference and errors.

Every run uses a tiny SSLTM (ResNet-18, narrow heads, one STT unit per stride) on tiny synthetic videos, with
the reference backend of the kernels (the Triton interpreter that tests/conftest.py enables would be slow).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ssltm import SSLTM
from ssltm.checkpoint import link_checkpoint, load_checkpoint, save_checkpoint
from ssltm.cli import EXIT_ERROR, EXIT_FAILED, EXIT_INTERRUPTED, main
from ssltm.data import SyntheticVideos, eval_transform
from ssltm.distributed import DistEnv
from ssltm.evaluate import evaluate
from ssltm.infer import open_frames
from ssltm.metrics import tc
from ssltm.visualize import class_legend, make_palette

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid"
EMPTY_CONFIG = "config.yaml"  # written into each test's tmp_path: everything comes from --set

TINY_MODEL = [
    "model.backbone=resnet18",
    "model.kwargs.fpn_dim=32",
    "model.kwargs.ppm_dim=32",
    "model.kwargs.stt_dims=[8,8,16,16]",
    "model.kwargs.stt_depths=[1,1,1,1]",
    "model.kwargs.head_dim=8",
    "model.kwargs.context_dim=16",
    "model.kwargs.head_channels=16",
    "model.kwargs.aux_channels=16",
]
# 5 videos of 17 frames (mVC needs videos of at least 17), the last one held out for validation.
FRAMES = 17
TINY_DATA = [
    "data.synthetic.num_videos=5",
    "data.synthetic.val_videos=1",
    f"data.synthetic.num_frames={FRAMES}",
    "data.synthetic.size=32",
    "data.crop_size=32",
    "data.scale_range=[1.0,1.25]",
    "data.num_workers=0",
]
TINY = [*TINY_MODEL, *TINY_DATA, "train.progress=false", "train.log_every=1", "train.lr=0.01"]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")


def subprocess_env() -> dict[str, str]:
    """The environment of a child process: this checkout first on the path, the reference backend."""
    return {**os.environ, "PYTHONPATH": str(REPO), "SSLTM_BACKEND": "reference", "OMP_NUM_THREADS": "1"}


def config_file(tmp_path: Path, text: str = "") -> str:
    path = tmp_path / EMPTY_CONFIG
    path.write_text(text)
    return str(path)


def train_cli(tmp_path: Path, work_dir: Path, *overrides: str, resume: str | None = None) -> int:
    args = ["train", config_file(tmp_path), "--set", *TINY, *overrides, "--work-dir", str(work_dir)]
    return main(args + (["--resume", resume] if resume else []))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key].double() - b[key].double()).abs().max()}"
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def log_records(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]


# --- training and evaluation ----------------------------------------------------------------------------


def test_train_eval_through_cli(tmp_path, capsys):
    work = tmp_path / "run"
    assert train_cli(tmp_path, work, "train.max_iters=3", "train.batch_size=2", "train.checkpoint_every=2") == 0
    assert sorted(p.name for p in work.glob("*.pt")) == ["best.pt", "iter_2.pt", "iter_3.pt", "latest.pt"]
    assert os.path.samefile(work / "latest.pt", work / "iter_3.pt")
    ckpt = load_checkpoint(work / "latest.pt", training=True)
    assert ckpt["iteration"] == 3
    # best.pt is a link to the checkpoint of the best validation, which records that validation
    best = ckpt["train_state"]["best"]["iteration"]
    assert best in (2, 3) and os.path.samefile(work / "best.pt", work / f"iter_{best}.pt")
    val = {r["iter"]: r["val"]["mIoU"] for r in log_records(work) if "val" in r}
    assert load_checkpoint(work / "best.pt")["train_state"]["best"] == {"mIoU": max(val.values()), "iteration": best}
    assert ckpt["meta"]["num_classes"] == 6 and len(ckpt["meta"]["palette"]) == 6
    assert ckpt["config"]["train"]["max_iters"] == 3
    records = log_records(work)
    steps = [r for r in records if "total" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert all(np.isfinite(r[k]) for k in ("sup", "mse", "aux", "total"))
        assert r["total"] == pytest.approx(r["sup"] + r["mse"] + 0.5 * r["aux"], rel=1e-4)
    # the poly schedule: step i (from 0) runs at 0.01 * (1 - i / 3) ** 0.9
    assert [r["lr"] for r in steps] == pytest.approx([0.01 * (1 - i / 3) ** 0.9 for i in (0, 1, 2)])
    assert [r["iter"] for r in records if "val" in r] == [2, 3]
    assert records[-1]["end"] == "finished"

    out = tmp_path / "metrics.json"
    preds = tmp_path / "preds"
    args = ["eval", config_file(tmp_path), "--set", *TINY, "--checkpoint", str(work / "latest.pt")]
    assert main([*args, "--out", str(out), "--save-predictions", str(preds)]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == {
        *("mIoU", "FWIoU", "mVC8", "mVC16", "TC", "aAcc", "mAcc", "per_class"),
        *("TC_protocol", "TC_flow", "TC_videos"),
    }
    assert 0 <= metrics["aAcc"] <= 100 and 0 <= metrics["mAcc"] <= 100
    assert 0 <= metrics["mIoU"] <= 100 and 0 <= metrics["TC"] <= 100 and 0 <= metrics["mVC8"] <= 100
    assert (metrics["TC_protocol"], metrics["TC_flow"], metrics["TC_videos"]) == ("vspw", "dis", 1)
    assert list(metrics["per_class"]) == [f"class_{k}" for k in range(6)]
    printed = capsys.readouterr().out
    assert "| mIoU" in printed and "TC: protocol vspw, flow dis, on 1 video(s)" in printed
    # VSPW's submission layout: <video>/<frame>.png holding class ids; the held-out video is synthetic_4
    pngs = sorted(preds.glob("*/*.png"))
    assert [p.relative_to(preds).as_posix() for p in pngs] == [f"synthetic_4/{t:05d}.png" for t in range(FRAMES)]
    ids = np.asarray(Image.open(pngs[0]))
    assert ids.shape == (32, 32) and ids.max() < 6


def tiny_model_kwargs() -> dict:
    kwargs = {}
    for item in TINY_MODEL:
        key, value = item.split("=")
        name = key.split(".")[-1]
        kwargs[name] = json.loads(value) if value.startswith("[") or value.isdigit() else value
    return kwargs


# Mean Teacher on the synthetic videos' unlabelled frames (data.mode sf); its decay switches at iteration 3.
MEAN_TEACHER = ["data.mode=sf", "train.objectives=[mean_teacher]", "train.mean_teacher.rampup_iters=3"]


@pytest.mark.parametrize("objectives", [[], MEAN_TEACHER], ids=["plain", "mean_teacher"])
def test_resume_equals_uninterrupted_training(tmp_path, objectives):
    """Resumed at iteration 2, a run ends with the uninterrupted run's weights, momentum and losses, bit for bit;
    with Mean Teacher also its teacher and consistency term (the unlabelled clips drawn in the same order)."""
    common = ["train.max_iters=4", "train.batch_size=4", "train.grad_accum=2", "train.checkpoint_every=2"]
    common += ["train.validate=false", *objectives]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train_cli(tmp_path, whole, *common) == 0
    assert train_cli(tmp_path, resumed, *common, resume=str(whole / "iter_2.pt")) == 0
    assert not (resumed / "iter_2.pt").exists()
    a, b = load_checkpoint(whole / "iter_4.pt"), load_checkpoint(resumed / "iter_4.pt")
    assert_same_weights(a["model"], b["model"])
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))
    terms = ("total", "consistency") if objectives else ("total",)
    steps = lambda work: [(r["iter"], r["lr"], *(r[k] for k in terms)) for r in log_records(work) if "total" in r]
    assert steps(resumed) == steps(whole)[2:]
    if objectives:
        assert a["teacher_updates"] == b["teacher_updates"] == 4
        assert_same_weights(a["teacher"], b["teacher"])
        assert not all(torch.equal(a["teacher"][k], a["model"][k]) for k in a["model"])
        assert all(r["consistency"] > 0 for r in log_records(whole) if "total" in r)


def test_a_work_dir_with_checkpoints_is_not_started_again_by_accident(tmp_path, capsys):
    work = tmp_path / "run"
    common = ["train.max_iters=1", "train.batch_size=2", "train.validate=false"]
    assert train_cli(tmp_path, work, *common) == 0
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    capsys.readouterr()
    assert train_cli(tmp_path, work, *common) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"work dir {work} holds the checkpoints of an earlier run" in err
    assert "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before  # nothing touched
    assert main(["train", config_file(tmp_path), "--set", *TINY, *common, "--work-dir", str(work), "--overwrite"]) == 0
    old = [p for p in work.iterdir() if p.is_dir()]
    assert [p.name[:4] for p in old] == ["old-"] and f"to {old[0]}" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in old[0].iterdir()} == before  # the earlier run, moved aside whole
    assert [r["iter"] for r in log_records(work) if "total" in r] == [1]  # a new log
    with pytest.raises(SystemExit):
        main(["train", config_file(tmp_path), "--work-dir", str(work), "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err


# a step the fp16 scaler skips still advances the per-iteration schedule, without torch's order warning
@pytest.mark.filterwarnings(r"error:Detected call of `lr_scheduler\.step\(\)` before")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_resumes_exactly(tmp_path, amp):
    """Autocast training (bf16, and fp16 with its grad scaler) on CPU: finite losses, the scaler's state
    in the checkpoint, and a resumed run equal to the uninterrupted one."""
    common = [
        "train.max_iters=2",
        "train.batch_size=2",
        "train.checkpoint_every=1",
        "train.validate=false",
        f"train.amp={amp}",
    ]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train_cli(tmp_path, whole, *common) == 0
    steps = [r for r in log_records(whole) if "total" in r]
    assert len(steps) == 2 and all(np.isfinite(r["total"]) for r in steps)
    scaler = load_checkpoint(whole / "iter_2.pt", training=True)["scaler"]
    assert (scaler["scale"] > 0) if amp == "fp16" else not scaler
    assert train_cli(tmp_path, resumed, *common, resume=str(whole / "iter_1.pt")) == 0
    assert_same_weights(load_checkpoint(whole / "iter_2.pt")["model"], load_checkpoint(resumed / "iter_2.pt")["model"])


def torchrun(tmp_path: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ssltm", *args]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_two_processes_equal_one_process(tmp_path):
    """Two gloo processes with one clip each equal one process accumulating the same two clips per step.

    Without GPUs there is no SyncBatchNorm, so each process normalises its own micro-batch, exactly as the
    accumulation steps of a single process do; the DDP gradient average then equals the accumulated mean.
    Dropout is off: each process draws its own masks. Evaluation under torchrun splits the videos between
    the processes and merges the metrics: the same numbers as one process.
    """
    common = ["train.max_iters=2", "train.batch_size=2", "train.checkpoint_every=1", "train.validate=false"]
    common += ["model.kwargs.dropout=0.0"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert train_cli(tmp_path, single, *common, "train.grad_accum=2") == 0
    torchrun(tmp_path, "train", config_file(tmp_path), "--set", *TINY, *common, "--work-dir", str(ddp))
    ckpt = load_checkpoint(ddp / "iter_2.pt", training=True)
    assert ckpt["meta"]["world_size"] == 2 and len(ckpt["rng"]) == 2
    # BatchNorm running statistics are each process's own under DDP: compare the parameters.
    params = {name for name, _ in SSLTM(6, **tiny_model_kwargs()).named_parameters()}
    trained = {}
    for run in (single, ddp):
        for step in (1, 2):
            trained[run, step] = {k: v for k, v in weights(run / f"iter_{step}.pt").items() if k in params}
    for step in (1, 2):
        # float rounding apart (an all-reduce average against an accumulated sum, amplified by a step) ...
        assert_same_weights(trained[single, step], trained[ddp, step], atol=3e-5)
    # ... far below what one step moves the weights
    step_size = max((trained[single, 2][k] - trained[single, 1][k]).abs().max().item() for k in params)
    assert step_size > 1e-3
    losses = lambda work: [r["total"] for r in log_records(work) if "total" in r]
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5)

    evaluation = ["eval", config_file(tmp_path), "--set", *TINY, "data.synthetic.val_videos=2", "--checkpoint"]
    evaluation += [str(single / "iter_2.pt"), "--out"]
    torchrun(tmp_path, *evaluation, str(tmp_path / "ddp.json"))
    assert main([*evaluation, str(tmp_path / "single.json")]) == 0
    merged, alone = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("ddp", "single"))
    assert merged == alone and alone["mVC8"] is not None


KILL_DURING_SAVE = """
import sys, time, torch
from ssltm.checkpoint import save_checkpoint, link_checkpoint
work = sys.argv[1]
first = save_checkpoint(work + "/iter_1.pt", {"model": {"w": torch.ones(3)}, "config": {}, "meta": {}})
link_checkpoint(first, work + "/latest.pt")
real_save = torch.save
def slow_save(obj, f):
    f.write(b"partial bytes of a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
    real_save(obj, f)
torch.save = slow_save
save_checkpoint(work + "/iter_2.pt", {"model": {"w": torch.zeros(3)}, "config": {}, "meta": {}})
"""


def test_checkpoint_survives_kill_during_save(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (tmp_path / "iter_2.pt").exists()
    for name in ("latest.pt", "iter_1.pt"):
        assert torch.equal(load_checkpoint(tmp_path / name)["model"]["w"], torch.ones(3))
    # the next save of the same file replaces the leftover temporary file's role cleanly
    save_checkpoint(tmp_path / "iter_2.pt", {"model": {"w": torch.zeros(3)}, "config": {}, "meta": {}})
    link_checkpoint(tmp_path / "iter_2.pt", tmp_path / "latest.pt")
    assert torch.equal(load_checkpoint(tmp_path / "latest.pt")["model"]["w"], torch.zeros(3))


def test_ctrl_c_saves_a_checkpoint_and_the_printed_command_resumes(tmp_path, monkeypatch):
    """Ctrl-C saves a checkpoint and prints the command that continues the run; that command alone (the work
    dir's config, here bounded by two --set values) resumes it, and log.jsonl holds every iteration once."""
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssltm", "train", config_file(tmp_path), "--set", *TINY, "train.max_iters=1000"]
    cmd += ["train.batch_size=2", "train.checkpoint_every=1000", "--work-dir", str(work)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (work / "log.jsonl").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    ckpt = load_checkpoint(work / "latest.pt", training=True)
    done = ckpt["iteration"]
    assert done >= 1 and f"interrupted at iteration {done}" in stderr
    last = log_records(work)[-1]
    assert last["iter"] == done and last["end"] == "interrupted"
    hint = re.search(r"Continue with: (ssltm train .*)$", stderr, re.MULTILINE)
    assert hint, stderr[-3000:]
    command = shlex.split(hint[1])
    assert command == ["ssltm", "train", "--work-dir", str(work), "--resume"]
    # as if the run had been killed after its checkpoint: log lines past it, the last one cut short
    with open(work / "log.jsonl", "a") as log:
        log.write(json.dumps({"iter": done + 1, "total": 123.0}) + '\n{"iter": ')
    monkeypatch.chdir(tmp_path.parent)  # the command works from another folder too
    assert main([*command[1:], "--set", f"train.max_iters={done + 1}", "train.validate=false"]) == 0
    assert load_checkpoint(work / "latest.pt")["iteration"] == done + 1
    records = log_records(work)
    steps = [r["iter"] for r in records if "total" in r]
    assert steps == list(range(1, done + 2)) and 123.0 not in [r["total"] for r in records if "total" in r]
    assert {"iter": done, "resumed_from": str(work / "latest.pt")} in records


def test_ctrl_c_under_torchrun_saves_one_checkpoint_all_processes_agree_on(tmp_path):
    """Ctrl-C in a terminal reaches torchrun and both workers (the whole process group): the processes agree
    on the iteration to stop after, the first saves it, and the run resumes from it."""
    work = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "ssltm",
        "train",
        config_file(tmp_path),
        "--set",
        *TINY,
        "train.max_iters=1000",
        "train.batch_size=2",
        "train.checkpoint_every=1000",
        "train.validate=false",
        "--work-dir",
        str(work),
    ]
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while not (work / "log.jsonl").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ckpt = load_checkpoint(work / "latest.pt", training=True)
    done = ckpt["iteration"]
    assert done >= 1 and ckpt["meta"]["world_size"] == 2, stderr[-3000:]
    assert f"interrupted at iteration {done}" in stderr
    last = log_records(work)[-1]
    assert last["iter"] == done and last["end"] == "interrupted"
    torchrun(
        tmp_path,
        "train",
        config_file(tmp_path),
        "--set",
        *TINY,
        f"train.max_iters={done + 1}",
        "train.batch_size=2",
        "train.validate=false",
        "--work-dir",
        str(work),
        "--resume",
        str(work / "latest.pt"),
    )
    assert load_checkpoint(work / "latest.pt")["iteration"] == done + 1


def test_non_finite_loss_stops_naming_iteration_and_term(tmp_path, monkeypatch, capsys):
    forward = SSLTM.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if "losses" in out and len(calls) == 3:  # the second step's first micro-batch
            out["losses"]["mse"] = out["losses"]["mse"] * float("nan")
            out["losses"]["total"] = out["losses"]["sup"] + out["losses"]["mse"]
        return out

    monkeypatch.setattr(SSLTM, "forward", poisoned)
    work = tmp_path / "run"
    rc = train_cli(
        tmp_path,
        work,
        "train.max_iters=5",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.checkpoint_every=1",
        "train.val_every=0",
    )
    assert rc == EXIT_FAILED
    err = capsys.readouterr().err
    assert "non-finite loss at iteration 2: loss term 'mse' is nan" in err
    assert load_checkpoint(work / "latest.pt")["iteration"] == 1  # the bad step was not applied or saved
    assert not (work / "iter_2.pt").exists()
    assert log_records(work)[-1]["mse"] == "nan"


needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason=f"CamVid train split not found at {CAMVID}")


@needs_camvid
def test_camvid_training_steps(tmp_path):
    work = tmp_path / "camvid"
    args = ["train", str(REPO / "configs" / "camvid.yaml"), "--set", *TINY_MODEL, f"data.root={CAMVID}"]
    args += ["train.max_iters=2", "train.batch_size=2", "data.crop_size=48", "data.eval_size=32", "data.holdout=0.05"]
    args += ["data.num_workers=0", "train.progress=false", "--work-dir", str(work)]
    assert main(args) == 0
    ckpt = load_checkpoint(work / "latest.pt", training=True)
    assert ckpt["iteration"] == 2 and ckpt["meta"]["classes"][0] == "sky"
    val = [r["val"] for r in log_records(work) if "val" in r]
    assert len(val) == 1 and len(val[0]["per_class"]) == 11 and 0 <= val[0]["mIoU"] <= 100
    assert val[0]["TC"] is not None


# --- inference ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of the tiny model after one step (module scoped: several tests read it)."""
    tmp = tmp_path_factory.mktemp("trained")
    os.environ["SSLTM_BACKEND"] = "reference"
    try:
        assert (
            train_cli(tmp, tmp / "run", "train.max_iters=1", "train.batch_size=2", "train.val_every=0", "eval.tc=false")
            == 0
        )
    finally:
        os.environ.pop("SSLTM_BACKEND")
    return tmp / "run" / "latest.pt"


def test_whole_video_and_clip_evaluation_agree(tmp_path, trained):
    """Videos whose every frame is a query go through the model's whole-video predictor (one backbone pass per
    frame); others clip by clip with model.predict. Both are the paper's inference: the same class maps."""
    model = SSLTM(6, **tiny_model_kwargs())
    model.load_state_dict(weights(trained))
    dataset = SyntheticVideos(5, FRAMES, 32, seed=0, reference="farthest", transform=eval_transform())
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    video = list(range(4 * FRAMES, 5 * FRAMES))
    for name, indices in (("whole", video), ("clips", video[::3])):
        evaluate(model, dataset, indices, 6, env, tc=False, mvc_lengths=(), save_dir=tmp_path / name, progress=False)
    clips = sorted((tmp_path / "clips" / "synthetic_4").glob("*.png"))
    assert [p.stem for p in clips] == [f"{t:05d}" for t in range(0, FRAMES, 3)]
    for path in clips:
        a = np.asarray(Image.open(path))
        b = np.asarray(Image.open(tmp_path / "whole" / "synthetic_4" / path.name))
        assert (a == b).mean() > 0.995, f"{path.name}: {(a != b).sum()} pixels differ"  # float ties aside


def test_evaluate_tc_protocol_and_first_videos(tmp_path, trained):
    """TC on the first N videos only (mIoU on all), with the protocol asked for, and both reported."""
    model = SSLTM(6, **tiny_model_kwargs())
    model.load_state_dict(weights(trained))
    length = 5
    dataset = SyntheticVideos(2, length, 32, seed=1, reference="farthest", transform=eval_transform())
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    both = list(range(2 * length))

    def run(indices, **kwargs):
        return evaluate(model, dataset, indices, 6, env, mvc_lengths=(), progress=False, **kwargs)

    first = run(both[:length], save_dir=tmp_path)
    preds = [np.asarray(Image.open(tmp_path / "synthetic_0" / f"{t:05d}.png")) for t in range(length)]
    frames = [dataset.read_frame(0, t) for t in range(length)]
    assert first["TC"] == pytest.approx(tc(preds, frames, 6))
    assert (first["TC_protocol"], first["TC_flow"], first["TC_videos"]) == ("vspw", "dis", 1)
    every, limited = run(both), run(both, tc_videos=1, tc_protocol="exact")
    assert every["TC_videos"] == 2 and every["TC"] != first["TC"]
    assert (limited["TC_protocol"], limited["TC_videos"]) == ("exact", 1)
    assert limited["TC"] == pytest.approx(tc(preds, frames, 6, protocol="exact")) and limited["TC"] != first["TC"]
    assert repr(limited["per_class"]) == repr(every["per_class"])  # mIoU and the rest: every video
    assert "TC_protocol" not in run([], tc=False)
    with pytest.raises(ValueError, match="tc_videos must be a positive int or None, got 0"):
        run(both, tc_videos=0)
    with pytest.raises(ValueError, match=r"flow must be one of \('dis', 'raft'\), got 'farneback'"):
        run(both, flow="farneback")


def test_frame_folders_are_read_in_natural_order(tmp_path):
    """f_2 before f_10 (a lexicographic sort would shuffle the frames the temporal model sees); case and the
    image format do not matter; each name comes with its own pixels; max_frames keeps the first ones."""
    names = ["f_10", "f_2", "F_3", "f_1", "f_100", "f_20"]
    for value, name in enumerate(names):
        suffix = ".png" if value % 2 else ".bmp"
        Image.fromarray(np.full((4, 6, 3), 10 * value, np.uint8)).save(tmp_path / f"{name}{suffix}")
    (tmp_path / "notes.txt").write_text("not a frame")
    source = open_frames(tmp_path)
    frames = list(source.frames)
    assert [name for name, _ in frames] == ["f_1", "f_2", "F_3", "f_10", "f_20", "f_100"] and source.count == 6
    assert all((image == 10 * names.index(name)).all() and image.shape == (4, 6, 3) for name, image in frames)
    assert [name for name, _ in open_frames(tmp_path, max_frames=3).frames] == ["f_1", "f_2", "F_3"]


def test_infer_frame_folder_streams_like_causal_clips(tmp_path, trained, capsys):
    videos = SyntheticVideos(5, FRAMES, 32, seed=0, causal=True, reference="farthest", transform=eval_transform())
    frames = tmp_path / "frames"
    frames.mkdir()
    for t in range(12):
        Image.fromarray(videos.read_frame(4, t)).save(frames / f"{t:03d}.png")
    out = tmp_path / "out"
    assert main(["infer", "--checkpoint", str(trained), "--input", str(frames), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "12 frames:" in printed and "frames/s" in printed
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f"{t:03d}.jpg" for t in range(12)]
    model = SSLTM(6, **tiny_model_kwargs())
    model.load_state_dict(weights(trained))
    for t in (0, 5, 11):
        clip = videos[4 * FRAMES + t]  # causal clip: adjacent frames clamped to 0, reference frame 0
        expected = model.predict(clip["frames"][None], clip["reference"][None])[0].numpy()
        np.testing.assert_array_equal(np.asarray(Image.open(out / "labels" / f"{t:03d}.png")), expected)
    capture = cv2.VideoCapture(str(out / "overlay.mp4"))
    assert capture.isOpened() and int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 12


def test_infer_video_file(tmp_path, trained, capsys):
    videos = SyntheticVideos(1, 8, (40, 48), seed=3)
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (48, 40))
    for t in range(8):
        writer.write(cv2.cvtColor(videos.read_frame(0, t), cv2.COLOR_RGB2BGR))
    writer.release()
    out = tmp_path / "out"
    assert (
        main(
            [
                "infer",
                "--checkpoint",
                str(trained),
                "--input",
                str(path),
                "--out",
                str(out),
                "--max-frames",
                "6",
                "--size",
                "32",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "6 frames:" in printed and "frames/s" in printed
    labels = sorted((out / "labels").glob("*.png"))
    assert [p.stem for p in labels] == [f"frame_{t:06d}" for t in range(6)]
    assert np.asarray(Image.open(labels[0])).shape == (32, 38)


def assert_legend_shows(legend: np.ndarray, palette) -> None:
    """Every class colour fills a 12x12 swatch of the legend, and the legend has dark text pixels."""
    for colour in palette:
        assert (legend == np.asarray(colour, np.uint8)).all(-1).sum() == 12 * 12, f"no swatch of colour {colour}"
    assert (legend.max(-1) < 100).sum() > 0, "no class names"


def test_class_legend_wraps_the_classes_into_the_width():
    classes, palette = [f"class_{k}" for k in range(6)], make_palette(6)
    wide, narrow = class_legend(classes, palette, 400), class_legend(classes, palette, 120)
    assert wide.shape == (16, 400, 3) and narrow.shape[1] == 120 and narrow.shape[0] >= 3 * 16
    assert_legend_shows(wide, palette)
    assert_legend_shows(narrow, palette)


def frame_folder(tmp_path: Path, count: int, broken: int | None = None, size: int = 32) -> Path:
    """``count`` frames of the held-out synthetic video as PNGs, frame ``broken`` (if given) not an image."""
    videos = SyntheticVideos(5, FRAMES, size, seed=0)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in range(count):
        if t == broken:
            (folder / f"{t:03d}.png").write_bytes(b"not a png")
        else:
            Image.fromarray(videos.read_frame(4, t)).save(folder / f"{t:03d}.png")
    return folder


def test_eval_and_infer_use_the_checkpoints_config(tmp_path, trained, capsys):
    """The checkpoint's config (the run's --set values included) is the default; a config file's keys and --set
    override it. Infer resizes to its data.eval_size."""
    assert main(["eval", "--checkpoint", str(trained), "--set", "eval.tc=false"]) == 0
    assert "synthetic val: 17 frames" in capsys.readouterr().out  # the run's 5 tiny videos, one held out
    two = tmp_path / "two.yaml"
    two.write_text("data:\n  synthetic:\n    val_videos: 2\n")
    assert main(["eval", str(two), "--checkpoint", str(trained), "--set", "eval.tc=false"]) == 0
    assert "synthetic val: 34 frames" in capsys.readouterr().out

    ckpt = load_checkpoint(trained)
    ckpt["config"]["data"]["eval_size"] = 32
    small = save_checkpoint(tmp_path / "eval_size_32.pt", ckpt)
    frames = frame_folder(tmp_path, 2, size=48)
    for name, args, shape in (
        ("default", [], (32, 32)),
        ("size", ["--size", "40"], (40, 40)),
        ("native", ["--set", "data.eval_size=null"], (48, 48)),
    ):
        out = tmp_path / name
        assert main(["infer", "--checkpoint", str(small), "--input", str(frames), "--out", str(out), *args]) == 0
        assert np.asarray(Image.open(out / "labels" / "000.png")).shape == shape, name


def test_outputs_are_checked_before_the_work(tmp_path, trained, capsys, monkeypatch):
    import ssltm.evaluate

    monkeypatch.setattr(ssltm.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before the outputs' check"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    evaluation = ["eval", config_file(tmp_path), "--set", *TINY, "--checkpoint", str(trained)]
    err = run_error(capsys, [*evaluation, "--out", str(a_file / "m.json")])
    assert err == f"ssltm eval: error: --out: cannot create {a_file / 'm.json'}: {a_file} is a file, not a folder\n"
    err = run_error(capsys, [*evaluation, "--out", str(tmp_path)])
    assert f"--out: {tmp_path} is a folder, not a file" in err
    err = run_error(capsys, [*evaluation, "--save-predictions", str(a_file)])
    assert f"--save-predictions: {a_file} is a file, not a folder" in err
    err = run_error(capsys, [*evaluation, "--save-predictions", str(tmp_path)])
    assert f"{tmp_path} holds other files than an earlier run's output (config.yaml, file.txt)" in err

    frames = frame_folder(tmp_path, 3, broken=2)
    out = tmp_path / "seg"
    infer = ["infer", "--checkpoint", str(trained), "--input", str(frames), "--out", str(out)]
    for option, value, message in (
        ("--max-frames", "0", "at least 1"),
        ("--max-frames", "-1", "at least 1"),
        ("--size", "0", "at least 1"),
        ("--fps", "0", "positive"),
    ):
        assert f"{option} must be {message}, got {value}" in run_error(capsys, [*infer, option, value])
    err = run_error(capsys, [*infer[:-1], str(a_file / "seg")])
    assert f"--out: cannot create {a_file / 'seg'}: {a_file} is a file, not a folder" in err
    err = run_error(capsys, [*infer[:-1], str(tmp_path)])
    assert f"--out: {tmp_path} holds other files than an earlier inference's" in err
    # a failure mid-video (frame 2 is not an image) leaves the earlier output as it was, and nothing else
    assert main([*infer, "--max-frames", "2"]) == 0
    earlier = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert "--input: cannot read the image" in run_error(capsys, infer)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    shutil.rmtree(out)
    assert "--input: cannot read the image" in run_error(capsys, infer)
    assert not out.exists()


def test_a_failed_evaluation_leaves_the_predictions_folder_as_it_was(tmp_path, trained, capsys, monkeypatch):
    import ssltm.evaluate

    preds = tmp_path / "preds"
    (preds / "video").mkdir(parents=True)
    (preds / "video" / "00000.png").write_bytes(b"earlier")

    def fails_after_one_video(model, dataset, indices, num_classes, env, save_dir, **kwargs):
        (Path(save_dir) / "synthetic_4").mkdir()
        (Path(save_dir) / "synthetic_4" / "00000.png").write_bytes(b"new")
        raise ValueError("stopped in the middle")

    monkeypatch.setattr(ssltm.evaluate, "evaluate", fails_after_one_video)
    evaluation = ["eval", config_file(tmp_path), "--set", *TINY, "--checkpoint", str(trained)]
    assert "stopped in the middle" in run_error(capsys, [*evaluation, "--save-predictions", str(preds)])
    assert [p.relative_to(preds).as_posix() for p in preds.rglob("*")] == ["video", "video/00000.png"]
    assert (preds / "video" / "00000.png").read_bytes() == b"earlier"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_warns_once_when_the_kernels_cannot_run_at_full_speed(tmp_path, trained, capsys, monkeypatch):
    from ssltm import cli

    frames = frame_folder(tmp_path, 1)
    monkeypatch.delenv("SSLTM_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as tests/conftest.py sets it: the kernels run in the interpreter
    assert main(["infer", "--checkpoint", str(trained), "--input", str(frames), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: TRITON_INTERPRET=1") == 1 and "5-14x slower" in err
    assert "unset TRITON_INTERPRET" in err
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setenv("SSLTM_BACKEND", "reference")  # the interpreter is not used
    assert cli.kernel_speed_warning(cpu) is None and cli.kernel_speed_warning(gpu) is None
    monkeypatch.delenv("SSLTM_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli.kernel_speed_warning(cpu) is None  # the reference is the CPU's backend
    monkeypatch.setattr(cli, "HAS_TRITON", False)
    monkeypatch.setattr(cli, "HAS_CUDA_EXT", False)
    message = cli.kernel_speed_warning(gpu)
    assert message.startswith("no kernel backend for cuda:0") and "pip install triton" in message
    monkeypatch.setattr(cli, "HAS_TRITON", True)
    assert cli.kernel_speed_warning(gpu) is None


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    settings = [*TINY_DATA, "data.synthetic.num_videos=4", "train.batch_size=2", "train.progress=false"]
    assert main(["demo", "--max-minutes", "0.05", "--out", str(out), "--device", "cpu", "--set", *settings]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"mIoU", "FWIoU", "TC", "mVC8", "mVC16", "per_class", "baseline_mIoU", "baseline_class"} <= set(metrics)
    assert metrics["iterations"] >= 1 and metrics["device"] == "cpu"
    # the baseline: the most frequent training class everywhere in the held-out video
    videos = SyntheticVideos(4, FRAMES, 32, seed=0)
    counts = sum(np.bincount(videos.read_label(v, t).ravel(), minlength=6) for v in range(3) for t in range(FRAMES))
    majority = int(np.argmax(counts))
    ious = []
    for k in range(6):
        gt = np.stack([videos.read_label(3, t) for t in range(FRAMES)]) == k
        if gt.any():
            ious.append((gt & (k == majority)).sum() / (gt | (k == majority)).sum())
    assert metrics["baseline_class"] == f"class_{majority}"
    assert metrics["baseline_mIoU"] == pytest.approx(100 * np.mean(ious), abs=0.01)
    picture = np.asarray(Image.open(out / "predictions.png"))
    grid_height = 3 * (14 + 64 + 4)  # 3 rows of 4 frames shown at twice their size ...
    assert picture.shape[1:] == (4 * (64 + 4) - 4, 3)
    assert picture.shape[0] > grid_height and (picture.shape[0] - grid_height) % 16 == 0  # ... above the class colours
    assert_legend_shows(picture[grid_height:], make_palette(6))
    printed = capsys.readouterr().out
    assert f"always predicting the most frequent class (class_{majority})" in printed


# --- errors ------------------------------------------------------------------------------------------------


def run_error(capsys, args: list[str]) -> str:
    assert main(args) == EXIT_ERROR
    return capsys.readouterr().err


def test_unknown_and_bad_keys_are_named(tmp_path, capsys):
    cfg = config_file(tmp_path)
    err = run_error(capsys, ["train", cfg, "--set", "train.max_iter=3"])
    assert "unknown config key 'train.max_iter'" in err and "did you mean 'train.max_iters'" in err
    err = run_error(capsys, ["train", cfg, "--set", "train.max_iters=3", "optim.lr=1"])
    assert "--set optim.lr=1: unknown config key 'optim'" in err
    err = run_error(capsys, ["train", cfg, "--set", "train.lr=fast"])
    assert "--set train.lr=fast: bad value for 'train.lr'" in err
    err = run_error(capsys, ["train", cfg, "--set", "train.max_iters"])
    assert "--set expects key=value, got 'train.max_iters'" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: synthetic\n  crop: 32\n")
    err = run_error(capsys, ["train", str(bad)])
    assert f"config file {bad}: unknown config key 'data.crop'" in err
    bad.write_text("train: [1, 2\n")
    assert "is not valid YAML" in run_error(capsys, ["train", str(bad)])
    err = run_error(capsys, ["train", cfg, "--set", "train.max_iters=3", "data.dataset=kitti"])
    assert "data.dataset must be one of" in err and "'kitti'" in err
    err = run_error(capsys, ["train", cfg, "--set", *TINY, "train.max_iters=3", "model.kwargs.stt_width=4"])
    assert "stt_width" in err
    err = run_error(
        capsys, ["train", cfg, "--set", *TINY, "train.max_iters=3", "train.batch_size=3", "train.grad_accum=2"]
    )
    assert "train.batch_size=3 must be a multiple of train.grad_accum=2" in err


def test_eval_tc_settings_are_checked(tmp_path, trained, capsys, monkeypatch):
    import ssltm.evaluate

    never = lambda *a, **k: pytest.fail("evaluated before the TC settings' check")
    monkeypatch.setattr(ssltm.evaluate, "evaluate", never)
    cfg = config_file(tmp_path)
    eval_args = ["eval", cfg, "--checkpoint", str(trained), "--set", *TINY, "eval.tc=true"]
    err = run_error(capsys, [*eval_args, "eval.flow=farneback"])
    assert "eval.flow must be one of ('dis', 'raft'), got 'farneback'" in err
    err = run_error(capsys, [*eval_args, "eval.tc_protocol=etc"])
    assert "eval.tc_protocol must be one of ('vspw', 'exact'), got 'etc'" in err
    assert "eval.tc_videos must be at least 1" in run_error(capsys, [*eval_args, "eval.tc_videos=0"])
    assert "eval.flow 'raft' needs eval.raft_weights" in run_error(capsys, [*eval_args, "eval.flow=raft"])
    missing = tmp_path / "raft.pth"
    err = run_error(capsys, [*eval_args, "eval.flow=raft", f"eval.raft_weights={missing}"])
    assert f"eval.raft_weights = {missing}: RAFT weights not found: no file at {missing}" in err
    junk = tmp_path / "junk.pth"
    torch.save({"conv.weight": torch.zeros(1)}, junk)
    err = run_error(capsys, [*eval_args, "eval.flow=raft", f"eval.raft_weights={junk}"])
    assert f"eval.raft_weights = {junk}: RAFT weights {junk} are not a state dict of torchvision's raft_large" in err
    # training checks the file before its first step, not at its first validation
    work = tmp_path / "run"
    train_args = ["train", cfg, "--set", *TINY, "train.max_iters=1", "eval.flow=raft", f"eval.raft_weights={missing}"]
    err = run_error(capsys, [*train_args, "--work-dir", str(work)])
    assert f"eval.raft_weights = {missing}: RAFT weights not found" in err
    assert not (work / "latest.pt").exists()


def test_bad_paths_are_named(tmp_path, trained, capsys):
    cfg = config_file(tmp_path)
    missing = tmp_path / "nowhere"
    assert f"config file not found: {missing}.yaml" in run_error(capsys, ["train", f"{missing}.yaml"])
    err = run_error(capsys, ["train", cfg, "--set", "train.max_iters=3", "data.dataset=camvid", f"data.root={missing}"])
    assert str(missing) in err
    err = run_error(capsys, ["train", cfg, "--set", *TINY, "train.max_iters=3", f"model.pretrained={missing}.pth"])
    assert f"model.pretrained: no checkpoint file at {missing}.pth" in err
    err = run_error(capsys, ["train", cfg, "--set", "train.max_iters=3", "--work-dir", str(missing), "--resume"])
    assert f"no checkpoint to resume at {missing / 'latest.pt'}" in err
    err = run_error(capsys, ["eval", cfg, "--set", *TINY, "--checkpoint", f"{missing}.pt"])
    assert f"checkpoint not found: {missing}.pt" in err
    not_a_checkpoint = tmp_path / "junk.pt"
    not_a_checkpoint.write_bytes(b"junk")
    err = run_error(capsys, ["eval", cfg, "--set", *TINY, "--checkpoint", str(not_a_checkpoint)])
    assert f"not an ssltm checkpoint: {not_a_checkpoint} (" in err and len(err.splitlines()) == 1
    pickled_module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled_module)
    err = run_error(capsys, ["eval", "--checkpoint", str(pickled_module)])
    assert f"not an ssltm checkpoint: {pickled_module} (" in err and "weights_only" not in err
    err = run_error(capsys, ["eval", cfg, "--set", *TINY, "model.use_gcc=false", "--checkpoint", str(trained)])
    assert f"checkpoint {trained} does not fit the model its config builds" in err and "gcc" in err
    # the first mismatched keys with both shapes, and the config keys that differ from the checkpoint's
    err = run_error(capsys, ["eval", cfg, "--set", *TINY, "model.backbone=resnet50", "--checkpoint", str(trained)])
    assert len(err.splitlines()) <= 3, err
    shapes = re.findall(r"key '[\w.]+' has shape \([\d, ]+\) in the checkpoint but \([\d, ]+\) in the model", err)
    assert shapes and "more)" in err
    assert "config keys that differ from the checkpoint's: model.backbone ('resnet18' in the checkpoint, " in err
    err = run_error(capsys, ["infer", "--checkpoint", str(not_a_checkpoint), "--input", str(missing), "--out", "x"])
    assert f"--input: no video file or folder of frames at {missing}" in err
    (tmp_path / "empty").mkdir()
    err = run_error(capsys, ["infer", "--checkpoint", "x.pt", "--input", str(tmp_path / "empty"), "--out", "x"])
    assert "no images" in err and str(tmp_path / "empty") in err
