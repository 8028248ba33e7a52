"""``ssltm infer`` and ``ssltm.load_predictor``: the predictor's contract, camera / stream input (a fake OpenCV
capture), Ctrl-C on a live input, the output options, the H.264 and mp4v overlay videos, and bad input.

The tiny checkpoint and the frame helpers are tests/test_cli.py's.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import test_cli
from PIL import Image
from test_cli import FRAMES, frame_folder, run_error, tiny_model_kwargs, weights

import ssltm
from ssltm import SSLTM
from ssltm.cli import EXIT_INTERRUPTED, main
from ssltm.data import SyntheticVideos, eval_transform

trained = test_cli.trained  # the tiny checkpoint (a module-scoped fixture)
_reference_backend = test_cli._reference_backend  # autouse: the kernels' reference backend


def infer_args(checkpoint, source, out, *options: str) -> list[str]:
    return ["infer", "--checkpoint", str(checkpoint), "--input", str(source), "--out", str(out), *options]


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# --- the Python entry point ---------------------------------------------------------------------------------


def test_load_predictor_streams_like_causal_clips(trained):
    """step() on RGB frames gives model.predict's class maps on causal clips (the first frame the reference),
    int64 of the frame's size; reset() starts a new video; the classes and palette come with it."""
    predictor = ssltm.load_predictor(trained, device="cpu")
    assert predictor.classes == tuple(f"class_{k}" for k in range(6)) and predictor.num_classes == 6
    assert len(predictor.palette) == 6 and predictor.size is None and str(predictor.device) == "cpu"
    videos = SyntheticVideos(5, FRAMES, 32, seed=0, causal=True, reference="farthest", transform=eval_transform())
    model = SSLTM(6, **tiny_model_kwargs())
    model.load_state_dict(weights(trained))
    for video, length in ((4, 4), (3, 1)):
        predictor.reset()
        for t in range(length):
            frame = np.asarray(Image.fromarray(videos.read_frame(video, t)))  # read-only, as PIL gives it
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # torch warns about read-only arrays: the predictor copies them
                pred = predictor.step(frame)
            assert pred.dtype == np.int64 and pred.shape == (32, 32)
            if t == length - 1:  # a clip reaching back to the first frame; after reset(), a first frame
                clip = videos[video * FRAMES + t]
                expected = model.predict(clip["frames"][None], clip["reference"][None])[0].numpy()
                np.testing.assert_array_equal(pred, expected, err_msg=f"video {video}, frame {t}")


def test_predictor_resizes_and_returns_the_frames_size(trained):
    """With ``size`` the model sees the frame's shorter side at that size; the class map comes back at the
    frame's size, by nearest neighbour: here each of its 2x2 blocks is one class of the half-size map; frames too
    small for the model are named."""
    frames = [SyntheticVideos(1, 1, 64, seed=2).read_frame(0, 0)]
    half = ssltm.load_predictor(trained, device="cpu", size=32)
    alone = ssltm.load_predictor(trained, device="cpu")
    for frame in frames:
        small = half.resize(frame)
        assert small.shape == (32, 32, 3)
        expected = alone.step(small)
        assert expected.shape == (32, 32)
        np.testing.assert_array_equal(half.step(frame), expected.repeat(2, 0).repeat(2, 1))
    wide = ssltm.load_predictor(trained, device="cpu", overrides=["data.eval_size=40"])
    assert wide.size == 40 and wide.resize(np.zeros((60, 90, 3), np.uint8)).shape == (40, 60, 3)
    assert wide.step(np.zeros((61, 93, 3), np.uint8)).shape == (61, 93)


def test_predictor_names_bad_frames_and_sizes(trained):
    predictor = ssltm.load_predictor(trained, device="cpu")
    for frame, message in (
        (np.zeros((8, 8, 3), np.float32), "frame must be RGB uint8 (H, W, 3), got dtype float32"),
        (np.zeros((8, 8), np.uint8), "frame must be RGB uint8 of shape (H, W, 3), got shape (8, 8)"),
        (np.zeros((8, 8, 4), np.uint8), "got shape (8, 8, 4)"),
        (np.zeros((0, 8, 3), np.uint8), "got shape (0, 8, 3)"),
        (np.zeros((20, 48, 3), np.uint8), "frame must be at least 32 pixels high and wide, got 20x48"),
        ([[[0, 0, 0]]], "frame must be a numpy array, RGB uint8 (H, W, 3), got list"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            predictor.step(frame)
    small = ssltm.load_predictor(trained, device="cpu", size=16)
    with pytest.raises(ValueError, match="frame must be at least 32 pixels high and wide, got 16x16 after resizing"):
        small.step(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="size must be at least 1, got 0"):
        ssltm.load_predictor(trained, device="cpu", size=0)
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        ssltm.load_predictor(trained, device="tpu")


# --- cameras and streams ------------------------------------------------------------------------------------


class FakeCapture:
    """A camera or stream as OpenCV's VideoCapture shows it: endless BGR frames, no frame count, no frame rate.
    ``interrupt_at`` lists the reads (from 1) during which Ctrl-C is pressed, once per mention."""

    opened: list = []
    interrupt_at: tuple[int, ...] = ()

    def __init__(self, target):
        FakeCapture.opened.append(target)
        self.reads, self.released = 0, False
        self.video = SyntheticVideos(1, FRAMES, (32, 40), seed=5)

    def isOpened(self):  # noqa: N802 (OpenCV's name)
        return not self.released

    def read(self):
        self.reads += 1
        for _ in range(self.interrupt_at.count(self.reads)):
            os.kill(os.getpid(), signal.SIGINT)
        rgb = self.video.read_frame(0, (self.reads - 1) % FRAMES)
        return True, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)

    def get(self, prop):
        return {cv2.CAP_PROP_FPS: 0.0, cv2.CAP_PROP_FRAME_COUNT: -1.0}.get(prop, 0.0)

    def release(self):
        self.released = True


@pytest.fixture
def camera(monkeypatch):
    FakeCapture.opened, FakeCapture.interrupt_at = [], ()
    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    return FakeCapture


def test_camera_and_url_inputs_run_to_max_frames(tmp_path, trained, camera, capsys):
    for source, target in (("0", 0), ("rtsp://camera.local:554/stream", "rtsp://camera.local:554/stream")):
        out = tmp_path / str(target).replace("/", "_").replace(":", "_")
        assert main(infer_args(trained, source, out, "--max-frames", "2", "--labels-only")) == 0
        assert camera.opened[-1] == target  # a camera index as an int, a URL as it is
        assert files(out) == [f"labels/frame_{t:06d}.png" for t in range(2)]
        assert "2 frames: " in capsys.readouterr().out


def test_ctrl_c_ends_a_live_input_and_keeps_the_output(tmp_path, trained, camera, capsys):
    """The first Ctrl-C ends a camera or stream after the frame at hand: every frame so far is written. A second
    one interrupts: nothing is written, and the exit status says so; so does the first one on a video file."""
    before = signal.getsignal(signal.SIGINT)
    camera.interrupt_at = (3,)  # during the third frame's read
    out = tmp_path / "out"
    assert main(infer_args(trained, "1", out, "--no-overlays")) == 0
    assert files(out) == [
        "labels/frame_000000.png",
        "labels/frame_000001.png",
        "labels/frame_000002.png",
        "overlay.mp4",
    ]
    assert "3 frames (the input ended by Ctrl-C): " in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before

    camera.interrupt_at = (2, 2)
    out = tmp_path / "twice"
    assert main(infer_args(trained, "1", out)) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.splitlines()[-1] == f"ssltm infer: interrupted; {out} is left as it was"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing of the second run, not even staging
    assert signal.getsignal(signal.SIGINT) is before

    video = tmp_path / "clip.mp4"  # a video file (read by the fake capture): Ctrl-C interrupts at once
    video.write_bytes(b"")
    camera.interrupt_at = (2,)
    assert main(infer_args(trained, video, tmp_path / "from_file")) == EXIT_INTERRUPTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "out"]


# --- outputs ------------------------------------------------------------------------------------------------


def test_output_options(tmp_path, trained):
    """--no-overlays drops the overlay JPEGs and keeps the video, --labels-only keeps the labels alone; the
    labels are the same in every case."""
    frames = frame_folder(tmp_path, 2)
    names = [f"{t:03d}" for t in range(2)]
    labels = [f"labels/{n}.png" for n in names]
    expected = {
        "all": sorted([*labels, *[f"overlays/{n}.jpg" for n in names], "overlay.mp4"]),
        "--no-overlays": [*labels, "overlay.mp4"],
        "--labels-only": labels,
    }
    for option, written in expected.items():
        out = tmp_path / option.strip("-")
        assert main(infer_args(trained, frames, out, *([option] if option != "all" else []))) == 0
        assert files(out) == written, option
        assert [Image.open(out / name).tobytes() for name in labels] == [
            Image.open(tmp_path / "all" / name).tobytes() for name in labels
        ]


def test_overlay_video_is_h264_with_pyav(tmp_path, trained, capsys):
    """An odd frame size gets one more row and column (H.264's yuv420p needs even sizes), and says so; the video
    decodes (PyAV and OpenCV) to the overlays at the frame rate asked for."""
    frames = frame_folder(tmp_path, 4, size=33)
    out = tmp_path / "out"
    assert main(infer_args(trained, frames, out, "--fps", "12.5")) == 0
    assert "note: overlay.mp4 is 34x34, the frames 33x33: its coding needs an even width" in capsys.readouterr().out
    with av.open(str(out / "overlay.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and (stream.width, stream.height) == (34, 34)
        assert stream.average_rate == Fraction(25, 2)
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == 4
    for t, frame in enumerate(decoded):
        jpeg = np.asarray(Image.open(out / "overlays" / f"{t:03d}.jpg"), np.float32)
        assert np.abs(frame[:33, :33] - jpeg).mean() < 8, t  # two lossy codings of one picture
        assert np.abs(frame[33, :33].astype(np.float32) - frame[32, :33]).mean() < 8  # the repeated row
    capture = cv2.VideoCapture(str(out / "overlay.mp4"))
    assert capture.isOpened() and int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 4


def test_overlay_video_falls_back_to_mp4v_without_pyav(tmp_path, trained, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av fails, as where PyAV is not installed
    frames = frame_folder(tmp_path, 3, size=33)
    out = tmp_path / "out"
    assert main(infer_args(trained, frames, out)) == 0
    assert "which web browsers do not play; pip install 'ssltm[video]'" in capsys.readouterr().out
    capture = cv2.VideoCapture(str(out / "overlay.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3 and capture.read()[1].shape == (34, 34, 3)
    monkeypatch.undo()
    with av.open(str(out / "overlay.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"  # MPEG-4 Part 2, OpenCV's mp4v


# --- bad input ----------------------------------------------------------------------------------------------


def test_inputs_that_give_no_frames_fail_before_the_model(tmp_path, capsys):
    """One line naming --input, before the checkpoint is read (it does not exist here), and no output."""
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    h264 = tmp_path / "whole.mp4"
    with av.open(str(h264), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for t in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * t, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(h264.read_bytes()[: h264.stat().st_size // 2])
    empty = tmp_path / "empty.avi"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 32)).release()
    (tmp_path / "no_frames").mkdir()
    out = tmp_path / "out"
    for source, message in (
        ("99", "--input: OpenCV cannot open camera 99"),
        ("rtsp://127.0.0.1:1/none", "--input: OpenCV cannot open the stream rtsp://127.0.0.1:1/none"),
        (garbage, f"--input: OpenCV cannot open the video file {garbage}"),
        (truncated, f"--input: OpenCV cannot open the video file {truncated}"),
        (empty, f"--input: OpenCV opens the video file {empty} but reads no frame from it"),
        (tmp_path / "no_frames", f"no images (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp) in the folder {tmp_path}"),
    ):
        err = run_error(capsys, infer_args(tmp_path / "missing.pt", source, out))
        assert err.startswith("ssltm infer: error: ") and message in err and err.count("\n") == 1, err
        assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
