"""Your own videos: the folder dataset (``data.dataset: folder``), a dataset class of the user's
(``data.dataset: "package.module:ClassName"``), class metadata on the dataset classes, and prediction on splits
without labels (``ssltm eval --predict-only``), through the command line and unit by unit."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import TINY_MODEL, config_file, tiny_model_kwargs, torchrun
from test_data import GREY_STEP, frame_indices, make_vspw, write_palette_mask
from torch.utils.data import DataLoader, Subset

from ssltm import SSLTM
from ssltm.build import build_dataset, dataset_info
from ssltm.checkpoint import load_checkpoint
from ssltm.cli import EXIT_ERROR, main
from ssltm.config import load_config
from ssltm.data import DATASETS, VSPW, CamVid, ClipDataset, VideoFolder, dataset_class, eval_transform, natural_order
from ssltm.data.folder import MaskValueError
from ssltm.distributed import DistEnv
from ssltm.evaluate import evaluate, predict

LENGTH = 12  # frames per video
NAMES = ["ground", "thing", "stuff"]
PALETTE = [[10, 20, 30], [200, 0, 0], [0, 200, 0]]
MAPPING = {"0": 0, "10": 1, "20": 2}  # raw mask value -> class id; 255 ignored
LABELLED = range(0, LENGTH, 2)  # the even frames have masks, the odd ones none
SIZE = 32
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")


def raw_mask(t: int) -> np.ndarray:
    """Frame ``t``'s mask: class 1 (raw 10) in a square moving right, class 2 (raw 20) below, an ignored corner."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:14, t : t + 10] = 10
    mask[20:, :] = 20
    mask[:3, :3] = 255
    return mask


def write_video(root: Path, name: str, labelled) -> None:
    """Frames ``f_0 .. f_11``, grey level ``t * GREY_STEP`` (which tells a sample's frames); masks for ``labelled``."""
    for t in range(LENGTH):
        (root / name / "frames").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((SIZE, SIZE, 3), t * GREY_STEP, np.uint8)).save(root / name / "frames" / f"f_{t}.png")
        if t in labelled:
            write_palette_mask(root / name / "masks" / f"f_{t}.png", raw_mask(t))


def make_folder(root: Path) -> Path:
    """2 training videos, 1 validation video (even frames labelled) and a test video without masks."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps({"names": NAMES, "palette": PALETTE, "mapping": MAPPING}))
    for split, videos in {"train": ["a", "b"], "val": ["c"], "test": ["d"]}.items():
        (root / f"{split}.txt").write_text("".join(f"{v}\n" for v in videos))
        for v in videos:
            write_video(root, v, LABELLED if split != "test" else ())
    return root


def folder_settings(root: Path) -> list[str]:
    return [
        *TINY_MODEL,
        "data.dataset=folder",
        f"data.root={root}",
        "data.crop_size=32",
        "data.scale_range=[1.0,1.25]",
        "data.num_workers=0",
        "data.offsets=[1,2]",
        "eval.tc=false",
        "eval.mvc=[8]",
        "train.progress=false",
    ]


def pngs(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.png"))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny folder dataset and the checkpoint of 2 training steps on it through the CLI, with the README's
    example config (module scoped: two tests read it)."""
    tmp = tmp_path_factory.mktemp("folder")
    root = make_folder(tmp / "data")
    example = str(README.parent / "configs" / "folder_example.yaml")
    args = ["train", example, "--set", *folder_settings(root), "train.max_iters=2", "train.batch_size=2"]
    args += ["train.validate=false", "--work-dir", str(tmp / "run")]
    os.environ["SSLTM_BACKEND"] = "reference"
    try:
        assert main(args) == 0
    finally:
        os.environ.pop("SSLTM_BACKEND")
    return root, tmp / "run" / "latest.pt"


def test_train_eval_infer_predict_through_cli(tmp_path, folder_run, capsys):
    root, checkpoint = folder_run
    ckpt = load_checkpoint(checkpoint)
    assert ckpt["meta"]["classes"] == NAMES and ckpt["meta"]["palette"] == PALETTE
    cfg = config_file(tmp_path)
    settings = folder_settings(root)

    # evaluation scores the labelled frames of the validation video only
    metrics, preds = tmp_path / "metrics.json", tmp_path / "preds"
    eval_args = ["eval", cfg, "--set", *settings, "--checkpoint", str(checkpoint)]
    assert main([*eval_args, "--out", str(metrics), "--save-predictions", str(preds)]) == 0
    assert list(json.loads(metrics.read_text())["per_class"]) == NAMES
    assert pngs(preds / "c") == sorted(f"f_{t}" for t in LABELLED)

    # inference on one video's frames
    out = tmp_path / "infer"
    frames = root / "c" / "frames"
    assert main(["infer", "--checkpoint", str(checkpoint), "--input", str(frames), "--out", str(out)]) == 0
    assert pngs(out / "labels") == sorted(f"f_{t}" for t in range(LENGTH))

    # prediction of the test split, which has no masks: every frame, VSPW's layout, class ids
    submission = tmp_path / "submission"
    assert main([*eval_args, "--split", "test", "--predict-only", "--save-predictions", str(submission)]) == 0
    assert sorted(p.name for p in submission.iterdir()) == ["d"]
    assert pngs(submission / "d") == sorted(f"f_{t}" for t in range(LENGTH))
    ids = np.asarray(Image.open(submission / "d" / "f_3.png"))
    assert ids.shape == (SIZE, SIZE) and ids.max() < len(NAMES)
    assert f"folder test: {LENGTH} frames predicted into {submission}" in capsys.readouterr().out
    # a split that lists no videos: one line, before any work
    (root / "empty.txt").write_text("\n")
    capsys.readouterr()
    nowhere = tmp_path / "nowhere"
    assert main([*eval_args, "--split", "empty", "--predict-only", "--save-predictions", str(nowhere)]) == EXIT_ERROR
    assert f"split file {root / 'empty.txt'} lists no videos" in capsys.readouterr().err
    assert not nowhere.exists()


def test_predict_under_torchrun_shares_the_videos(tmp_path, folder_run):
    """Two processes predict a video each: the same label PNGs as one process predicting both."""
    root, checkpoint = folder_run
    (root / "pair.txt").write_text("c\nd\n")
    args = ["eval", config_file(tmp_path), "--set", *folder_settings(root), "--checkpoint", str(checkpoint)]
    args += ["--split", "pair", "--predict-only", "--save-predictions"]
    torchrun(tmp_path, *args, str(tmp_path / "two"))
    assert main([*args, str(tmp_path / "one")]) == 0
    for video in ("c", "d"):
        assert (
            pngs(tmp_path / "two" / video) == pngs(tmp_path / "one" / video)
            and len(pngs(tmp_path / "one" / video)) == LENGTH
        )
        for name in pngs(tmp_path / "one" / video):
            a, b = (np.asarray(Image.open(tmp_path / run / video / f"{name}.png")) for run in ("one", "two"))
            np.testing.assert_array_equal(a, b)


def test_frames_in_natural_order_unlabelled_ones_as_context(tmp_path):
    root = make_folder(tmp_path)
    assert sorted(["f_10", "f_2", "F_1", "f_0"], key=natural_order) == ["f_0", "F_1", "f_2", "f_10"]
    ds = VideoFolder(root, "val", offsets=(1, 2), reference="farthest", transform=eval_transform())
    assert ds.videos[0].frame_ids == tuple(f"f_{t}" for t in range(LENGTH))  # f_10 after f_9, not after f_1
    # only labelled frames are queries; their adjacent frames (t-1, t-2) and the reference may be unlabelled
    assert ds.queries == [(0, t) for t in LABELLED]
    assert frame_indices(ds[1]) == [2, 1, 0, 11]  # query f_2, then f_1 (no mask), f_0; reference f_11 (no mask)
    assert frame_indices(ds[4]) == [8, 7, 6, 0]
    ds_all = VideoFolder(root, "val", offsets=(1, 2), labels=False)
    assert ds_all.queries == [(0, t) for t in range(LENGTH)]


def test_label_mapping_and_ignore(tmp_path):
    root = make_folder(tmp_path)
    ds = VideoFolder(root, "val", transform=eval_transform())
    expected = np.select([raw_mask(2) == 10, raw_mask(2) == 20, raw_mask(2) == 255], [1, 2, 255], 0)
    np.testing.assert_array_equal(ds[1]["label"].numpy(), expected)
    # a raw value outside the mapping and the ignore value is an error naming the mask, when the mask is read
    bad = raw_mask(4)
    bad[30, 30] = 7
    write_palette_mask(root / "c" / "masks" / "f_4.png", bad)
    ds = VideoFolder(root, "val")
    ds[1]
    with pytest.raises(ValueError, match=re.escape(f"mask {root / 'c' / 'masks' / 'f_4.png'} has value(s) [7]")):
        ds[2]
    # also from a loader process, in one line
    with pytest.raises(MaskValueError) as raised:
        list(DataLoader(Subset(ds, [2]), num_workers=1))
    assert str(raised.value).startswith(f"mask {root / 'c' / 'masks' / 'f_4.png'} has value(s) [7] that ")
    assert "\n" not in str(raised.value)
    # another ignore value and a mapping
    classes = {"names": NAMES, "ignore": 0, "mapping": {"10": 2, "20": 1, "255": 0}}
    (root / "classes.json").write_text(json.dumps(classes))
    label = VideoFolder(root, "val")[0]["label"].numpy()
    np.testing.assert_array_equal(
        label, np.select([raw_mask(0) == 10, raw_mask(0) == 20, raw_mask(0) == 255], [2, 1, 0], 255)
    )
    del classes["mapping"]["255"]
    (root / "classes.json").write_text(json.dumps(classes))
    with pytest.raises(ValueError, match=re.escape(f"mask {root / 'c' / 'masks' / 'f_0.png'} has value(s) [255]")):
        VideoFolder(root, "val")[0]


def readme_dataset_class() -> str:
    """The README's example of a dataset class of the user's (the Python block of "Train on your own videos"),
    with a class that is not a dataset added."""
    section = README.read_text().split("## Train on your own videos\n")[1].split("\n## ")[0]
    (block,) = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    return block + "\n\nclass NotADataset:\n    pass\n"


def test_a_dataset_class_of_the_users(tmp_path, monkeypatch):
    (tmp_path / "my_videos.py").write_text(readme_dataset_class())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_videos", raising=False)
    cfg = load_config(overrides=["data.dataset=my_videos:Stripes", f"data.root={tmp_path}", "data.crop_size=16"])
    cls = dataset_class(cfg.data.dataset)
    assert issubclass(cls, ClipDataset) and cls.__name__ == "Stripes"
    info = dataset_info(cfg)
    assert info.classes == ("dark", "light") and info.palette == ((0, 0, 0), (255, 255, 255))
    dataset, indices = build_dataset(cfg, "train", train=True)
    assert isinstance(dataset, cls) and indices == list(range(10)) and dataset.root == tmp_path
    sample = dataset[3]
    assert sample["frames"].shape == (4, 3, 16, 16) and sample["frame"] == "003"
    assert set(sample["label"].unique().tolist()) <= {0, 1}
    # it takes no labels=False: prediction says so in one line, naming data.dataset
    with pytest.raises(ValueError, match=r"data.dataset 'my_videos:Stripes': the constructor of Stripes does not"):
        build_dataset(cfg, "test", train=False, labels=False)


def test_the_datasets_carry_their_classes(tmp_path):
    assert set(DATASETS) == {"synthetic", "vspw", "cityscapes", "camvid", "folder"}
    camvid = dataset_info(load_config(overrides=["data.dataset=camvid", f"data.root={tmp_path}"]))
    assert camvid.classes == CamVid.METAINFO["classes"] and camvid.num_classes == CamVid.num_classes == 11
    assert camvid.palette[3] == (128, 64, 128)  # road
    (tmp_path / "label_num_dic_final.json").write_text(json.dumps({"others": 0, "wall": 1, "ceiling": 2}))
    vspw = dataset_info(load_config(overrides=["data.dataset=vspw", f"data.root={tmp_path}"]))
    assert vspw.num_classes == 124 and vspw.classes[:3] == ("wall", "ceiling", "class_2")
    synthetic = dataset_info(load_config(overrides=["data.synthetic.num_classes=4"]))
    assert synthetic.classes == ("class_0", "class_1", "class_2", "class_3") and len(synthetic.palette) == 4
    folder = dataset_info(load_config(overrides=["data.dataset=folder", f"data.root={make_folder(tmp_path / 'f')}"]))
    assert folder.classes == tuple(NAMES) and folder.palette == tuple(tuple(c) for c in PALETTE)


def test_predict_equals_evaluation_and_reads_vspw_test_without_masks(tmp_path):
    """Prediction of a split without labels gives the class maps evaluation gives where the labels exist."""
    release = make_vspw(tmp_path, {"val": {"vid_c": 7}})
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model = SSLTM(124, **tiny_model_kwargs()).eval()
    # the 8x12 frames upsampled to 32x48 for the model (its smallest input is 32)
    kwargs = {"offsets": (3, 6, 9), "reference": "farthest", "transform": eval_transform(32)}
    labelled = VSPW(tmp_path, "val", **kwargs)
    evaluate(
        model,
        labelled,
        range(len(labelled)),
        124,
        env,
        tc=False,
        mvc_lengths=(),
        save_dir=tmp_path / "e",
        progress=False,
    )
    # the test split: the same video without its masks
    (release / "test.txt").write_text("vid_c\n")
    for mask in (release / "data" / "vid_c" / "mask").iterdir():
        mask.unlink()
    (release / "data" / "vid_c" / "mask").rmdir()
    with pytest.raises(FileNotFoundError, match="has no labels"):
        VSPW(tmp_path, "test", **kwargs)
    unlabelled = VSPW(tmp_path, "test", labels=False, **kwargs)
    assert predict(model, unlabelled, env, tmp_path / "p", progress=False) == 7
    assert pngs(tmp_path / "p" / "vid_c") == pngs(tmp_path / "e" / "vid_c") == [f"{t:08d}" for t in range(7)]
    for t in range(7):
        # evaluation writes the maps at the model's input size, prediction at the stored frame's
        a = np.asarray(Image.open(tmp_path / "p" / "vid_c" / f"{t:08d}.png"))
        b = torch.from_numpy(np.asarray(Image.open(tmp_path / "e" / "vid_c" / f"{t:08d}.png")).copy())
        assert a.shape == (8, 12) and b.shape == (32, 48)
        np.testing.assert_array_equal(a, torch.nn.functional.interpolate(b[None, None], (8, 12))[0, 0].numpy())
    unlabelled.queries = unlabelled.queries[::2]
    with pytest.raises(ValueError, match="video 'vid_c': prediction needs every frame as a query"):
        predict(model, unlabelled, env, tmp_path / "q")


def run_error(capsys, args: list[str]) -> str:
    assert main(args) == EXIT_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_bad_inputs_are_named(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    cfg = config_file(tmp_path)
    train = ["train", cfg, "--set", *folder_settings(root), "train.max_iters=1", "--work-dir", str(tmp_path / "w")]

    def check(message: str, args: list[str] = train) -> None:
        assert message in run_error(capsys, args)
        assert not (tmp_path / "w" / "latest.pt").exists()

    (root / "classes.json").rename(root / "kept.json")
    check(f"no classes.json at {root / 'classes.json'}")
    (root / "kept.json").rename(root / "classes.json")
    (root / "train.txt").rename(root / "kept.txt")
    check(f"split file not found: expected {root / 'train.txt'}")
    (root / "kept.txt").write_text("a\nmissing\n")
    (root / "kept.txt").rename(root / "train.txt")
    check(f"video 'missing' listed in {root / 'train.txt'} not found: expected a folder at {root / 'missing'}")
    (root / "missing" / "frames").mkdir(parents=True)
    check(f"video 'missing' has no frames: no .jpg, .jpeg, .png files in {root / 'missing' / 'frames'}")
    (root / "train.txt").write_text("a\n")
    write_palette_mask(root / "a" / "masks" / "f_99.png", raw_mask(0))
    check(f"mask {root / 'a' / 'masks' / 'f_99.png'} matches no frame")
    (root / "a" / "masks" / "f_99.png").unlink()
    (root / "classes.json").write_text(json.dumps({"names": NAMES, "palete": PALETTE}))
    check(f"{root / 'classes.json'}: unknown key(s) ['palete']")
    (root / "classes.json").write_text(json.dumps({"names": NAMES, "mapping": {"10": 3}}))
    check(f"{root / 'classes.json'}: 'mapping' sends 10 to 3, not a class id in 0..2")
    (root / "classes.json").write_text(json.dumps({"names": NAMES}))

    # import strings: an unknown module, a missing attribute, not a ClipDataset
    (tmp_path / "my_videos.py").write_text(readme_dataset_class())
    sys.path.insert(0, str(tmp_path))
    try:
        base = ["train", cfg, "--work-dir", str(tmp_path / "w"), "--set", f"data.root={root}", "train.max_iters=1"]
        unknown = "data.dataset=nowhere_module:Videos"
        check("data.dataset 'nowhere_module:Videos': no module named 'nowhere_module'", [*base, unknown])
        check("data.dataset 'my_videos:Missing': module 'my_videos' (", [*base, "data.dataset=my_videos:Missing"])
        check("has no attribute 'Missing'", [*base, "data.dataset=my_videos:Missing"])
        check("is not a subclass of ssltm.data.ClipDataset", [*base, "data.dataset=my_videos:NotADataset"])
        check("data.dataset must be one of", [*base, "data.dataset=my videos"])
        no_root = ["train", cfg, "--work-dir", str(tmp_path / "w"), "--set", "data.dataset=camvid", "train.max_iters=1"]
        check("data.root must name the folder of the camvid data", no_root)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_videos", None)


def test_predict_only_bad_inputs(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    cfg = config_file(tmp_path)
    never = tmp_path / "never.pt"  # the checks come before the checkpoint is read
    eval_args = ["eval", cfg, "--set", *folder_settings(root), "--checkpoint", str(never), "--predict-only"]
    assert "--predict-only needs --save-predictions DIR" in run_error(capsys, eval_args)
    out = ["--save-predictions", str(tmp_path / "p")]
    assert "--predict-only computes no metrics" in run_error(capsys, [*eval_args, *out, "--out", "m.json"])
    assert not (tmp_path / "p").exists()
