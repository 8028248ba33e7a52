"""ssltm.data: clip sampling, the dataset layouts, labels, augmentation alignment and errors.

VSPW and Cityscapes run on tiny folders built here in the official layouts, each frame a flat grey
that encodes its index, so a sample tells which frames it was made of. CamVid reads the real train
split from ../shared/data/camvid (skipped when absent).
"""

import re
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision import tv_tensors

from ssltm.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VSPW,
    CamVid,
    CityscapesSequence,
    ClipSampler,
    RandomScale,
    SyntheticVideos,
    train_transform,
)
from ssltm.data.camvid import split_at_gaps

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
GREY_STEP = 8  # grey level per frame index in the tiny datasets
SIZE = (8, 12)  # (H, W) of the tiny datasets' frames


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised float (..., 3, H, W) back to 0..255."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean) * 255


def frame_indices(sample: dict) -> list[int]:
    """The frame index each of a tiny-dataset sample's frames and its reference encode (reference last)."""
    images = torch.cat([sample["frames"], sample["reference"][None]])
    return [round(float(unnormalize(img).mean()) / GREY_STEP) for img in images]


def write_grey(path: Path, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*SIZE, 3), index * GREY_STEP, np.uint8))


def write_palette_mask(path: Path, values: np.ndarray) -> None:
    """A palette PNG like VSPW's masks (OpenCV would read its colours, not the indices)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(values.astype(np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)


RAW_VSPW = np.array([[0, 1, 5, 124, 255, 200]] * 2 + [[1] * 6] * 6, np.uint8)  # (8, 6) tiled to (8, 12)
RAW_VSPW = np.tile(RAW_VSPW, (1, 2))


def make_vspw(tmp_path: Path, lengths=None) -> Path:
    lengths = lengths or {"train": {"vid_a": 12, "vid_b": 7}, "val": {"vid_c": 5}}
    release = tmp_path / "VSPW_480p"
    for split, videos in lengths.items():
        release.mkdir(parents=True, exist_ok=True)
        (release / f"{split}.txt").write_text("".join(f"{name}\n" for name in videos))
        for name, n in videos.items():
            for t in range(n):
                write_grey(release / "data" / name / "origin" / f"{t:08d}.jpg", t)
                write_palette_mask(release / "data" / name / "mask" / f"{t:08d}.png", RAW_VSPW)
    (release / "test.txt").write_text("")
    return release


# ----------------------------------------------------------------------------------------- sampling


def test_sampler_adjacent_frames():
    s = ClipSampler((3, 6, 9))
    assert s.adjacent(10, 20) == (7, 4, 1)
    assert s.adjacent(0, 20) == (3, 6, 9)  # mirrored after the query, never the query itself
    assert s.adjacent(4, 20) == (1, 10, 13)
    assert s.adjacent(0, 5) == (3, 4, 4)  # and clamped to the last frame
    assert s.adjacent(0, 1) == (0, 0, 0)
    causal = ClipSampler((3, 6, 9), causal=True)
    assert causal.adjacent(4, 20) == (1, 0, 0)
    assert causal.adjacent(0, 20) == (0, 0, 0)
    assert causal.adjacent(10, 20) == (7, 4, 1)


def test_sampler_reference():
    farthest = ClipSampler(reference="farthest")
    assert [farthest.reference_index(q, 10) for q in (0, 2, 4, 5, 9)] == [9, 9, 9, 0, 0]
    assert farthest.reference_index(2, 5) == 0  # a tie goes to the earlier frame
    assert ClipSampler(reference="farthest", causal=True).reference_index(7, 10) == 0

    random = ClipSampler(reference="random")
    draws = [random.reference_index(3, 8, torch.Generator().manual_seed(s)) for s in range(400)]
    assert set(draws) == {0, 1, 2, 4, 5, 6, 7}  # every other frame, never the query
    assert max(np.bincount(draws)) < 2 * 400 / 7
    again = [random.reference_index(3, 8, torch.Generator().manual_seed(s)) for s in range(400)]
    assert draws == again
    causal = ClipSampler(reference="random", causal=True)
    assert {causal.reference_index(5, 8, torch.Generator().manual_seed(s)) for s in range(200)} == {0, 1, 2, 3, 4}
    assert random.reference_index(0, 1) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"offsets": (3, 0)}, "positive"),
        ({"offsets": (6, 3)}, "strictly increasing"),
        ({"offsets": (3.0,)}, "positive ints"),
        ({"reference": "nearest"}, "reference must be one of"),
    ],
)
def test_sampler_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClipSampler(**kwargs)
    with pytest.raises(IndexError, match="outside"):
        ClipSampler().adjacent(5, 5)


# --------------------------------------------------------------------------------------------- VSPW


def test_vspw_labels_and_sample_format(tmp_path):
    make_vspw(tmp_path)
    ds = VSPW(tmp_path, "train", reference="farthest")
    sample = ds[0]
    assert sample["frames"].shape == (4, 3, *SIZE) and sample["frames"].dtype == torch.float32
    assert sample["reference"].shape == (3, *SIZE) and sample["reference"].dtype == torch.float32
    assert sample["label"].shape == SIZE and sample["label"].dtype == torch.int64
    assert (sample["video"], sample["frame"]) == ("vid_a", "00000000")
    expected = np.tile(np.array([[255, 0, 4, 123, 255, 255]] * 2 + [[0] * 6] * 6), (1, 2))
    np.testing.assert_array_equal(sample["label"].numpy(), expected)
    assert ds.num_classes == 124


def test_vspw_sf_and_full_queries(tmp_path):
    make_vspw(tmp_path)
    full, sf = VSPW(tmp_path, "train", mode="full"), VSPW(tmp_path, "train", mode="sf")
    assert len(full) == 12 + 7
    assert len(sf) == 2
    assert [(s["video"], s["frame"]) for s in sf] == [("vid_a", "00000000"), ("vid_b", "00000000")]
    # Validation is fully labelled in both versions of VSPW.
    assert len(VSPW(tmp_path, "val", mode="sf")) == len(VSPW(tmp_path, "val", mode="full")) == 5


def test_vspw_sf_adjacent_frames_are_distinct(tmp_path):
    make_vspw(tmp_path)
    sample = VSPW(tmp_path, "train", mode="sf", reference="farthest")[0]
    frames = frame_indices(sample)
    assert frames == [0, 3, 6, 9, 11]
    assert len(set(frames[:4])) == 4
    assert not torch.equal(sample["frames"][0], sample["frames"][1])


def test_vspw_offsets_at_video_start_and_causal(tmp_path):
    make_vspw(tmp_path)
    ds = VSPW(tmp_path, "train", reference="farthest")
    assert frame_indices(ds[4]) == [4, 1, 10, 11, 11]  # 4-6 and 4-9 mirrored, 13 clamped to 11
    assert frame_indices(ds[10]) == [10, 7, 4, 1, 0]
    assert frame_indices(ds[12 + 2]) == [2, 5, 6, 6, 6]  # vid_b, 7 frames
    causal = VSPW(tmp_path, "train", causal=True, reference="farthest")
    assert frame_indices(causal[4]) == [4, 1, 0, 0, 0]
    assert frame_indices(causal[0]) == [0, 0, 0, 0, 0]


def test_vspw_random_reference_is_seeded_per_sample(tmp_path):
    make_vspw(tmp_path)
    a, b = VSPW(tmp_path, "train", seed=3), VSPW(tmp_path, "train", seed=3)
    forward = [frame_indices(a[i])[-1] for i in range(12)]
    backward = [frame_indices(b[i])[-1] for i in reversed(range(12))][::-1]
    assert forward == backward
    assert all(ref != q for q, ref in enumerate(forward))
    assert len(set(forward)) > 3
    a.set_epoch(1)
    assert [frame_indices(a[i])[-1] for i in range(12)] != forward


def test_reference_defaults_to_the_papers_protocol(tmp_path):
    """Default arguments give the paper's inference on val / test (the farthest frame) and training's
    random reference elsewhere; an explicit reference wins."""
    make_vspw(tmp_path, {"train": {"vid_a": 12}, "val": {"vid_c": 9, "vid_d": 6}})
    val = VSPW(tmp_path, "val")
    assert val.sampler.reference == "farthest"
    assert [frame_indices(val[i])[-1] for i in range(len(val))] == [8, 8, 8, 8, 0, 0, 0, 0, 0] + [5, 5, 5, 0, 0, 0]
    train = VSPW(tmp_path, "train", seed=0)
    assert train.sampler.reference == "random"
    assert len({frame_indices(train[i])[-1] for i in range(12)}) > 2
    assert VSPW(tmp_path, "val", reference="random").sampler.reference == "random"
    assert VSPW(tmp_path, "train", reference="farthest").sampler.reference == "farthest"

    camvid = tmp_path / "camvid"
    for split in ("train", "val", "test"):
        for t, number in enumerate((30, 60, 90)):
            write_grey(camvid / split / f"0001TP_{number:06d}.png", t)
            write_palette_mask(camvid / f"{split}annot" / f"0001TP_{number:06d}.png", np.zeros(SIZE))
    assert frame_indices(CamVid(camvid, "val", offsets=(1,))[0]) == [0, 1, 2]
    assert CamVid(camvid, "test").sampler.reference == "farthest"
    assert CamVid(camvid, "train").sampler.reference == "random"
    assert CityscapesSequence(make_cityscapes(tmp_path / "cityscapes"), "train").sampler.reference == "random"


def test_vspw_root_may_be_the_release_folder(tmp_path):
    release = make_vspw(tmp_path)
    assert len(VSPW(release, "val")) == len(VSPW(tmp_path, "val")) == 5


def test_vspw_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        VSPW(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "VSPW_480p" / "train.txt"))):
        VSPW(tmp_path, "train")
    release = make_vspw(tmp_path)
    with pytest.raises(ValueError, match="lists no videos"):
        VSPW(tmp_path, "test")
    (release / "val.txt").write_text("vid_c\nvid a\n")
    with pytest.raises(ValueError, match=re.escape(f"{release / 'val.txt'}, line 2")):
        VSPW(tmp_path, "val")
    (release / "val.txt").write_text("vid_c\nvid_missing\n")
    with pytest.raises(FileNotFoundError, match=re.escape(str(release / "data" / "vid_missing" / "origin"))):
        VSPW(tmp_path, "val")
    (release / "data" / "vid_empty" / "origin").mkdir(parents=True)
    (release / "val.txt").write_text("vid_empty\n")
    with pytest.raises(FileNotFoundError, match="has no frames"):
        VSPW(tmp_path, "val")
    write_palette_mask(release / "data" / "vid_c" / "mask" / "00000099.png", RAW_VSPW)
    (release / "val.txt").write_text("vid_c\n")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{release / 'data' / 'vid_c' / 'origin' / '00000099'}.jpg")):
        VSPW(tmp_path, "val")
    with pytest.raises(ValueError, match="mode must be one of"):
        VSPW(tmp_path, "train", mode="half")


# --------------------------------------------------------------------------------------- Cityscapes


def make_cityscapes(tmp_path: Path, snippets=(("aachen", "000000", 19), ("frankfurt", "000001", 294))) -> Path:
    for city, seq, frame in snippets:
        for n in range(frame - 19, frame + 11):
            name = f"{city}_{seq}_{n:06d}_leftImg8bit.png"
            write_grey(tmp_path / "leftImg8bit_sequence" / "train" / city / name, n - (frame - 19))
        label = np.full(SIZE, 255, np.uint8)
        label[:, :6] = np.arange(6) * 3  # train ids 0..15
        path = tmp_path / "gtFine" / "train" / city / f"{city}_{seq}_{frame:06d}_gtFine_labelTrainIds.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), label)
    return tmp_path


def test_cityscapes_query_is_the_20th_frame(tmp_path):
    ds = CityscapesSequence(make_cityscapes(tmp_path), "train", reference="farthest")
    assert len(ds) == 2
    for sample, name in zip(ds, ("aachen_000000_000019", "frankfurt_000001_000294"), strict=True):
        assert sample["video"] == sample["frame"] == name
        assert frame_indices(sample) == [19, 16, 13, 10, 0]  # snippet positions; reference: the farthest
        assert set(sample["label"].unique().tolist()) == {0, 3, 6, 9, 12, 15, 255}
    causal = CityscapesSequence(tmp_path, "train", offsets=(1, 2), causal=True, reference="farthest")
    assert frame_indices(causal[1]) == [19, 18, 17, 0]
    assert ds.num_classes == 19


def test_cityscapes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "leftImg8bit_sequence" / "val"))):
        CityscapesSequence(make_cityscapes(tmp_path), "val")
    (tmp_path / "leftImg8bit_sequence" / "train" / "aachen" / "aachen_000000_000025_leftImg8bit.png").unlink()
    with pytest.raises(FileNotFoundError, match="aachen_000000_000025_leftImg8bit.png"):
        CityscapesSequence(tmp_path, "train")
    empty = tmp_path / "empty"
    (empty / "leftImg8bit_sequence" / "train" / "ulm").mkdir(parents=True)
    (empty / "gtFine" / "train" / "ulm").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="labelTrainIds"):
        CityscapesSequence(empty, "train")


# ------------------------------------------------------------------------------------------- CamVid

needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason=f"CamVid train split not found at {CAMVID}")


def test_split_at_gaps():
    assert split_at_gaps([0, 30, 61, 90, 120, 2070, 2100, 2400, 2430]) == [(0, 5), (5, 7), (7, 9)]
    assert split_at_gaps([0, 29, 60]) == [(0, 3)]  # a 31/29 jitter is not a gap
    assert split_at_gaps([5]) == [(0, 1)]


@needs_camvid
def test_camvid_videos_split_at_gaps():
    ds = CamVid(CAMVID, "train", reference="farthest")
    lengths = {ds.video_name(v): ds.video_length(v) for v in range(len(ds.videos))}
    numbers = {p.stem: int(re.fullmatch(r"([A-Za-z0-9]+)_f?(\d+)", p.stem)[2]) for p in (CAMVID / "train").iterdir()}
    e5 = [n for stem, n in numbers.items() if stem.startswith("0016E5")]
    assert lengths == {
        "0001TP": 62,
        "0006R0": 101,
        "0016E5-0": sum(n <= 2400 for n in e5),
        "0016E5-1": sum(4350 <= n <= 7920 for n in e5),
        "0016E5-2": sum(n >= 8190 for n in e5),
    }
    assert len(ds) == 367 and ds.num_classes == 11


@needs_camvid
def test_camvid_clip_order_and_labels():
    ds = CamVid(CAMVID, "train", reference="farthest", transform=lambda clip: clip)  # raw uint8 out
    stems = sorted(p.stem for p in (CAMVID / "train").iterdir() if p.stem.startswith("0001TP"))
    sample = ds[10]
    assert (sample["video"], sample["frame"]) == ("0001TP", stems[10])
    for got, index in zip([*sample["frames"], sample["reference"]], [10, 7, 4, 1, 61], strict=True):
        expected = cv2.cvtColor(cv2.imread(str(CAMVID / "train" / f"{stems[index]}.jpg")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), expected)
    values = set()
    for i in (0, 100, 200, 366):
        values |= set(ds[i]["label"].unique().tolist())
    assert values <= set(range(11)) | {255}
    assert 255 in values and len(values) > 6


def test_camvid_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train"))):
        CamVid(tmp_path, "train")
    write_grey(tmp_path / "train" / "0001TP_000030.png", 1)
    (tmp_path / "trainannot").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "trainannot" / "0001TP_000030") + ".png")):
        CamVid(tmp_path, "train")
    write_grey(tmp_path / "trainannot" / "0001TP_000060.png", 1)
    with pytest.raises(FileNotFoundError, match="have no image"):
        CamVid(tmp_path, "train")


# ---------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_sample():
    kwargs = {"num_videos": 3, "num_frames": 16, "size": (48, 64), "num_classes": 5}
    a, b = SyntheticVideos(seed=7, **kwargs), SyntheticVideos(seed=7, **kwargs)
    order = [5, 40, 0, 17]
    first = [a[i] for i in order]
    second = [b[i] for i in reversed(order)][::-1]
    for x, y in zip(first, second, strict=True):
        for key in ("frames", "reference", "label"):
            assert torch.equal(x[key], y[key])
        assert (x["video"], x["frame"]) == (y["video"], y["frame"])
    other = SyntheticVideos(seed=8, **kwargs)[5]
    assert not torch.equal(other["frames"], first[0]["frames"])
    # Workers see the same samples as the main process.
    loaded = next(iter(DataLoader(a, batch_size=4, num_workers=2, sampler=order)))
    assert torch.equal(loaded["frames"], torch.stack([s["frames"] for s in first]))


def test_synthetic_samples():
    ds = SyntheticVideos(num_videos=2, num_frames=20, size=(40, 56), num_classes=5, seed=0)
    assert len(ds) == 40
    batch = default_collate([ds[0], ds[25]])
    assert batch["frames"].shape == (2, 4, 3, 40, 56) and batch["frames"].dtype == torch.float32
    assert batch["reference"].shape == (2, 3, 40, 56)
    assert batch["label"].shape == (2, 40, 56) and batch["label"].dtype == torch.int64
    assert batch["video"] == ["synthetic_0", "synthetic_1"] and batch["frame"] == ["00000", "00005"]
    labels = torch.stack([torch.from_numpy(ds.render(v, t)[1]) for v in range(2) for t in range(20)])
    assert labels.min() >= 0 and labels.max() < 5 and len(labels.unique()) >= 4
    # Objects move: consecutive label maps differ, but not everywhere.
    changed = (labels[1:20] != labels[:19]).float().mean()
    assert 0.001 < changed < 0.5


def test_synthetic_throughput():
    ds = SyntheticVideos(num_videos=4, num_frames=32, size=128, seed=0)
    ds[0]
    # One thread, as in a DataLoader worker: on a busy machine OpenMP's spinning makes small ops erratic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for i in range(64):
            ds[i]
        rate = 64 / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    print(f"\nSyntheticVideos 128x128, 4 frames + reference: {rate:.0f} clips/s (one thread)")


# ------------------------------------------------------------------------------------- augmentation

PALETTE = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20], [20, 230, 230], [230, 20, 230]])


def blocky_clip(seed: int, frames: int = 3) -> dict:
    """A clip whose colours are a function of the label: random 8x8 blocks of PALETTE, each frame
    (and the reference) a little brighter than the last, so that each image is distinct."""
    blocks = np.random.default_rng(seed).integers(0, len(PALETTE), (6, 9))
    label = np.kron(blocks, np.ones((8, 8), int))
    images = [np.clip(PALETTE[label] + 8 * j, 0, 255) for j in range(frames + 1)]
    video = torch.tensor(np.stack(images[:frames]), dtype=torch.uint8).permute(0, 3, 1, 2)
    return {
        "frames": tv_tensors.Video(video),
        "reference": tv_tensors.Image(torch.tensor(images[-1], dtype=torch.uint8).permute(2, 0, 1)),
        "label": tv_tensors.Mask(torch.tensor(label, dtype=torch.uint8)),
    }


def label_agreement(image: torch.Tensor, label: torch.Tensor, brightness: int) -> float:
    """Fraction of labelled pixels whose colour is nearest the label's palette colour."""
    rgb = unnormalize(image).permute(1, 2, 0) - brightness
    distance = (rgb[..., None, :] - torch.tensor(PALETTE, dtype=torch.float32)).norm(dim=-1)
    valid = label != 255
    return (distance.argmin(-1)[valid] == label[valid]).float().mean().item()


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_keeps_frames_reference_and_label_aligned(seed):
    transform = train_transform((40, 40), scale_range=(0.5, 2.0))
    torch.manual_seed(seed)
    out = transform(blocky_clip(seed))
    frames, reference, label = out["frames"], out["reference"], out["label"]
    assert frames.shape == (3, 3, 40, 40) and reference.shape == (3, 40, 40) and label.shape == (40, 40)
    assert frames.dtype == torch.float32 and label.dtype == torch.int64
    assert (label != 255).float().mean() > 0.2
    for j, image in enumerate([*frames, reference]):
        # Bilinear resizing blends colours at block edges only: the rest must match the label.
        assert label_agreement(image, label, 8 * j) > 0.85, f"image {j} is not aligned with the label"
    # Label padding is 255, and the image there is 0 before normalisation.
    padded = label == 255
    if padded.any():
        assert unnormalize(frames[0]).permute(1, 2, 0)[padded].abs().max() < 1e-3


def test_alignment_check_detects_a_frame_flipped_alone():
    out = train_transform((40, 40), scale_range=(1.0, 1.0), hflip=0.0)(blocky_clip(0))
    assert label_agreement(out["frames"][0], out["label"], 0) > 0.95
    assert label_agreement(out["frames"][0].flip(-1), out["label"], 0) < 0.6


def test_random_scale_range():
    image = tv_tensors.Image(torch.zeros(3, 40, 60, dtype=torch.uint8))
    sizes = {tuple(RandomScale((0.5, 2.0))(image).shape[-2:]) for _ in range(50)}
    assert all(20 <= h <= 80 and abs(w - 1.5 * h) <= 1 for h, w in sizes)
    assert len(sizes) > 10


def test_seeded_dataset_leaves_the_global_rng_alone():
    ds = SyntheticVideos(num_videos=2, num_frames=8, size=32, seed=1, transform=train_transform(24))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = ds[3]
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(ds[3]["frames"], first["frames"]) and torch.equal(ds[3]["label"], first["label"])
