"""Mean Teacher (``train.objectives: [mean_teacher]``): the teacher is the closed-form EMA of the student's weights
with the decay switching at ``rampup_iters``, it is never trained (no gradients, no optimizer state, outside DDP and
TrainStep's parameters), the consistency term (values, ramp-up, 0 for teacher = student without noise), the
unlabelled pass adds nothing but it, checkpoints carry the teacher, evaluation loads it, and the bad inputs.

Tiny SSLTM (tests/test_cli.py's TINY settings) on 32 px hand-built batches, with the reference backend.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_cli import TINY, config_file, log_records, train_cli
from torch.nn.parallel import DistributedDataParallel

from ssltm import build
from ssltm.build import build_model, model_from_checkpoint
from ssltm.checkpoint import load_checkpoint, load_weights
from ssltm.cli import main
from ssltm.config import ConfigError, config_differences, load_config
from ssltm.infer import load_predictor
from ssltm.objectives import MeanTeacher, TrainStep, build_objectives
from ssltm.objectives.mean_teacher import consistency_loss, ema_update
from ssltm.train import train

K = 6  # the synthetic videos' classes
SIZE = 32
MT = ["data.mode=sf", "train.objectives=[mean_teacher]"]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")


def mt_config(*overrides: str):
    return load_config(None, [*TINY, *MT, *overrides])


def tiny_run(*overrides: str, seed: int = 0) -> tuple[TrainStep, MeanTeacher]:
    cfg = mt_config(*overrides)
    torch.manual_seed(seed)
    model = build_model(cfg, K, pretrained=False)
    (objective,) = build_objectives(cfg, model)
    return TrainStep(model, [objective]), objective


def batch(seed: int = 0, b: int = 2, noise: bool = True) -> dict:
    """A labelled micro-batch and its unlabelled one (labels all 255; the strong copy brightened and scaled)."""
    gen = torch.Generator().manual_seed(seed)
    frames = lambda: torch.randn(b, 4, 3, SIZE, SIZE, generator=gen)  # noqa: E731  (query + 3 adjacent)
    reference = lambda: torch.randn(b, 3, SIZE, SIZE, generator=gen)  # noqa: E731
    clip = {"frames": frames(), "reference": reference(), "label": torch.full((b, SIZE, SIZE), 255)}
    strong = (lambda x: 1.3 * x + 0.4) if noise else (lambda x: x.clone())
    clip |= {"labeled": False, "frames_strong": strong(clip["frames"]), "reference_strong": strong(clip["reference"])}
    labels = torch.randint(0, K, (b, SIZE, SIZE), generator=gen)
    return {"frames": frames(), "reference": reference(), "label": labels, "unlabeled": clip}


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


# ------------------------------------------------------------------------------------------- the teacher
def test_teacher_is_the_closed_form_ema_of_the_student_with_the_decay_switching():
    """Three steps with rampup_iters 2: the updates after iterations 0 and 1 decay by alpha_rampup, the one after
    iteration 2 by alpha; the teacher equals the float64 EMA of the recorded student weights, its integer buffers
    are the student's."""
    a0, a1 = 0.5, 0.8  # far apart, so that a wrong switch shows
    decays = (f"train.mean_teacher.alpha_rampup={a0}", f"train.mean_teacher.alpha={a1}")
    step, mt = tiny_run("train.mean_teacher.rampup_iters=2", *decays)
    model = step.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    recorded = [float_state(model)]
    for t in range(3):
        step.train()
        step(batch(seed=t), t)["total"].backward()
        optimizer.step()
        optimizer.zero_grad()
        step.after_step(t)
        recorded.append(float_state(model))
    assert [mt.decay(t) for t in range(4)] == [a0, a0, a1, a1] and mt.updates == 3
    expected = recorded[0]
    for alpha, student in zip((a0, a0, a1), recorded[1:], strict=True):
        expected = {k: alpha * expected[k] + (1 - alpha) * student[k] for k in expected}
    teacher = float_state(mt.teacher)
    assert teacher.keys() == expected.keys()
    moved = 0
    for key, value in expected.items():
        torch.testing.assert_close(teacher[key], value, atol=1e-6, rtol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
        moved += not torch.allclose(value, recorded[-1][key])
    assert moved > len(expected) // 2  # the teacher lags the student: not a copy of it
    student_ints = {k: v for k, v in model.state_dict().items() if not v.is_floating_point()}
    assert student_ints and all(torch.equal(mt.teacher.state_dict()[k], v) for k, v in student_ints.items())
    # at least two training-mode passes per step: the labelled and the unlabelled one
    assert all(v >= 6 and v % 6 == 0 for k, v in student_ints.items() if k.endswith("num_batches_tracked"))


def test_ema_update_is_a_lerp_of_floats_and_a_copy_of_integers():
    teacher, student = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        student.weight.fill_(2.0)
        student.running_mean.fill_(-1.0)
    student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.75)
    assert torch.equal(teacher.weight, torch.full((3,), 0.75 * 1 + 0.25 * 2))
    assert torch.equal(teacher.running_mean, torch.full((3,), -0.25))
    assert teacher.num_batches_tracked == 7
    with pytest.raises(ValueError, match="not the student's"):
        ema_update(torch.nn.Linear(3, 3), student, 0.5)


def test_the_teacher_is_not_trained(tmp_path):
    """No gradients, no optimizer state, not among TrainStep's (so DDP's) parameters or state; a DDP step (one
    process, gloo) with the unlabelled pass inside its forward runs."""
    step, mt = tiny_run()
    teacher_ids = {id(p) for p in mt.teacher.parameters()}
    assert teacher_ids and not teacher_ids & {id(p) for p in step.model.parameters()}
    assert not any(p.requires_grad for p in mt.teacher.parameters()) and not mt.teacher.training
    assert "teacher" not in {name.split(".")[0] for name, _ in step.named_modules()}
    assert not teacher_ids & {id(p) for p in step.parameters()}
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(step)
        assert not teacher_ids & {id(p) for p in ddp.parameters()}
        storage = lambda module: {t.data_ptr() for t in module.state_dict().values() if t.numel()}  # noqa: E731
        assert not storage(mt.teacher) & storage(ddp)
        optimizer = torch.optim.SGD(step.model.parameters(), lr=0.1, momentum=0.9)
        losses = ddp(batch(), 0)
        assert list(losses) == list(step.loss_terms) and step.loss_terms[-2:] == ("consistency", "total")
        losses["total"].backward()
        optimizer.step()
    finally:
        torch.distributed.destroy_process_group()
    assert all(p.grad is None for p in mt.teacher.parameters())
    assert any(p.grad is not None for p in step.model.parameters())
    state_ids = {id(p) for p in optimizer.state}
    assert state_ids and not state_ids & teacher_ids


def _update_on_two_processes(rank: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        mt = MeanTeacher(mt_config("train.mean_teacher.alpha_rampup=0.5"), student)
        with torch.no_grad():
            student[1].running_mean.fill_(rank + 1.0)  # each process's own statistics, as under DDP without SyncBN
            student[0].weight.add_(1.0)
        student[1].num_batches_tracked.fill_(5 + rank)
        mt.after_step(student, 0)
        torch.save(mt.teacher.state_dict(), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_every_process_holds_the_first_processs_teacher(tmp_path):
    """Two gloo processes whose students differ in their batch norm statistics: after the update both teachers are
    the first process's (parameters, float and integer buffers)."""
    out = tmp_path / "teacher"
    torch.multiprocessing.spawn(_update_on_two_processes, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    first, second = (torch.load(f"{out}.{rank}") for rank in (0, 1))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(first["1.running_mean"], torch.full((4,), 0.5 * 0 + 0.5 * 1.0))
    assert first["1.num_batches_tracked"] == 5


# ------------------------------------------------------------------------------------ the consistency term
def test_consistency_is_zero_for_teacher_equal_to_student_without_noise():
    step, _ = tiny_run("train.mean_teacher.rampup_iters=0")
    step.eval()  # the student as the teacher runs (batch norm's running statistics, no dropout)
    assert step(batch(noise=False), 5)["consistency"] == 0
    assert step(batch(noise=True), 5)["consistency"] > 0


def test_consistency_values():
    # (K, pixels) = (3, 2): pixel 0 scores (0, 2, 0) and (5, 0, 0), pixel 1 (1, 0, 0) and (0, 0, 0)
    student = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]).reshape(1, 3, 1, 2)
    teacher = torch.tensor([[5.0, 0.0], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 3, 1, 2)

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    s = [softmax([0, 2, 0]), softmax([1, 0, 0])]
    t = [softmax([5, 0, 0]), softmax([0, 0, 0])]
    mse = sum((a - b) ** 2 for p, q in zip(s, t, strict=True) for a, b in zip(p, q, strict=True)) / 6
    assert consistency_loss(student, teacher, "mse").item() == pytest.approx(mse, rel=1e-6)
    # ce: pixel 0's teacher is confident (class 0, p = 0.987), pixel 1's is not (1/3)
    assert consistency_loss(student, teacher, "ce", 0.95).item() == pytest.approx(-math.log(s[0][0]), rel=1e-6)
    both = -(math.log(s[0][0]) + math.log(s[1][0])) / 2  # ties: argmax takes the first class
    assert consistency_loss(student, teacher, "ce", 0.3).item() == pytest.approx(both, rel=1e-6)
    nothing = student.clone().requires_grad_()
    loss = consistency_loss(nothing, teacher, "ce", 0.999)
    loss.backward()
    assert loss == 0 and torch.equal(nothing.grad, torch.zeros_like(student))
    with pytest.raises(ValueError, match="kind must be one of"):
        consistency_loss(student, teacher, "kl")


def test_unlabelled_clips_add_the_consistency_only():
    """The student's unlabelled pass (all-ignore labels) gives sup = aux = mse = 0 with a zero gradient; the step's
    total is the labelled pass's plus the weighted consistency (here at r(t) = 1)."""
    step, mt = tiny_run("train.mean_teacher.rampup_iters=0", "train.mean_teacher.weight=3")
    step.eval()  # deterministic passes (no dropout), so that they can be repeated
    data = batch()
    clip = data["unlabeled"]
    out = step.model(clip["frames_strong"], clip["reference_strong"], clip["label"])
    unlabelled = {k: out["losses"][k] for k in ("sup", "aux", "mse")}
    assert all(v == 0 for v in unlabelled.values()), unlabelled
    sum(unlabelled.values()).backward()
    grads = [p.grad for p in step.model.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    losses = step(data, 9)
    labelled = step.model(data["frames"], data["reference"], data["label"])["losses"]
    with torch.no_grad():
        target = mt.teacher(clip["frames"], clip["reference"])["logits"]
    consistency = 3 * consistency_loss(out["logits"], target)
    assert losses["consistency"].item() == pytest.approx(consistency.item(), rel=1e-6)
    assert losses["total"].item() == pytest.approx((labelled["total"] + consistency).item(), rel=1e-6)
    mt.rampup_iters = 4  # at iteration 2 of a 4-iteration ramp-up: r = exp(-5 / 4)
    ramped = step(data, 2)["consistency"].item()
    assert ramped == pytest.approx(math.exp(-1.25) * consistency.item(), rel=1e-6)


# ----------------------------------------------------------------------------- checkpoints and evaluation
def test_checkpoint_state_restore_and_evaluated_weights(tmp_path):
    step, mt = tiny_run()
    with torch.no_grad():
        for p in mt.teacher.parameters():
            p.add_(0.5)
    mt.updates = 4
    cfg = mt_config()
    state = mt.checkpoint_state()
    assert state["teacher_updates"] == 4
    ckpt = {"model": step.model.state_dict(), **state, "meta": {"num_classes": K}, "config": None}
    path = tmp_path / "iter_4.pt"
    plain = build_model(cfg, K, pretrained=False)
    load_weights(plain, {"model": ckpt["teacher"]}, path)  # a plain state_dict of the same model
    # evaluation loads the teacher (eval_model teacher, the default), which differs from the student
    evaluated = model_from_checkpoint(cfg, ckpt, path).state_dict()
    teacher, student = ckpt["teacher"], ckpt["model"]
    assert all(torch.equal(evaluated[k], teacher[k]) for k in teacher)
    assert not all(torch.equal(teacher[k], student[k]) for k in student)
    evaluated = model_from_checkpoint(mt_config("train.mean_teacher.eval_model=student"), ckpt, path).state_dict()
    assert all(torch.equal(evaluated[k], student[k]) for k in student)
    assert mt.eval_model() is mt.teacher and step.eval_model() is mt.teacher
    _, student_mt = tiny_run("train.mean_teacher.eval_model=student")
    assert student_mt.eval_model() is None
    # restore
    _, fresh = tiny_run(seed=1)
    fresh.restore(ckpt, path)
    assert fresh.updates == 4
    assert all(torch.equal(v, teacher[k]) for k, v in fresh.teacher.state_dict().items())
    without = {k: v for k, v in ckpt.items() if k != "teacher"}
    with pytest.raises(ValueError, match=rf"checkpoint {path} has no Mean Teacher state \['teacher'\]"):
        fresh.restore(without, path)
    with pytest.raises(ValueError, match=rf"checkpoint {path} has no Mean Teacher weights"):
        model_from_checkpoint(cfg, without, path)


# -------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "override, match",
    [
        ("alpha=1.0", r"train.mean_teacher.alpha must be in \(0, 1\), got 1.0"),
        ("alpha=0", r"train.mean_teacher.alpha must be in \(0, 1\), got 0"),
        ("alpha_rampup=-0.5", r"train.mean_teacher.alpha_rampup must be in \(0, 1\), got -0.5"),
        ("weight=-1", r"train.mean_teacher.weight must be >= 0, got -1"),
        ("rampup_iters=-1", r"train.mean_teacher.rampup_iters must be >= 0"),
        ("consistency=kl", r"train.mean_teacher.consistency must be one of \('mse', 'ce'\), got 'kl'"),
        ("confidence=1.5", r"train.mean_teacher.confidence must be in \[0, 1\]"),
        ("eval_model=ema", r"train.mean_teacher.eval_model must be one of \('teacher', 'student'\), got 'ema'"),
    ],
)
def test_bad_settings_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        mt_config(f"train.mean_teacher.{override}")


def test_table7_config():
    """configs/table7/ssltm_mt.yaml is configs/vspw_r101.yaml (VSPW-SF) with mean_teacher; its header names the row."""
    root = Path(__file__).resolve().parents[1] / "configs"
    path = root / "table7" / "ssltm_mt.yaml"
    header = path.read_text().splitlines()[:3]
    assert "SSLTM Table 7" in header[0] and "+Mean Teacher" in header[0]
    assert "40.49 mIoU, 61.20 FWIoU, 74.69 TC, 87.40 mVC8, 83.72 mVC16" in header[0]
    assert "SSLTM alone: 39.79 / 60.75 / 72.14 / 87.25 / 83.10" in header[1]
    cfg, base = OmegaConf.to_container(load_config(path)), OmegaConf.to_container(load_config(root / "vspw_r101.yaml"))
    assert cfg["train"]["objectives"] == ["mean_teacher"] and cfg["data"]["mode"] == "sf"
    assert cfg["train"]["mean_teacher"] == {
        **base["train"]["mean_teacher"],
        **{"weight": 100.0, "rampup_iters": 4000, "alpha_rampup": 0.99, "alpha": 0.999, "eval_model": "teacher"},
    }
    differ = config_differences(base, cfg)
    assert differ == ["train.objectives", "work_dir"]


# ---------------------------------------------------------------------------------- data and the whole run
def test_mean_teacher_needs_unlabelled_frames(tmp_path):
    for overrides in (["data.mode=full"], ["data.dataset=camvid"], ["data.dataset=vspw", "data.mode=full"]):
        with pytest.raises(ConfigError, match=r"train.objectives 'mean_teacher' needs unlabelled training frames"):
            mt_config(*overrides)
    with pytest.raises(ConfigError, match=r"data.dataset 'vspw' with data.mode 'full'"):
        mt_config("data.dataset=vspw", "data.mode=full")


def test_training_run_checkpoints_and_evaluates_the_teacher(tmp_path, monkeypatch):
    """ssltm train with mean_teacher logs the consistency term and checkpoints the teacher; ssltm eval and
    load_predictor load the teacher's weights (not the student's; the student with eval_model student); resuming a
    mean_teacher run from a checkpoint without a teacher names the file."""
    work = tmp_path / "run"
    common = [*MT, "train.batch_size=2", "train.validate=false"]
    assert train_cli(tmp_path, work, *common, "train.max_iters=2", "train.mean_teacher.rampup_iters=0") == 0
    ckpt = load_checkpoint(work / "latest.pt")
    assert ckpt["teacher_updates"] == 2 and ckpt["teacher"].keys() == ckpt["model"].keys()
    for r in (r for r in log_records(work) if "total" in r):
        assert r["consistency"] > 0
        assert r["total"] == pytest.approx(r["sup"] + r["mse"] + 0.5 * r["aux"] + r["consistency"], rel=1e-4)
    loaded = []
    real = build.model_from_checkpoint
    monkeypatch.setattr(build, "model_from_checkpoint", lambda *a: loaded.append(real(*a)) or loaded[-1])
    args = ["eval", config_file(tmp_path), "--set", *TINY, "eval.tc=false", "eval.mvc=[]"]
    assert main([*args, "--checkpoint", str(work / "latest.pt")]) == 0
    # ssltm infer / export / load_predictor: load_model, the same place; the student on request
    student = load_predictor(work / "latest.pt", "cpu", overrides=["train.mean_teacher.eval_model=student"]).model
    inferred = load_predictor(work / "latest.pt", "cpu").model
    for state in (loaded[0].state_dict(), inferred.state_dict()):
        assert all(torch.equal(state[k], v) for k, v in ckpt["teacher"].items())
        assert not all(torch.equal(state[k], v) for k, v in ckpt["model"].items())
    assert all(torch.equal(student.state_dict()[k], v) for k, v in ckpt["model"].items())
    # a plain run's checkpoint: resuming it with mean_teacher is an error naming the file
    plain = tmp_path / "plain"
    assert train_cli(tmp_path, plain, "train.batch_size=2", "train.validate=false", "train.max_iters=1") == 0
    with pytest.raises(ValueError, match=rf"checkpoint {plain / 'latest.pt'} has no Mean Teacher state"):
        train(
            load_config(None, [*TINY, *common, "train.max_iters=2", f"work_dir={tmp_path / 'r'}"]), plain / "latest.pt"
        )
