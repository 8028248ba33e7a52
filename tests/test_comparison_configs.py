"""Every shipped config: it loads, its header names the paper row it reproduces (or says there is none), and its
model, objectives and optimizer train 2 iterations on synthetic videos at the reduced widths of ``python -m
ssltm.smoke --reduced`` and evaluate into the metrics JSON (``ssltm.smoke``); a Swin-S config trains with one
block per stage at Swin-S's widths, and is also built at full width on the meta device, where its parameter
count and optimizer groups are checked (a full-width run writes a checkpoint of 0.74 GB: ``python -m
ssltm.smoke`` without ``--reduced`` trains it)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from test_optim import swin_recipe

from ssltm.build import build_model
from ssltm.checkpoint import load_checkpoint
from ssltm.config import CONFIG_DIR, load_config
from ssltm.smoke import config_files, config_name, main, smoke_config

CONFIGS = config_files()
IDS = [config_name(p) for p in CONFIGS]


def backbone(path: Path) -> str:
    return (yaml.safe_load(path.read_text()).get("model") or {}).get("backbone", "resnet101")


REDUCED = [pytest.param(p, id=config_name(p)) for p in CONFIGS]  # every config, trained at reduced widths
# the Swin-S configs, reduced to one block per stage in training, are also built at full width (meta device)
FULL_WIDTH = [pytest.param(p, id=config_name(p)) for p in CONFIGS if backbone(p) == "swin_s"]
# 'Table 5 (paper §4.4.2), row "+STT": 36.72', 'Supplementary Table 1 (§2.2, ...), video-based row "TCB": 41.42'
PAPER_ROW = re.compile(r'Table \d+ \([^)]*§[\d.]+[^)]*\),(?: [\w-]+)? row "[^"]+":[^.]*?\d+\.\d\d')
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
    assert {p.id for p in FULL_WIDTH} == {n for n in names if n.startswith("swin_s/")}


def test_header_rule_tells_rows_from_other_comments():
    assert PAPER_ROW.search('Table 2 (paper §4.2.2, VSPW-SF), row "SSLTM (Ours)": 39.79 mIoU')
    assert PAPER_ROW.search('Supplementary Table 1 (§2.2, Swin-S backbone), video-based row "TCB": 41.42 mIoU')
    assert not PAPER_ROW.search("SSLTM with ResNet-101 on VSPW (480p), the paper's protocol (§4.1.2)")
    assert PAPER_ROW.search('Table 5 (paper §4.4.2), row "IFR": SSLTM Table 5, IFR 36.26 mIoU / 83.05 mVC8')
    assert not PAPER_ROW.search('Table 5 (paper §4.4.2), row "+STT"')  # no number
    assert not PAPER_ROW.search('Table 5 (paper §4.4.2), row "+STT". Published: 36.72')  # not in the row's sentence


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_loads_and_its_header_names_a_paper_row(path):
    cfg = load_config(path)
    assert cfg.work_dir
    text = header(path)
    assert PAPER_ROW.search(text) or NO_NUMBER.search(text), f"{path}: header names no paper row: {text[:200]!r}"


@pytest.mark.parametrize("path", REDUCED)
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


@pytest.mark.parametrize("path", FULL_WIDTH)
def test_full_width_config_builds_with_its_optimizer_groups(path):
    from ssltm.optim import build_optimizer

    cfg = load_config(path)
    with torch.device("meta"):
        model = build_model(cfg, 124, pretrained=False)
    optimizer = build_optimizer(cfg.train, model)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(decay) == len(names)  # every parameter in exactly one group
    for name, param in names.items():
        if name.endswith((".bias", "relative_position_bias_table")) or ".norm" in name:
            assert decay[id(param)] == 0.0, name
        elif param.ndim > 1:
            assert decay[id(param)] == cfg.train.weight_decay, name
    assert optimizer.param_groups[0]["lr"] == cfg.train.lr
    # supplementary Table 1's parameter counts (124 classes): OCRNet-Swin-S 55.5M (TCB, NetWarp-OCR and ETC-OCR
    # the same up to NetWarp's FlowCNN), UperNet 58.1M, SSLTM 59.3M
    paper = {"upernet": 58.1e6, "ssltm": 59.3e6, "ssltm_mt": 59.3e6}.get(Path(path).stem, 55.5e6)
    assert sum(p.numel() for p in names.values()) == pytest.approx(paper, rel=0.005)


@pytest.mark.parametrize("path", FULL_WIDTH)
def test_swin_configs_train_with_the_readme_recipe(path, tmp_path):
    (tmp_path / "recipe.yaml").write_text(swin_recipe())
    keys = yaml.safe_load(swin_recipe())["train"]
    recipe = OmegaConf.to_container(load_config(tmp_path / "recipe.yaml").train)
    train = OmegaConf.to_container(load_config(path).train)
    assert {key: train[key] for key in keys} == {key: recipe[key] for key in keys}
    assert train["optimizer"] == "adamw" and len(train["param_groups"]) == 3


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
