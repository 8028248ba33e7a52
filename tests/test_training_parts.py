"""The parts under the command line: data order, held-out frames, merged metrics, config,
mixed precision and which modules the trainer's users load."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import ssltm.build
import ssltm.evaluate
import ssltm.infer
import ssltm.train
from ssltm.checkpoint import load_checkpoint
from ssltm.config import ConfigError, load_config
from ssltm.data import CamVid, hold_out
from ssltm.metrics import VideoMetrics
from ssltm.outputs import check_output_file, check_output_folder, staged_folder
from ssltm.precision import amp_dtype, autocast
from ssltm.train import ClipOrder, _trim_log

REPO = Path(__file__).resolve().parents[1]


def take(order: ClipOrder, micro_batches: int) -> list[list[tuple[int, int]]]:
    return list(itertools.islice(iter(order), micro_batches))


@pytest.mark.parametrize(("world_size", "grad_accum"), [(1, 1), (1, 3), (2, 1), (3, 2)])
def test_clip_order_shards_each_global_batch(world_size, grad_accum):
    indices = list(range(100, 137))  # 37 clips, batch 6: 6 iterations per epoch, one clip left out per epoch
    batch, iters = 6, 14
    per_rank = [
        take(ClipOrder(indices, batch, grad_accum, world_size, rank, seed=5, start=0), iters * grad_accum)
        for rank in range(world_size)
    ]
    single = take(ClipOrder(indices, batch, 1, 1, 0, seed=5, start=0), iters)
    for it in range(iters):
        union = [
            item
            for rank in range(world_size)
            for a in range(grad_accum)
            for item in per_rank[rank][it * grad_accum + a]
        ]
        assert sorted(union) == sorted(single[it])  # the same global batch, however it is cut
        assert all(len(per_rank[r][it * grad_accum]) == batch // (world_size * grad_accum) for r in range(world_size))
    # an epoch draws each clip at most once, and epochs differ in order
    epoch0 = [i for b in single[:6] for e, i in b if e == 0]
    epoch1 = [i for b in single[6:12] for e, i in b if e == 1]
    assert len(set(epoch0)) == 36 and set(epoch0) <= set(indices) and epoch0 != epoch1
    # starting at iteration k gives what skipping k iterations gives (exact resume)
    resumed = take(ClipOrder(indices, batch, 1, 1, 0, seed=5, start=9), iters - 9)
    assert resumed == single[9:]


def test_clip_order_needs_a_full_batch():
    with pytest.raises(ConfigError, match="train.batch_size=8 is more than the 5 training clips"):
        ClipOrder(range(5), 8, 1, 1, 0, seed=0, start=0)


def write_camvid(root: Path, stems: list[str]) -> None:
    for folder in ("train", "trainannot"):
        (root / folder).mkdir(parents=True)
    for n, stem in enumerate(stems):
        Image.fromarray(np.full((8, 8, 3), n, np.uint8)).save(root / "train" / f"{stem}.png")
        Image.fromarray(np.full((8, 8), n % 11, np.uint8)).save(root / "trainannot" / f"{stem}.png")


def test_hold_out_cuts_every_video(tmp_path):
    # two sequences: A with 10 frames, B with 3 frames and then a gap that makes a one-frame video
    stems = [f"A_{30 * i:05d}" for i in range(10)] + [f"B_{30 * i:05d}" for i in range(3)] + ["B_09000"]
    write_camvid(tmp_path, stems)
    kwargs = {"offsets": (1, 2), "reference": "farthest"}
    full = CamVid(tmp_path, **kwargs)
    train = hold_out(CamVid(tmp_path, **kwargs), 0.2, "train")
    held = hold_out(CamVid(tmp_path, **kwargs), 0.2, "holdout")
    frames = lambda ds: {ds.frame_id(v, t) for v, t in ds.queries}
    assert frames(train) | frames(held) == frames(full) and not frames(train) & frames(held)
    assert sorted(frames(held)) == ["A_00240", "A_00270", "B_00060"]  # round(0.2 * 10) = 2, max(1, ...) = 1
    assert [v.name for v in train.videos] == ["A", "B-0", "B-1"] and [v.name for v in held.videos] == ["A", "B-0"]
    # a training clip's frames and reference all come from the training part
    for i in range(len(train)):
        video, query = train.queries[i]
        length = train.video_length(video)
        used = (query, *train.sampler.adjacent(query, length), train.sampler.reference_index(query, length))
        assert {train.frame_id(video, t) for t in used} <= frames(train)
    assert held[0]["frame"] == "A_00240" and held[0]["label"].shape == (8, 8)
    with pytest.raises(ValueError, match="fraction must be in"):
        hold_out(full, 1.0, "train")


def test_video_metrics_merge_equals_one_evaluation():
    rng = np.random.default_rng(0)
    videos = []
    for length in (20, 18, 5):
        # labels that mostly persist from frame to frame, so that mVC has windows to score
        gt = np.where(rng.random((length, 12, 10)) < 0.97, rng.integers(0, 4, (12, 10)), 0)
        pred = np.where(rng.random(gt.shape) < 0.9, gt, rng.integers(0, 4, gt.shape))
        frames = rng.integers(0, 255, (length, 12, 10), dtype=np.uint8)
        videos.append((pred, gt, frames))
    zero_flow = lambda a, b: np.zeros((*a.shape[:2], 2), np.float32)
    whole, first, second = (VideoMetrics(4, flow=zero_flow) for _ in range(3))
    for v, (pred, gt, frames) in enumerate(videos):
        whole.update(v, pred, gt, frames)
        (first if v < 2 else second).update(v, pred, gt, frames)
    first.merge(second)
    merged, expected = first.compute(), whole.compute()
    assert merged.pop("per_class") == pytest.approx(expected.pop("per_class"))
    assert merged == pytest.approx(expected) and 0 < merged["mVC16"] < 1
    with pytest.raises(ValueError, match="both hold video"):
        first.merge(second)
    with pytest.raises(ValueError, match="different settings"):
        first.merge(VideoMetrics(5))


def test_config_files_load(tmp_path):
    root = Path(__file__).resolve().parents[1] / "configs"
    vspw = load_config(root / "vspw_r101.yaml")
    assert (vspw.data.crop_size, vspw.train.batch_size, vspw.train.epochs, vspw.train.lr) == ([479, 479], 8, 120, 0.002)
    assert vspw.model.backbone == "resnet101" and vspw.train.momentum == 0.9 and vspw.train.weight_decay == 1e-4
    city = load_config(root / "cityscapes_r50.yaml")
    assert (city.data.crop_size, city.train.batch_size, city.train.epochs) == ([512, 1024], 8, 100)
    assert city.model.backbone == "resnet50"
    assert load_config(root / "camvid.yaml").data.val_split == "holdout"
    demo = load_config("demo", ["train.max_minutes=0.5"])  # a bare name is looked up in configs/
    assert demo.train.max_minutes == 0.5 and demo.data.dataset == "synthetic"
    keys = ["data.dataset", "data.root", "data.train_split", "data.val_split", "data.crop_size", "data.offsets"]
    keys += ["model.backbone", "model.pretrained", "model.use_stt", "model.use_rfce", "model.use_gcc"]
    keys += ["train.batch_size", "train.lr", "train.max_iters", "train.max_minutes", "train.checkpoint_every"]
    keys += ["train.seed", "work_dir"]
    values = ["camvid", "/x", "a", "b", "[7,9]", "[2,4]", "resnet50", "/w.pth", "false", "false", "false"]
    values += ["16", "0.1", "7", "3.5", "5", "11", "/tmp/w"]
    cfg = load_config(root / "vspw_r101.yaml", [f"{k}={v}" for k, v in zip(keys, values, strict=True)])
    assert cfg.data.root == "/x" and cfg.data.crop_size == [7, 9] and cfg.data.offsets == [2, 4]
    assert cfg.model.pretrained == "/w.pth" and not cfg.model.use_gcc and cfg.train.max_minutes == 3.5
    assert (cfg.train.batch_size, cfg.train.max_iters, cfg.train.seed, cfg.work_dir) == (16, 7, 11, "/tmp/w")


def test_config_over_a_checkpoints_config():
    stored = load_config(None, ["model.backbone=resnet50", "data.eval_size=240", "train.lr=0.5"])
    stored = OmegaConf.to_container(stored)
    cfg = load_config("demo", ["train.lr=0.1"], base=stored)
    # the file's keys (demo.yaml sets model.backbone and crop_size, not eval_size), then --set, over the stored ones
    assert (cfg.model.backbone, cfg.data.crop_size, cfg.data.eval_size) == ("resnet18", [64, 64], 240)
    assert cfg.train.lr == 0.1
    with pytest.raises(ConfigError, match="checkpoint config: unknown config key 'train.speed'"):
        load_config(None, base={"train": {"speed": 1}})


def write_bad_checkpoints(folder: Path) -> dict[str, str]:
    """Files that are not checkpoints, and what their error says in brackets."""
    torch.save({"model": {}, "config": {}}, folder / "state.pt")
    data = (folder / "state.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    (folder / "empty.pt").write_bytes(b"")
    (folder / "text.pt").write_text("hello")
    torch.save(torch.nn.Linear(2, 2), folder / "module.pt")
    torch.save(torch.nn.Linear(2, 2).state_dict(), folder / "weights.pt")
    return {
        "truncated.pt": "a truncated or damaged file",
        "empty.pt": "an empty file",
        "text.pt": "not a file torch.save wrote",
        "module.pt": "it holds Python objects besides tensors and plain values",
        "weights.pt": "a dict without ['model', 'config', 'meta']",
        "state.pt": "a dict without ['meta']",
    }


def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(tmp_path):
    for name, reason in write_bad_checkpoints(tmp_path).items():
        with pytest.raises(ValueError) as info:
            load_checkpoint(tmp_path / name)
        assert str(info.value).startswith(f"not an ssltm checkpoint: {tmp_path / name} ({reason}")
        assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    with pytest.raises(ValueError, match=r"not an ssltm checkpoint to resume from: .* without \['optimizer'"):
        torch.save({"model": {}, "config": {}, "meta": {}}, tmp_path / "weights_only.pt")
        load_checkpoint(tmp_path / "weights_only.pt", training=True)


def test_trim_log_keeps_the_records_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"iter": 1, "total": 1.0}, {"iter": 2, "total": 0.5}, {"iter": 2, "val": {}}, {"iter": 3, "total": 0.4}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iter": 4, "tot')  # killed mid-line
    _trim_log(log, 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == records[:3]
    _trim_log(tmp_path / "none.jsonl", 2)  # no log: nothing to do
    assert not (tmp_path / "none.jsonl").exists()


def test_outputs_checked_and_staged(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert check_output_file(tmp_path / "new" / "deeper" / "m.json", "--out") == tmp_path / "new" / "deeper" / "m.json"
    assert not (tmp_path / "new").exists()  # checked, not created
    with pytest.raises(ValueError, match=f"--out: cannot create {a_file / 'm.json'}: {a_file} is a file, not a folder"):
        check_output_file(a_file / "m.json", "--out")
    with pytest.raises(ValueError, match=f"--save-predictions: {a_file} is a file, not a folder"):
        check_output_folder(a_file, "--save-predictions")
    target = tmp_path / "out"
    with pytest.raises(KeyError), staged_folder(target) as staging:
        (staging / "half.png").write_text("written")
        raise KeyError("fails midway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing half written, nothing left over
    for text in ("first", "second"):
        with staged_folder(target) as staging:
            (staging / "a.txt").write_text(text)
        assert [(p.name, p.read_text()) for p in target.iterdir()] == [("a.txt", text)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_amp_dtype_and_autocast():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    modes = ("auto", "bf16", "fp16", "off")
    assert [amp_dtype(mode, cpu) for mode in modes] == [None, torch.bfloat16, torch.float16, None]
    assert amp_dtype("auto", gpu) is torch.bfloat16 and amp_dtype("off", gpu) is None
    with autocast(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16
    with autocast(cpu, None):
        assert not torch.is_autocast_enabled("cpu")
    # the names' earlier homes still export them
    assert ssltm.train.amp_dtype is amp_dtype and ssltm.train.autocast is autocast
    assert ssltm.evaluate.autocast is autocast and ssltm.infer.load_model is ssltm.build.load_model


def test_evaluation_inference_and_demo_load_without_the_trainer():
    code = (
        "import importlib, sys\n"
        "for name in ('ssltm.evaluate', 'ssltm.infer', 'ssltm.demo'):\n"
        "    importlib.import_module(name)\n"
        "    assert 'ssltm.train' not in sys.modules, f'{name} loads ssltm.train'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
