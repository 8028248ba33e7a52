"""The demo: train a small SSLTM on synthetic videos for a few minutes on whatever device is there, evaluate
it on held-out videos and compare its mIoU with always predicting the most frequent class."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .build import build_dataset, dataset_info, load_model
from .config import load_config
from .distributed import resolve_device
from .evaluate import results_json, results_table
from .metrics import confusion_matrix, miou
from .visualize import prediction_picture

DEMO_CONFIG = "demo"  # configs/demo.yaml


def majority_baseline(cfg) -> tuple[int, float]:
    """The most frequent class of the training videos, and the mIoU of predicting it everywhere in the
    validation videos (the score of a model that learned nothing but the class frequencies)."""
    train_set, train_indices = build_dataset(cfg, "train", train=False)
    val_set, val_indices = build_dataset(cfg, "val", train=False)
    k = train_set.num_classes
    counts = np.zeros(k, np.int64)
    for i in train_indices:
        counts += np.bincount(train_set.read_label(*train_set.queries[i]).ravel(), minlength=k)
    majority = int(counts.argmax())
    conf = np.zeros((k, k), np.int64)
    for i in val_indices:
        label = val_set.read_label(*val_set.queries[i])
        conf += confusion_matrix(np.full_like(label, majority), label, k)
    return majority, miou(conf)


def demo(
    max_minutes: float = 1.5, out: str | Path = "work_dirs/demo", device: str = "auto", overrides: Sequence[str] = ()
) -> dict:
    """Train ``configs/demo.yaml`` (with ``overrides``) for ``max_minutes``, evaluate, write ``out/metrics.json``
    and ``out/predictions.png``; return the metrics (percent)."""
    from .train import run_files, train  # the trainer loads with the run, not with the demo's baseline and picture

    out = Path(out)
    settings = [f"train.max_minutes={max_minutes}", f"work_dir={out / 'train'}", f"device={device}", *overrides]
    cfg = load_config(DEMO_CONFIG, settings)
    for path in run_files(Path(cfg.work_dir)):  # an earlier demo's: each demo trains afresh and rewrites ``out``
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    start = time.perf_counter()
    result = train(cfg)
    info = dataset_info(cfg)
    metrics = results_json(result.val_results, info.classes)
    majority, baseline = majority_baseline(cfg)
    dev = resolve_device(device)
    model, _, _ = load_model(result.checkpoint, dev)
    picture = out / "predictions.png"
    val_set, val_indices = build_dataset(cfg, "val", train=False)
    Image.fromarray(prediction_picture(model, val_set, val_indices, dev, info.classes, info.palette)).save(picture)
    metrics.update(
        baseline_mIoU=round(100 * baseline, 2),
        baseline_class=info.classes[majority],
        iterations=result.iteration,
        device=str(dev),
        seconds=round(time.perf_counter() - start, 1),
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(results_table(result.val_results, info.classes))
    print(
        f"\nheld-out synthetic videos: mIoU {metrics['mIoU']:.2f} % after {result.iteration} iterations on {dev}; "
        f"always predicting the most frequent class ({info.classes[majority]}) scores {100 * baseline:.2f} %"
    )
    print(f"wrote {out / 'metrics.json'} and {picture} (frames / ground truth / prediction, class colours)")
    return metrics
