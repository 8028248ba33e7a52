"""What a training run records besides its checkpoints: TensorBoard events (``train.tensorboard``), the console
messages in ``train.log``, and which ImageNet weights file the backbone started from. Tiny runs, as in
tests/test_cli.py, whose helpers these tests use."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import SessionLog
from test_cli import _reference_backend, log_records, train_cli  # noqa: F401 (autouse fixture: reference kernels)
from torch.utils.tensorboard import SummaryWriter
from torchvision.models import resnet18

from ssltm.checkpoint import load_checkpoint
from ssltm.cli import EXIT_ERROR
from ssltm.model import ResNetTrunk
from ssltm.train import Trainer

# 4 validation frames of 32 px shown twice as large in rows of frames / ground truth / prediction
LOSS_TERMS = ("sup", "mse", "aux", "total")  # the loss_terms of SSLTM with STT
PICTURE_WIDTH = 4 * (2 * 32 + 4) - 4
GRID_HEIGHT = 3 * (14 + 2 * 32 + 4)
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "  # each train.log record starts with its time


def board(work: Path) -> EventAccumulator:
    events = EventAccumulator(str(work / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def steps(events: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def test_tensorboard_and_train_log_of_a_run_and_its_resume(tmp_path, capsys):
    work = tmp_path / "run"
    common = ["train.max_iters=3", "train.batch_size=2", "train.checkpoint_every=2", "train.val_every=0"]
    common += ["train.tensorboard=true", "eval.tc=false"]
    assert train_cli(tmp_path, work, *common) == 0
    events = board(work)
    val_keys = ("mIoU", "FWIoU", "mVC8", "mVC16", "aAcc", "mAcc")
    expected = {*(f"loss/{k}" for k in LOSS_TERMS), "train/lr", "train/it_per_s", *(f"val/{k}" for k in val_keys)}
    assert set(events.Tags()["scalars"]) == expected
    records = log_records(work)
    logged = [r for r in records if "total" in r]
    for key in LOSS_TERMS:
        assert steps(events, f"loss/{key}") == [1, 2, 3]
        assert [e.value for e in events.Scalars(f"loss/{key}")] == pytest.approx([r[key] for r in logged], abs=1e-5)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in logged])
    it_per_s = [e.value for e in events.Scalars("train/it_per_s")]
    assert it_per_s == pytest.approx([1 / r["s_per_iter"] for r in logged], rel=1e-3)
    val = next(r["val"] for r in records if "val" in r)
    for key in val_keys:
        assert [(e.step, e.value) for e in events.Scalars(f"val/{key}")] == [(3, pytest.approx(val[key]))]
    (image,) = events.Images("val/predictions")
    assert image.step == 3 and image.width == PICTURE_WIDTH and image.height > GRID_HEIGHT

    log = (work / "train.log").read_text()
    first = log.splitlines()
    assert re.fullmatch(TIME + f"training {work}: .* from iteration 0", first[0])
    assert re.search(TIME + r"iteration 3: val mIoU [\d.]+ \(best\)\n" + TIME + "validation at iteration 3:\n", log)
    table = log[log.index("validation at iteration 3:") :].splitlines()[1]
    assert table.split() == ["|", *" | ".join(["mIoU", "FWIoU", "mVC8", "mVC16", "aAcc", "mAcc"]).split(), "|"]
    assert first[-1].endswith(f"finished at iteration 3; checkpoint {work / 'iter_3.pt'}")
    printed = capsys.readouterr().out
    assert f"training {work}" in printed and "iteration 3: val mIoU" in printed
    assert "validation at iteration" not in printed and "| mIoU" not in printed  # the tables are the file's

    # As if killed after iter_2.pt: the resumed run hides the events from iteration 3 on and writes them again.
    assert train_cli(tmp_path, work, *common, resume=str(work / "iter_2.pt")) == 0
    files = sorted((work / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 2
    restarts = [e.step for e in EventFileLoader(str(files[1])).Load() if e.session_log.status == SessionLog.START]
    assert restarts == [3]  # purge_step: TensorBoard drops the killed run's events from step 3 on
    events = board(work)
    for tag in expected:
        assert steps(events, tag) == ([3] if tag.startswith("val/") else [1, 2, 3]), tag
    assert [e.step for e in events.Images("val/predictions")] == [3]

    log = (work / "train.log").read_text()
    assert log.startswith("\n".join(first) + "\n")  # appended
    resumed = log.splitlines()[len(first) :]
    assert re.fullmatch(TIME + f"resumed from {work / 'iter_2.pt'} at iteration 2", resumed[0])
    assert re.fullmatch(TIME + f"training {work}: .* from iteration 2", resumed[1])
    assert re.fullmatch(TIME + r"iteration 3: val mIoU [\d.]+ \(best\)", resumed[2])  # iter_2.pt holds no validation
    assert resumed[-1].endswith(f"finished at iteration 3; checkpoint {work / 'iter_3.pt'}")
    assert f"resumed from {work / 'iter_2.pt'} at iteration 2" in capsys.readouterr().out


def test_overwrite_moves_the_log_and_events_aside_and_keeps_the_message_before_the_log(tmp_path, capsys):
    work = tmp_path / "run"
    common = ["train.max_iters=1", "train.batch_size=2", "train.validate=false"]
    assert train_cli(tmp_path, work, *common) == 0
    assert not (work / "tb").exists()  # TensorBoard is off by default
    assert train_cli(tmp_path, work, *common, "train.tensorboard=true") == EXIT_ERROR  # a run is there
    assert train_cli(tmp_path, work, *common, "train.tensorboard=true", "--overwrite") == 0  # a flag after --set
    (old,) = work.glob("old-*")
    assert {p.name for p in old.iterdir()} >= {"train.log", "log.jsonl", "iter_1.pt"}
    earlier = (old / "train.log").read_text()
    assert "moved the earlier run" not in earlier and "finished at iteration 1" in earlier
    assert train_cli(tmp_path, work, *common, "--overwrite") == 0
    (older,) = set(work.glob("old-*")) - {old}
    assert len(list((older / "tb").glob("events.out.tfevents.*"))) == 1  # the events went with their run
    assert not (work / "tb").exists()
    # said before the work dir was open, the move still heads the new run's log, and only it
    lines = (work / "train.log").read_text().splitlines()
    assert re.fullmatch(TIME + rf"moved the earlier run's \d+ files in {work} to {older}", lines[0])
    assert re.fullmatch(TIME + f"training {work}: .* from iteration 0", lines[1])
    assert len(lines) == 3 and "finished at iteration 1" in lines[2]
    assert f"to {older}" in capsys.readouterr().out


def test_missing_tensorboard_is_a_config_error_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    work = tmp_path / "run"
    assert train_cli(tmp_path, work, "train.max_iters=1", "train.batch_size=2", "train.tensorboard=true") == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ssltm train: error: train.tensorboard needs the tensorboard")
    assert err.rstrip().endswith("pip install ssltm[tensorboard]")
    assert not work.exists()  # nothing written


def test_events_and_log_are_flushed_when_the_run_is_stopped_at_once(tmp_path, monkeypatch):
    """A second Ctrl-C stops at once (KeyboardInterrupt): what was logged so far is on disk, and the log says
    how the run ended."""
    step = Trainer._train_step

    def interrupted(self, *args, **kwargs):
        if self.state.iteration == 2:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    closed = []
    close = SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, "close", lambda self: closed.append(self.log_dir) or close(self))
    work = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_cli(tmp_path, work, "train.max_iters=4", "train.batch_size=2", "train.tensorboard=true")
    assert closed == [str(work / "tb")]
    assert steps(board(work), "loss/total") == [1, 2]
    assert (work / "train.log").read_text().splitlines()[-1].endswith("stopped by KeyboardInterrupt")


def resnet18_file(path: Path) -> tuple[Path, str]:
    torch.save(resnet18(weights=None).state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_backbone_weights_file_and_its_hash_are_logged(tmp_path, capsys):
    path, sha = resnet18_file(tmp_path / "resnet18-0badc0de.pth")  # a name that gives another hash
    assert not sha.startswith("0badc0de")
    work = tmp_path / "run"
    common = ["train.max_iters=1", "train.batch_size=2", "train.validate=false"]
    assert train_cli(tmp_path, work, *common, f"model.pretrained={path}") == 0
    said = f"backbone ImageNet weights: {path} (SHA-256 {sha[:8]}...)"
    warning = f"warning: the name of {path} gives the hash 0badc0de but its content hashes to {sha[:8]}...: "
    out, err = capsys.readouterr()
    assert said in out and warning in err and "warning" not in out
    log = (work / "train.log").read_text()
    assert said in log and warning in log
    assert load_checkpoint(work / "latest.pt")["meta"]["pretrained"] == {
        "path": str(path),
        "sha256": sha,
        "name_hash": "0badc0de",
    }
    # resumed, the run says nothing more about the weights (they come from the checkpoint), and its
    # checkpoints keep naming the file the run started from
    common[0] = "train.max_iters=2"
    assert train_cli(tmp_path, work, *common, f"model.pretrained={path}", resume=str(work / "latest.pt")) == 0
    assert "backbone ImageNet weights" not in capsys.readouterr().out
    assert load_checkpoint(work / "iter_2.pt")["meta"]["pretrained"]["sha256"] == sha
    assert train_cli(tmp_path, tmp_path / "scratch", *common) == 0
    assert load_checkpoint(tmp_path / "scratch" / "latest.pt")["meta"]["pretrained"] is None


@pytest.mark.parametrize("name", ["right", "resnet18.pth"])
def test_a_name_with_the_right_hash_or_none_gives_no_warning(tmp_path, name):
    path, sha = resnet18_file(tmp_path / "weights.pth")
    path = path.rename(tmp_path / (f"resnet18-{sha[:8]}.pth" if name == "right" else name))
    source = ResNetTrunk("resnet18", path).pretrained_source
    assert (source.path, source.sha256, source.prefix) == (str(path), sha, sha[:8])
    assert source.name_hash == (sha[:8] if name == "right" else None)
    assert source.mismatch() is None
    assert ResNetTrunk("resnet18").pretrained_source is None
