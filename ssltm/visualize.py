"""Pictures of predictions: colour palettes, label PNGs, overlays and side-by-side comparisons."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw

from .data import IGNORE_INDEX
from .flow import to_uint8_rgb

PICTURE_FRAMES = 4  # frames prediction_picture shows
PICTURE_SCALE = 2  # how much larger than the frames it shows them


def make_palette(num_classes: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``num_classes`` distinct, saturated RGB colours (a fixed function of ``num_classes`` and ``seed``)."""
    rng = np.random.default_rng(seed)
    # Hues spread evenly and shuffled so that neighbouring class ids differ clearly.
    hues = rng.permutation(num_classes) / max(num_classes, 1)
    colours = []
    for k, hue in enumerate(hues):
        value = 0.95 if k % 2 == 0 else 0.7
        colours.append(_hsv_to_rgb(float(hue), 0.75, value))
    return colours


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return round(255 * r), round(255 * g), round(255 * b)


def palette_array(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """uint8 ``(256, 3)`` lookup table: class ``k`` -> ``palette[k]``, anything else (ignore) -> black."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    return table


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Class ids ``(H, W)`` (values up to 255; ``IGNORE_INDEX`` black) as RGB uint8 ``(H, W, 3)``."""
    return palette_array(palette)[np.asarray(labels, np.uint8)]


def overlay(frame: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """The RGB uint8 ``frame`` ``(H, W, 3)`` blended with the colourised ``labels`` (``alpha`` = label weight)."""
    colours = colorize(labels, palette).astype(np.float32)
    blended = (1 - alpha) * frame.astype(np.float32) + alpha * colours
    keep = np.asarray(labels) == IGNORE_INDEX
    blended[keep] = frame[keep]
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def save_label_png(path: str | Path, labels: np.ndarray, palette: Sequence[Sequence[int]]) -> None:
    """Class ids ``(H, W)`` as a palette PNG: the pixel values are the ids, and viewers show the colours."""
    image = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    image.putpalette(palette_array(palette).reshape(-1).tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def comparison_grid(
    rows: Sequence[tuple[str, Sequence[np.ndarray]]], gap: int = 4, label_height: int = 14
) -> np.ndarray:
    """Rows of equally sized RGB images side by side, each row titled: e.g. frames / ground truth / prediction.

    Args:
        rows: ``(title, images)`` per row; every image RGB uint8 of one ``(H, W)``; rows of equal length.
    """
    h, w = rows[0][1][0].shape[:2]
    columns = len(rows[0][1])
    height = len(rows) * (label_height + h + gap)
    width = columns * (w + gap) - gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for title, images in rows:
        if len(images) != columns:
            raise ValueError(f"row {title!r} has {len(images)} images, the first row {columns}")
        draw.text((2, y + 1), title, fill=(0, 0, 0))
        y += label_height
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image), (c * (w + gap), y))
        y += h + gap
    return np.asarray(canvas)


def class_legend(
    classes: Sequence[str],
    palette: Sequence[Sequence[int]],
    width: int,
    swatch: int = 12,
    gap: int = 4,
    line_height: int = 16,
) -> np.ndarray:
    """The colour key of a picture: each class's name after a ``swatch``-pixel square of its palette colour,
    left to right, wrapped into lines of at most ``width`` pixels; RGB uint8 ``(lines * line_height, width, 3)``
    on white."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    places, x, y = [], 0, 0
    for name, colour in zip(classes, palette, strict=True):
        entry = swatch + gap + math.ceil(measure.textlength(name))
        if x > 0 and x + entry > width:
            x, y = 0, y + line_height
        places.append((x, y, name, tuple(int(c) for c in colour)))
        x += entry + 3 * gap
    canvas = Image.new("RGB", (width, y + line_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for x, y, name, colour in places:
        top = y + (line_height - swatch) // 2
        draw.rectangle((x, top, x + swatch - 1, top + swatch - 1), fill=colour)
        draw.text((x + swatch + gap, y + 2), name, fill=(0, 0, 0))
    return np.asarray(canvas)


def prediction_picture(
    model,
    dataset,
    indices: Sequence[int],
    device: torch.device,
    classes: Sequence[str],
    palette,
    max_height: int | None = None,
) -> np.ndarray:
    """Frames, ground truth and prediction of a few frames spread over the first video of ``dataset[indices]``
    (each query predicted from its clip, as evaluation does), above the colour key of the classes: RGB uint8
    ``(H, W, 3)``. The images are shown PICTURE_SCALE times as large as the frames, but no more than
    ``max_height`` rows high (nearest neighbour). ``model`` is used in eval mode and left in the mode it was in."""
    video = dataset.queries[indices[0]][0]
    frames = [i for i in indices if dataset.queries[i][0] == video]
    picks = [frames[round(j * (len(frames) - 1) / (PICTURE_FRAMES - 1))] for j in range(PICTURE_FRAMES)]
    rows: dict[str, list[np.ndarray]] = {"frame": [], "ground truth": [], "prediction": []}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in picks:
                sample = dataset[i]
                pred = model.predict(sample["frames"][None].to(device), sample["reference"][None].to(device))[0]
                rows["frame"].append(to_uint8_rgb(sample["frames"][0]))
                rows["ground truth"].append(colorize(sample["label"].numpy(), palette))
                rows["prediction"].append(colorize(pred.cpu().numpy(), palette))
    finally:
        model.train(was_training)
    h, w = rows["frame"][0].shape[:2]
    scale = PICTURE_SCALE if max_height is None else min(PICTURE_SCALE, max_height / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    scaled = [
        (title, [cv2.resize(image, size, interpolation=cv2.INTER_NEAREST) for image in images])
        for title, images in rows.items()
    ]
    grid = comparison_grid(scaled)
    return np.concatenate([grid, class_legend(classes, palette, grid.shape[1])])
