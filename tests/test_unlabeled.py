"""Unlabelled clips (``ssltm.data.UnlabeledClips``), the ``"labeled"`` flag, ``data.mode: sf`` on the synthetic
videos, the strong reference view (mmseg's PhotoMetricDistortion) and the trainer's unlabelled micro-batches."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_cli import TINY, config_file
from test_folder_dataset import LENGTH, folder_settings, make_folder, write_video
from torch.utils.data import default_collate

from ssltm.build import build_dataset, build_unlabeled_dataset
from ssltm.config import ConfigError, load_config, require_unlabeled_frames
from ssltm.data import (
    DATASETS,
    Photometric,
    SyntheticVideos,
    UnlabeledClips,
    photometric_distortion,
    train_transform,
)
from ssltm.distributed import DistEnv
from ssltm.objectives import OBJECTIVES, Objective
from ssltm.runlog import RunLog
from ssltm.train import UNLABELED_SEED_OFFSET, ClipOrder, Trainer

FRAMES = 6


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")


def synthetic(mode: str = "sf", **kwargs) -> SyntheticVideos:
    """3 videos of 6 frames, 32 px; videos 0 and 1 are the split."""
    return SyntheticVideos(
        num_videos=3, num_frames=FRAMES, size=32, seed=1, query_videos=[0, 1], offsets=(1, 2), mode=mode, **kwargs
    )


def test_unlabeled_clips_are_the_frames_that_are_no_labelled_query():
    sf, full = synthetic("sf"), synthetic("full", reference="farthest")
    assert sf.queries == [(0, 0), (1, 0)]
    unlabeled = UnlabeledClips(synthetic("sf", reference="farthest"))
    assert unlabeled.queries == [(v, t) for v in (0, 1) for t in range(1, FRAMES)]
    assert len(unlabeled) == 2 * (FRAMES - 1) and sf.has_unlabeled_frames and not full.has_unlabeled_frames
    for i, (video, query) in enumerate(unlabeled.queries):
        sample, labelled = unlabeled[i], full[full.queries.index((video, query))]
        assert sample.keys() == labelled.keys()
        assert sample["labeled"] is False and labelled["labeled"] is True
        assert sample["label"].dtype == torch.int64 and bool((sample["label"] == 255).all())
        assert not bool((labelled["label"] == 255).all())
        # The same clip as the labelled sample of that frame: query, adjacent frames, reference.
        assert (
            (sample["video"], sample["frame"])
            == (labelled["video"], labelled["frame"])
            == (
                f"synthetic_{video}",
                f"{query:05d}",
            )
        )
        assert torch.equal(sample["frames"], labelled["frames"])
        assert torch.equal(sample["reference"], labelled["reference"])
    batch = default_collate([sf[0], unlabeled[0]])
    assert batch["labeled"].tolist() == [True, False]


def test_unlabeled_clips_are_augmented_like_labelled_ones_and_seeded_apart():
    dataset = synthetic("sf", transform=train_transform(24, (0.75, 1.5)))
    unlabeled = UnlabeledClips(dataset)
    first = unlabeled[3]
    # 255 made before the transform: scaling, padding and cropping keep it 255 everywhere.
    assert first["frames"].shape == (3, 3, 24, 24) and bool((first["label"] == 255).all())
    assert all(torch.equal(first[k], unlabeled[3][k]) for k in ("frames", "reference"))
    dataset.set_epoch(5)  # the labelled set's epoch is not the unlabelled clips'
    assert torch.equal(first["frames"], unlabeled[3]["frames"])
    unlabeled.set_epoch(1)
    assert not torch.equal(first["frames"], unlabeled[3]["frames"])
    # Not the draws of labelled sample 3: the same frame queried in "full" mode, epoch 0, index 3 of its own.
    full = synthetic("full", transform=train_transform(24, (0.75, 1.5)))
    assert full.queries[3] != unlabeled.queries[3]
    video, query = unlabeled.queries[3]
    labelled_draws = full.clip(video, query, 0, (3,), labeled=False)
    unlabeled.set_epoch(0)
    assert not torch.equal(labelled_draws["frames"], unlabeled[3]["frames"])


def test_synthetic_sf_labels_only_the_first_frame_of_each_training_video(tmp_path):
    cfg = load_config(config_file(tmp_path), [*TINY, "data.mode=sf"])
    train, indices = build_dataset(cfg, "train", train=True)
    videos = cfg.data.synthetic.num_videos - cfg.data.synthetic.val_videos
    assert train.queries == [(v, 0) for v in range(videos)] and indices == list(range(videos))
    val, _ = build_dataset(cfg, "val", train=False)  # validation: every frame, as VSPW-SF's
    assert len(val) == cfg.data.synthetic.val_videos * cfg.data.synthetic.num_frames
    unlabeled = build_unlabeled_dataset(cfg)
    frames = cfg.data.synthetic.num_frames
    assert unlabeled.queries == [(v, t) for v in range(videos) for t in range(1, frames)]
    assert DATASETS["synthetic"].unlabeled_frames(cfg) and DATASETS["vspw"].unlabeled_frames(cfg)
    with pytest.raises(ValueError, match="mode must be one of"):
        synthetic("half")


def test_folder_unlabelled_frames_include_videos_without_masks(tmp_path):
    root = make_folder(tmp_path / "videos")
    write_video(root, "e", ())  # a training video without any mask
    (root / "train.txt").write_text("a\nb\ne\n")
    cfg = load_config(config_file(tmp_path), folder_settings(root))
    unlabeled = build_unlabeled_dataset(cfg)
    odd = [t for t in range(LENGTH) if t % 2]
    assert unlabeled.queries == [(0, t) for t in odd] + [(1, t) for t in odd] + [(2, t) for t in range(LENGTH)]
    assert unlabeled[0]["video"] == "a" and not unlabeled[0]["labeled"]


def test_datasets_without_unlabelled_frames_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"SyntheticVideos \(mode 'full'\) has no unlabelled frames"):
        UnlabeledClips(synthetic("full"))
    for settings in (
        ["data.dataset=synthetic"],
        ["data.dataset=vspw", "data.root=/nowhere"],
        ["data.dataset=camvid", "data.root=/nowhere", "data.mode=sf"],
    ):
        cfg = load_config(config_file(tmp_path), [*TINY, *settings])
        with pytest.raises(ConfigError, match=r"train.objectives 'mean_teacher' needs unlabelled .*data.dataset"):
            require_unlabeled_frames(cfg, "train.objectives 'mean_teacher'")
        with pytest.raises(ConfigError, match=r"data.dataset .* with data.mode .* has none"):
            build_unlabeled_dataset(cfg)  # refused from the config: no files read
    # A folder dataset whose every frame has a mask: only its files tell.
    root = tmp_path / "labelled"
    make_folder(root)
    for video in ("a", "b"):
        write_video(root, video, range(LENGTH))
    cfg = load_config(config_file(tmp_path), folder_settings(root))
    require_unlabeled_frames(cfg, "train.objectives 'mean_teacher'")  # cannot tell from the config
    with pytest.raises(ConfigError, match=r"data.dataset 'folder' \(data.mode 'full'\).*no unlabelled frames"):
        build_unlabeled_dataset(cfg)
    with pytest.raises(ConfigError, match="data.mode must be one of"):
        load_config(config_file(tmp_path), [*TINY, "data.mode=half"])


# --- the strong reference view ------------------------------------------------------------------------------------
def strong_dataset(mode: str = "full") -> SyntheticVideos:
    return synthetic(mode, transform=train_transform(24, (0.75, 1.5)), strong_reference=True)


def test_strong_reference_has_the_references_geometry():
    plain, strong = synthetic("full", transform=train_transform(24, (0.75, 1.5))), strong_dataset()
    undistorted = strong_dataset()
    undistorted.photometric = functools.partial(photometric_distortion, p=0.0)
    changed = 0
    for epoch in (0, 3):
        for dataset in (plain, strong, undistorted):
            dataset.set_epoch(epoch)
        for i in (0, 4, 7):
            a, b, c = plain[i], strong[i], undistorted[i]
            assert "reference_strong" not in a and b.keys() == {*a.keys(), "reference_strong"}
            # The strong view draws from a generator of its own: the sample's other draws do not move.
            assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in ("frames", "reference", "label"))
            # No distortion: the very same scale, crop and flip as the reference.
            assert torch.equal(c["reference_strong"], c["reference"])
            assert torch.equal(b["reference_strong"], strong[i]["reference_strong"])  # a function of (seed, epoch, i)
            changed += not torch.equal(b["reference_strong"], b["reference"])
    assert changed >= 3
    strong.set_epoch(0)
    first = strong[0]["reference_strong"]
    strong.set_epoch(3)
    assert not torch.equal(first, strong[0]["reference_strong"])
    assert "reference_strong" in UnlabeledClips(strong_dataset(mode="sf"))[0]


def test_strong_frames_are_one_distortion_of_the_whole_clip():
    calls = []

    def invert(images, generator):
        calls.append(images.shape)
        return 255 - images

    dataset = synthetic("sf", strong_frames=True)  # no resize: the pixels stay the decoded ones
    dataset.photometric = invert
    sample = UnlabeledClips(dataset)[2]
    assert calls == [(4, 32, 32, 3)]  # the query, 2 adjacent frames and the reference: one call
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for key in ("frames", "reference"):
        plain, strong = sample[key] * std + mean, sample[f"{key}_strong"] * std + mean
        torch.testing.assert_close(strong, 1 - plain, atol=1e-5, rtol=0)
    augmented = synthetic("sf", transform=train_transform(24, (0.75, 1.5)), strong_frames=True)
    augmented.photometric = functools.partial(photometric_distortion, p=0.0)
    for i in (0, 5):
        sample = UnlabeledClips(augmented)[i]
        assert torch.equal(sample["frames_strong"], sample["frames"])
        assert torch.equal(sample["reference_strong"], sample["reference"])


def test_build_dataset_strong_reference(tmp_path):
    cfg = load_config(config_file(tmp_path), [*TINY, "data.mode=sf"])
    dataset, _ = build_dataset(cfg, "train", train=True, strong_reference=True)
    assert dataset.strong_reference and "reference_strong" in dataset[0]
    assert "reference_strong" not in build_dataset(cfg, "train", train=True)[0][0]
    assert "reference_strong" in build_unlabeled_dataset(cfg, strong_reference=True)[0]
    assert {"frames_strong", "reference_strong"} <= build_unlabeled_dataset(cfg, strong_frames=True)[0].keys()


def small_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    image[0, 0], image[0, 1] = (0, 0, 0), (255, 255, 255)  # both ends of the range
    return image


def test_photometric_brightness_and_contrast_closed_form():
    x = small_image().astype(np.int64)
    # float32 add, clip, truncate: + 20.7 adds 20 to an integer; - 20.3 subtracts 21, 0 below.
    assert np.array_equal(Photometric(brightness=20.7)(small_image()), np.minimum(x + 20, 255))
    assert np.array_equal(Photometric(brightness=-20.3)(small_image()), np.maximum(x - 21, 0))
    assert np.array_equal(Photometric(contrast=1.5)(small_image()), np.minimum(x * 3 // 2, 255))
    assert np.array_equal(Photometric(contrast=0.5)(small_image()), x // 2)
    stack = np.stack([small_image(), 255 - small_image()])
    assert np.array_equal(Photometric(contrast=0.5)(stack), np.stack([x // 2, (255 - x) // 2]))


def test_photometric_saturation_and_hue_against_opencv():
    image = small_image()
    # Saturation 0: grey at the HSV value, the largest channel.
    grey = Photometric(saturation=0.0)(image)
    assert np.array_equal(grey, np.repeat(image.max(axis=-1, keepdims=True), 3, axis=-1))
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = np.minimum(hsv[..., 1].astype(np.int64) * 13 // 10, 255)
    assert np.array_equal(Photometric(saturation=1.3)(image), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
    # Hue on OpenCV's 0..179 scale: +60 is 120 degrees, red to green to blue to red; -18 wraps modulo 180.
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    assert np.array_equal(Photometric(hue=60)(primaries), primaries[:, [1, 2, 0]])
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) - 18) % 180
    assert np.array_equal(Photometric(hue=-18)(image), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
    assert Photometric(hue=-18)(primaries)[0, 0].tolist() == [255, 0, 153]  # red at 324 degrees


def test_photometric_order_is_mmsegs():
    image = small_image()
    for first in (True, False):
        full = Photometric(brightness=9.5, contrast=1.3, contrast_first=first, saturation=1.4, hue=7)(image)
        c = Photometric(contrast=1.3)
        if first:
            expected = Photometric(hue=7)(Photometric(saturation=1.4)(c(Photometric(brightness=9.5)(image))))
        else:
            expected = c(Photometric(hue=7)(Photometric(saturation=1.4)(Photometric(brightness=9.5)(image))))
        assert np.array_equal(full, expected)
    assert not np.array_equal(
        Photometric(contrast=1.3, contrast_first=True, saturation=1.4)(image),
        Photometric(contrast=1.3, contrast_first=False, saturation=1.4)(image),
    )
    assert np.array_equal(Photometric()(image), image) and Photometric()(image) is not image


def test_photometric_draws():
    generator = torch.Generator().manual_seed(0)
    draws = [Photometric.draw(generator) for _ in range(4000)]
    for key in ("brightness", "contrast", "saturation", "hue"):
        taken = [getattr(d, key) for d in draws if getattr(d, key) is not None]
        assert 0.46 < len(taken) / len(draws) < 0.54, key
    assert 0.46 < np.mean([d.contrast_first for d in draws]) < 0.54
    brightness = [d.brightness for d in draws if d.brightness is not None]
    assert -32 <= min(brightness) < -31 and 31 < max(brightness) <= 32
    for key in ("contrast", "saturation"):
        values = [getattr(d, key) for d in draws if getattr(d, key) is not None]
        assert 0.5 <= min(values) < 0.52 and 1.48 < max(values) <= 1.5
    assert {d.hue for d in draws if d.hue is not None} == set(range(-18, 18))  # numpy's randint(-18, 18)
    none = Photometric.draw(torch.Generator().manual_seed(1), p=0.0)
    assert (none.brightness, none.contrast, none.saturation, none.hue) == (None, None, None, None)
    # One draw for a whole clip: every frame gets the same distortion.
    clip = np.stack([small_image(), small_image()[::-1].copy(), 255 - small_image()])
    for seed in range(4):
        out = photometric_distortion(clip, torch.Generator().manual_seed(seed))
        one = Photometric.draw(torch.Generator().manual_seed(seed))
        assert np.array_equal(out, np.stack([one(frame) for frame in clip]))
    with pytest.raises(ValueError, match="uint8 RGB"):
        photometric_distortion(clip.astype(np.float32))
    with pytest.raises(ValueError, match="p must be a probability"):
        photometric_distortion(clip, p=1.5)


# --- the trainer's unlabelled micro-batches -----------------------------------------------------------------------
def test_unlabeled_micro_batches_in_lockstep_and_on_resume(tmp_path):
    settings = [*TINY, "data.mode=sf", "train.batch_size=2", "train.grad_accum=2", "train.max_iters=4", "train.seed=3"]
    cfg = load_config(config_file(tmp_path), [*settings, f"work_dir={tmp_path / 'run'}"])
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    with RunLog(True) as run_log:
        trainer = Trainer(cfg, env, run_log=run_log)
    assert trainer._unlabeled_loader() is None  # no objective reads unlabelled clips
    trainer.unlabeled_set = build_unlabeled_dataset(cfg)
    n = len(trainer.unlabeled_set)
    stream = trainer._unlabeled_loader()
    batches = [next(stream) for _ in range(8)]  # 4 iterations of 2 micro-batches
    again = trainer._unlabeled_loader()
    assert all(_same(a, next(again)) for a in batches)  # deterministic
    order = ClipOrder(range(n), 2, 2, 1, 0, cfg.train.seed + UNLABELED_SEED_OFFSET, 0)
    # Micro-batch k holds the unlabelled clips its order names, never a labelled one.
    for batch, items in zip(batches, order, strict=False):
        expected = [trainer.unlabeled_set.queries[i] for _, i in items]
        names = list(zip(batch["video"], batch["frame"], strict=True))
        assert [(f"synthetic_{v}", f"{t:05d}") for v, t in expected] == names
        assert not batch["labeled"].any() and bool((batch["label"] == 255).all())
    labelled = ClipOrder(range(n), 2, 2, 1, 0, cfg.train.seed, 0)
    assert not torch.equal(order.epoch_order(0), labelled.epoch_order(0))  # a seed stream of its own
    trainer.state.iteration = 2  # a run resumed at iteration 2 draws the uninterrupted run's micro-batches
    resumed = trainer._unlabeled_loader()
    assert all(_same(a, next(resumed)) for a in batches[4:])
    trainer.cfg.train.batch_size = n + 1
    with pytest.raises(ConfigError, match=f"is more than the {n} unlabelled training clips"):
        trainer._unlabeled_loader()


class Probe(Objective):
    """Reads unlabelled clips and strong references; records the micro-batches it sees, adds nothing."""

    name = "probe"
    terms = ("probe",)
    needs = frozenset({"unlabeled", "strong", "strong_frames"})
    seen: list[dict] = []

    def forward(self, model, batch, out, step):
        Probe.seen.append(batch)
        return {"probe": out["losses"]["total"].detach() * 0}


def test_objectives_needing_unlabelled_clips_get_them_in_each_micro_batch(tmp_path, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "probe", Probe)
    monkeypatch.setattr(Probe, "seen", [])
    settings = [*TINY, "data.mode=sf", "train.batch_size=2", "train.grad_accum=2", "train.max_iters=1"]
    settings += ["train.objectives=[probe]", "train.validate=false", f"work_dir={tmp_path / 'run'}"]
    cfg = load_config(config_file(tmp_path), settings)
    with RunLog(True) as run_log:
        trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")), run_log=run_log)
        trainer.run()
    assert len(Probe.seen) == 2  # 1 iteration of 2 micro-batches
    trainer.state.iteration = 0
    expected = trainer._unlabeled_loader()
    for batch in Probe.seen:
        assert batch["labeled"].all() and batch["reference_strong"].shape == batch["reference"].shape
        unlabeled = batch["unlabeled"]
        assert not unlabeled["labeled"].any() and "frames_strong" not in batch
        assert unlabeled["frames_strong"].shape == unlabeled["frames"].shape and "reference_strong" in unlabeled
        assert _same(unlabeled, next(expected))  # the unlabelled stream, in lockstep
    cfg = load_config(config_file(tmp_path), [*settings[:-1], f"work_dir={tmp_path / 'full'}", "data.mode=full"])
    with (
        pytest.raises(ConfigError, match="needs unlabelled training frames.*data.dataset 'synthetic'"),
        RunLog(True) as log,
    ):
        Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")), run_log=log)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_readme_documents_unlabelled_clips():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Data and metrics", 1)[1].split("\n## ", 1)[0]
    assert "UnlabeledClips" in section and "reference_strong" in section and "data.mode: sf" in section
