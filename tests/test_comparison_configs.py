"""Every shipped config: it loads, its header names the paper row it reproduces (or says there is none), and its
model, objectives and optimizer train 2 iterations on synthetic videos at the reduced widths of ``python -m
ssltm.smoke --reduced`` and evaluate into the metrics JSON (``ssltm.smoke``)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ssltm.checkpoint import load_checkpoint
from ssltm.config import CONFIG_DIR, load_config
from ssltm.smoke import config_files, config_name, main, smoke_config

CONFIGS = config_files()
IDS = [config_name(p) for p in CONFIGS]
# 'Table 5 (paper §4.4.2), row "+STT": 36.72', 'Supplementary Table 1 (§2.2, ...), video-based row "TCB": 41.42'
PAPER_ROW = re.compile(r'Table \d+ \([^)]*§[\d.]+[^)]*\),(?: [\w-]+)? row "[^"]+": \d+\.\d\d')
NO_NUMBER = re.compile("no published number", re.IGNORECASE)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")


def header(path: Path) -> str:
    """The comment lines a config file opens with, joined."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return " ".join(lines)


def test_the_configs_are_found():
    names = set(IDS)
    assert {"demo", "vspw_r101", "table5/temporal_loss", "table2/tcb_ocr", "swin_s/ssltm_mt"} <= names
    assert len(names) == len(CONFIGS) >= 25


def test_header_rule_tells_rows_from_other_comments():
    assert PAPER_ROW.search('Table 2 (paper §4.2.2, VSPW-SF), row "SSLTM (Ours)": 39.79 mIoU')
    assert PAPER_ROW.search('Supplementary Table 1 (§2.2, Swin-S backbone), video-based row "TCB": 41.42 mIoU')
    assert not PAPER_ROW.search("SSLTM with ResNet-101 on VSPW (480p), the paper's protocol (§4.1.2)")
    assert not PAPER_ROW.search('Table 5 (paper §4.4.2), row "+STT"')  # no number


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_loads_and_its_header_names_a_paper_row(path):
    cfg = load_config(path)
    assert cfg.work_dir
    text = header(path)
    assert PAPER_ROW.search(text) or NO_NUMBER.search(text), f"{path}: header names no paper row: {text[:200]!r}"


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_trains_and_evaluates_at_reduced_width(path, tmp_path):
    cfg = load_config(path)
    result = smoke_config(path, 2, tmp_path, reduced=True, keep_checkpoints=True)
    assert result.ok, f"{result.name}: {result.message} (log {result.log}):\n{result.log.read_text()[-3000:]}"
    metrics = result.metrics
    assert 0 <= metrics["mIoU"] <= 100 and 0 <= metrics["aAcc"] <= 100
    assert len(metrics["per_class"]) == 6  # the synthetic videos' classes
    assert {f"mVC{n}" for n in cfg.eval.mvc} <= set(metrics)
    assert ("TC" in metrics) == cfg.eval.tc
    ckpt = load_checkpoint(tmp_path / result.name / "latest.pt")
    assert ckpt["iteration"] == 2
    trained = ckpt["config"]
    assert trained["data"]["dataset"] == "synthetic" and trained["data"]["mode"] == "sf"
    # the config's own modules, switches, objectives and optimizer
    for key in ("short_term", "use_stt", "use_rfce", "use_gcc", "context", "decoder"):
        assert trained["model"].get(key) == cfg.model.get(key), key
    for key in ("objectives", "optimizer", "param_groups", "warmup_iters", "lr", "weight_decay"):
        assert trained["train"].get(key) == _plain(cfg.train.get(key)), key
    assert trained["data"]["offsets"] == list(cfg.data.offsets)


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def test_smoke_reports_one_line_per_config_and_fails_on_any_error(tmp_path, capsys):
    root = tmp_path / "configs"
    root.mkdir()
    shutil.copy(CONFIG_DIR / "demo.yaml", root / "good.yaml")
    (root / "bad.yaml").write_text("model:\n  short_term: lstm\n")
    status = main(["--iters", "1", "--reduced", "--root", str(root), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 1
    assert re.match(r"ERROR bad +[\d.]+ s  .*model\.short_term must be one of", lines[0]), lines[0]
    assert re.match(r"ok +good +[\d.]+ s  mIoU \d+\.\d\d", lines[1]), lines[1]
    assert lines[2] == "1 of 2 configs ok; logs under " + str(tmp_path / "out")
    good = tmp_path / "out" / "good"
    assert (good / "metrics.json").is_file() and (good / "smoke.log").is_file()
    assert not list(good.glob("*.pt"))  # checkpoints deleted after the evaluation
    assert main(["--configs", "nothing/*.yaml", "--root", str(root)]) == 2
    assert main(["--iters", "0", "--root", str(root)]) == 2
