"""ONNX export (``ssltm export``): the graphs run in onnxruntime and give PyTorch's logits at two frame sizes, the
deployment predictor streams a video to the class maps of ``VideoPredictor``, and bad input fails in one line.

One export of a tiny SSLTM (ResNet-18, narrow heads, one STT unit per stride, 3x3 windows so that small frames
have every level larger than a window; offsets 1, 2, 3 so that a short video reuses and drops cached frames)
serves the module; tracing it takes most of the time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import ssltm.export as export_module  # noqa: E402
from ssltm.build import build_model, dataset_info  # noqa: E402
from ssltm.checkpoint import save_checkpoint  # noqa: E402
from ssltm.cli import EXIT_ERROR, main  # noqa: E402
from ssltm.config import load_config  # noqa: E402
from ssltm.data import SyntheticVideos  # noqa: E402
from ssltm.export import MANIFEST, OUTPUTS, OnnxPredictor  # noqa: E402
from ssltm.infer import to_input  # noqa: E402
from ssltm.model import VideoPredictor  # noqa: E402

TINY_MODEL = [
    "model.backbone=resnet18",
    "model.kwargs.fpn_dim=32",
    "model.kwargs.ppm_dim=32",
    "model.kwargs.stt_dims=[8,8,16,16]",
    "model.kwargs.head_dim=8",
    "model.kwargs.context_dim=16",
    "model.kwargs.head_channels=16",
    "model.kwargs.aux_channels=16",
    "model.kwargs.window_size=[4,3,3]",
    "data.offsets=[1,2,3]",
]
MIN_SIDE = 32 * 3 + 1  # the stride-32 level larger than a 3x3 window
VIDEO = SyntheticVideos(num_videos=2, num_frames=6, size=(MIN_SIDE + 6, 121), num_classes=6, seed=3)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")  # the PyTorch side: the Triton interpreter would be slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model with random weights whose batch-norm statistics are those of a synthetic clip (so that its
    logits are of a trained model's size and its class maps are not constant)."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY_MODEL)
    model = build_model(cfg, 6, pretrained=False)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # the running statistics become those of the next forward
    clip = [to_input(VIDEO.read_frame(1, t), torch.device("cpu")) for t in (3, 2, 1, 0)]
    with torch.no_grad():
        model.train()(torch.stack(clip)[None], clip[-1][None])
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    meta = dataset_info(cfg).as_dict()
    save_checkpoint(path, {"model": model.state_dict(), "config": OmegaConf.to_container(cfg), "meta": meta})
    return path, model.eval()


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """The export folder, written through the command line."""
    out = tmp_path_factory.mktemp("export") / "onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSLTM_BACKEND", "reference")
        assert main(["export", "--checkpoint", str(checkpoint[0]), "--out", str(out)]) == 0
    return out


def test_export_files_and_manifest(exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(OUTPUTS)
    manifest = OnnxPredictor(exported).manifest
    assert manifest["offsets"] == [1, 2, 3] and manifest["min_size"] == [MIN_SIDE, MIN_SIDE]
    assert manifest["classes"] == [f"class_{k}" for k in range(6)] and len(manifest["palette"]) == 6
    assert manifest["clip"]["frames"] == 4 and manifest["reference"]["frame"] == 0
    decoder = manifest["graphs"]["decoder"]
    assert [v["name"] for v in decoder["inputs"]] == ["clip0", "clip1", "clip2", "clip3", "categories", "size"]
    assert decoder["inputs"][0]["shape"] == [1, 4, "h0", "w0", 8]
    assert [v["name"] for v in decoder["outputs"]] == ["logits", "labels"]
    assert manifest["graphs"]["encoder"]["inputs"] == [
        {"name": "frame", "dtype": "float32", "shape": [1, 3, "height", "width"]}
    ]
    for graph in manifest["graphs"].values():  # the reference ops only: standard ONNX operators
        nodes = onnx.load(str(exported / graph["file"])).graph.node
        assert {n.domain for n in nodes} <= {""}, graph["file"]
        assert not any("ssltm" in n.op_type for n in nodes)


@pytest.mark.parametrize("size", [(MIN_SIDE + 4, 131), (128, 160)])
def test_graphs_give_the_models_logits(checkpoint, exported, size):
    """The clip (query + 3 adjacent frames) and a reference frame through encoder, reference and decoder in
    onnxruntime: the logits of ``SSLTM.forward``, at a size other than the traced one (odd, not a multiple of any
    stride or window) and at a multiple of 32."""
    model = checkpoint[1]
    video = SyntheticVideos(num_videos=1, num_frames=5, size=size, num_classes=6, seed=5)
    frame = [to_input(video.read_frame(0, t), torch.device("cpu")) for t in range(5)]
    frames, reference = torch.stack(frame[4:0:-1])[None], frame[0][None]
    with torch.no_grad():
        expected = model(frames, reference)["logits"]
    sessions = {name: ort.InferenceSession(str(exported / f"{name}.onnx")) for name in ("encoder", "reference")}
    encoded = [sessions["encoder"].run(None, {"frame": x[None].numpy()}) for x in frames[0]]
    ref_levels = sessions["encoder"].run(None, {"frame": reference.numpy()})
    categories = sessions["reference"].run(None, {f"level{i}": x for i, x in enumerate(ref_levels)})[0]
    feeds = {f"clip{i}": np.stack([levels[i] for levels in encoded], axis=1) for i in range(4)}
    feeds |= {"categories": categories, "size": np.array(size, np.int64)}
    logits, labels = ort.InferenceSession(str(exported / "decoder.onnx")).run(None, feeds)
    assert logits.shape == (1, 6, *size)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(labels, logits.argmax(1))


def test_onnx_predictor_streams_the_class_maps_of_video_predictor(checkpoint, exported):
    """Six frames (the cache of the first ones dropped on the way) give VideoPredictor's class maps, up to pixels
    whose two best classes are within rounding of each other."""
    torch_predictor, onnx_predictor = VideoPredictor(checkpoint[1], (1, 2, 3)), OnnxPredictor(exported)
    for t in range(VIDEO.num_frames):
        rgb = VIDEO.read_frame(0, t)
        expected = torch_predictor.step(to_input(rgb, torch.device("cpu"))).numpy()
        got = onnx_predictor.step(rgb)
        assert got.shape == rgb.shape[:2] and got.dtype == np.int64
        assert (got != expected).mean() <= 1e-3, f"frame {t}: {(got != expected).sum()} pixels differ"
        assert len(np.unique(got)) > 2  # a constant map would match trivially
    with pytest.raises(ValueError, match="this video's frames are"):
        onnx_predictor.step(np.zeros((MIN_SIDE, MIN_SIDE, 3), np.uint8))
    onnx_predictor.reset()
    with pytest.raises(ValueError, match="at least"):
        onnx_predictor.step(np.zeros((64, 200, 3), np.uint8))


# --- bad input: one line naming the problem, nothing written ---------------------------------------------------


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_unwritable_out_is_refused_first(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    # --out is checked before the checkpoint is read (that one does not exist)
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(blocker / "onnx")]) == EXIT_ERROR
    assert _error_line(capsys).startswith("ssltm export: error: --out: cannot create")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "other")]) == EXIT_ERROR
    assert "--out:" in _error_line(capsys) and (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_missing_checkpoint_and_missing_onnx(tmp_path, capsys, monkeypatch):
    out = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(out)]) == EXIT_ERROR
    assert "checkpoint not found" in _error_line(capsys)
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # as if not installed
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(out)]) == EXIT_ERROR
    assert "pip install ssltm[export]" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    def fail(model, folder):
        (folder / "encoder.onnx").write_bytes(b"partial")
        raise RuntimeError("stopped")

    monkeypatch.setattr(export_module, "_export_graphs", fail)
    with pytest.raises(RuntimeError, match="stopped"):
        export_module.export_onnx(checkpoint[0], tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match=MANIFEST):
        OnnxPredictor(tmp_path)
