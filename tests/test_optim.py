"""Optimizer recipes (ssltm.optim): parameter groups by name, SGD/AdamW, linear warm-up then poly, the README's
Swin recipe, exact resume of an AdamW run with groups, and the config errors."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from test_checkpointing import _deterministic  # noqa: F401 (autouse: reference kernels, deterministic algorithms)
from test_cli import TINY, assert_same_weights, config_file, log_records
from test_model import tiny_model
from torch import nn

from ssltm import SSLTM
from ssltm.checkpoint import load_checkpoint
from ssltm.cli import EXIT_ERROR, main
from ssltm.config import ConfigError, load_config
from ssltm.optim import PolySchedule, build_optimizer, build_schedule, load_optimizer_state

README = Path(__file__).resolve().parents[1] / "README.md"
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def train_config(*overrides: str):
    return load_config(overrides=list(overrides)).train


def group_of(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict]:
    """Each parameter's name -> its optimizer group."""
    index = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    return {name: index[id(p)] for name, p in model.named_parameters()}


def swin_recipe() -> str:
    """The README's Swin recipe: the YAML block of the "Optimizer recipes" section."""
    section = README.read_text().split("### Optimizer recipes", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_poly_schedule():
    schedule = PolySchedule(max_iters=10, power=0.9, min_ratio=0.1)
    assert schedule(0) == 1.0
    assert schedule(5) == pytest.approx(0.9 * 0.5**0.9 + 0.1)
    assert schedule(10) == pytest.approx(0.1) and schedule(12) == pytest.approx(0.1)
    assert PolySchedule(None, 0.9, 0.0)(7) == 1.0  # not fitted yet


def test_groups_take_their_learning_rate_and_weight_decay():
    model = tiny_model()
    train = train_config(
        "train.weight_decay=0.01",
        r"train.param_groups=[{pattern: '^backbone\.', lr_mult: 0.1}, {pattern: '\.bias$', decay_mult: 0}]",
    )
    optimizer = build_optimizer(train, model)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [(g["lr"], g["weight_decay"], g["momentum"]) for g in optimizer.param_groups] == [
        (0.002, 0.01, 0.9),  # the default group first
        (pytest.approx(0.0002), 0.01, 0.9),  # backbone: lr_mult 0.1
        (0.002, 0.0, 0.9),  # biases: decay_mult 0
    ]
    groups = group_of(optimizer, model)
    default, backbone, biases = optimizer.param_groups
    for name, group in groups.items():
        if name.startswith("backbone."):
            assert group is backbone, name  # its biases too: the first matching pattern wins
        elif name.endswith(".bias"):
            assert group is biases, name
        else:
            assert group is default, name
    assert groups["neck.laterals.0.0.weight"] is default and groups["backbone.bn1.bias"] is backbone
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    # the default: the paper's SGD, one group
    (only,) = build_optimizer(train_config(), model).param_groups
    assert (only["lr"], only["weight_decay"], only["momentum"], len(only["params"])) == (0.002, 1e-4, 0.9, len(groups))


@pytest.mark.parametrize("it", [0, 750, 1500])
def test_warmup_then_poly_matches_the_closed_form(it):
    """Every group at iteration it of 1500 warm-up iterations: mmcv's linear warm-up of its poly value,
    lr_g * (1 - it/max_iters)^power * (1 - (1 - it/1500)(1 - ratio)), lr_g = lr * lr_mult."""
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    train = train_config(
        "train.optimizer=adamw",
        "train.lr=6e-5",
        "train.warmup_iters=1500",
        "train.poly_power=1.0",
        "train.param_groups=[{pattern: '^1', lr_mult: 10}]",
    )
    assert train.warmup_ratio == 1e-6
    optimizer = build_optimizer(train, model)
    schedule, scheduler = build_schedule(train, optimizer)
    schedule.max_iters = 16000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # stepping the schedule without optimizer steps
        for _ in range(it):
            scheduler.step()
    poly = 1 - it / 16000
    warm = {0: 1e-6, 750: 0.5 + 0.5e-6, 1500: 1.0}[it]  # 1 - (1 - it/1500)(1 - 1e-6), then 1
    assert schedule(it) == pytest.approx(warm * poly, rel=1e-12)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
        [6e-5 * warm * poly, 6e-4 * warm * poly], rel=1e-9
    )


def test_swin_recipe_takes_the_norms_biases_and_bias_tables_out_of_weight_decay(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(swin_recipe())
    train = load_config(path).train
    with torch.device("meta"):
        swin = SSLTM(124, "swin_s")  # the paper's SSLTM on Swin-S
    ssltm = tiny_model()  # ResNet-18 and STT
    for model in (swin, ssltm):
        optimizer = build_optimizer(train, model)
        assert isinstance(optimizer, torch.optim.AdamW)
        assert all(g["lr"] == 6e-5 and g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)
        groups = group_of(optimizer, model)
        checked = 0
        for module_name, module in model.named_modules():
            for name, _ in module.named_parameters(prefix=module_name, recurse=False):
                decay = groups[name]["weight_decay"]
                leaf = name.rsplit(".", 1)[1]
                if leaf in ("bias", "relative_position_bias_table"):
                    assert decay == 0.0, name
                elif isinstance(module, NORMS) and name.startswith(("backbone.", "stt.")):
                    assert decay == 0.0, name  # the decoders' BatchNorm weights keep weight decay (README)
                elif isinstance(module, (nn.Conv2d, nn.Linear)):
                    assert decay == 0.01, name
                else:
                    continue
                checked += 1
        assert checked > 0.9 * len(groups)
    schedule, _ = build_schedule(train, optimizer)
    assert (schedule.warmup_iters, schedule.warmup_ratio, schedule.power, schedule.min_ratio) == (1500, 1e-6, 1.0, 0.0)


ADAMW_RUN = r"""
train:
  optimizer: adamw
  weight_decay: 0.01
  warmup_iters: 3
  warmup_ratio: 0.1
  param_groups:
    - {pattern: '^backbone\.', lr_mult: 0.1}
    - {pattern: '\.bias$', decay_mult: 0.0}
"""


def test_adamw_run_with_groups_resumes_exactly(tmp_path):
    """Resumed at 2 of 4 iterations (inside the warm-up), an AdamW run with parameter groups equals the
    uninterrupted one bit for bit: weights, moments, every group's learning rate and weight decay."""
    cfg = config_file(tmp_path, ADAMW_RUN)
    common = [
        *TINY,
        "train.lr=1e-4",
        "train.max_iters=4",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "train.validate=false",
    ]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["train", cfg, "--set", *common, "--work-dir", str(whole)]) == 0
    args = ["train", cfg, "--set", *common, "--work-dir", str(resumed), "--resume", str(whole / "iter_2.pt")]
    assert main(args) == 0
    a, b = load_checkpoint(whole / "iter_4.pt"), load_checkpoint(resumed / "iter_4.pt")
    assert_same_weights(a["model"], b["model"])
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[key], state_b[key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    base = [(g["initial_lr"], g["weight_decay"]) for g in b["optimizer"]["param_groups"]]
    assert base == [(1e-4, 0.01), (pytest.approx(1e-5), 0.01), (1e-4, 0.0)]
    steps = lambda work: [(r["iter"], r["total"], r["lr"]) for r in log_records(work) if "total" in r]
    assert steps(resumed) == steps(whole)[2:]
    # the logged lr (the default group's) at steps 0..3: linear warm-up over 3 iterations, then poly 0.9 over 4
    warm = [1 - (1 - i / 3) * 0.9 for i in range(3)] + [1.0]
    assert [lr for _, _, lr in steps(whole)] == pytest.approx(
        [1e-4 * w * (1 - i / 4) ** 0.9 for i, w in enumerate(warm)]
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.optimizer=adam", r"train.optimizer must be one of \('sgd', 'adamw'\), got 'adam'"),
        ("train.warmup_iters=-1", "train.warmup_iters must be >= 0"),
        ("train.warmup_ratio=0", r"train.warmup_ratio must be in \(0, 1\], got 0.0"),
        ("train.warmup_ratio=1.5", r"train.warmup_ratio must be in \(0, 1\], got 1.5"),
        ("train.betas=[0.9]", r"train.betas must be \[beta1, beta2\]"),
        ("train.betas=[0.9,1.0]", r"train.betas must be \[beta1, beta2\]"),
        ("train.param_groups=[{pattern: x, lr_mult: -1}]", r"train.param_groups\[0\].lr_mult must be >= 0, got -1.0"),
        (
            "train.param_groups=[{pattern: a}, {pattern: b, decay_mult: -0.5}]",
            r"train.param_groups\[1\].decay_mult must be >= 0, got -0.5",
        ),
        ("train.param_groups=[{lr_mult: 2}]", r"train.param_groups\[0\].pattern is missing"),
        ("train.param_groups=[{pattern: '('}]", r"train.param_groups\[0\].pattern '\(' is not a regular expression"),
        ("train.param_groups=[{patern: x}]", "unknown key 'patern' in a train.param_groups entry"),
        ("train.param_groups.0.pattern=x", r"set a list key as a whole, e.g. train.param_groups=\[...\]"),
        ('train.param_groups=[{pattern: "\\.bias"}]', r"the value is not valid YAML \(found unknown escape"),
    ],
)
def test_bad_optimizer_keys_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_a_pattern_that_takes_no_parameter_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match=r"train.param_groups\[1\].pattern 'backbone' matches no parameter"):
        build_optimizer(train_config("train.param_groups=[{pattern: bias}, {pattern: backbone}]"), model)
    taken = r"train.param_groups\[1\].pattern '\^1' matches only parameters that earlier entries took \(2; the first"
    with pytest.raises(ConfigError, match=taken):
        build_optimizer(train_config("train.param_groups=[{pattern: .}, {pattern: '^1'}]"), model)


def test_the_cli_names_a_pattern_that_takes_no_parameter(tmp_path, capsys):
    args = [
        "train",
        config_file(tmp_path),
        "--set",
        *TINY,
        "train.max_iters=1",
        "train.param_groups=[{pattern: gamma}]",
    ]
    assert main([*args, "--work-dir", str(tmp_path / "run")]) == EXIT_ERROR
    assert "train.param_groups[0].pattern 'gamma' matches no parameter of the model" in capsys.readouterr().err


def test_resume_with_another_optimizer_or_other_groups_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    grouped = train_config("train.param_groups=[{pattern: bias, decay_mult: 0}]")
    ckpt = {"optimizer": build_optimizer(grouped, model).state_dict(), "config": {"train": {"optimizer": "sgd"}}}
    restored = build_optimizer(grouped, model)
    restored.param_groups[1]["weight_decay"] = 0.5
    load_optimizer_state(restored, ckpt, grouped, "ckpt.pt")
    assert restored.param_groups[1]["weight_decay"] == 0.0  # the checkpoint's
    adamw = train_config("train.optimizer=adamw", "train.param_groups=[{pattern: bias, decay_mult: 0}]")
    with pytest.raises(ConfigError, match="ckpt.pt was trained with train.optimizer='sgd', this config has 'adamw'"):
        load_optimizer_state(build_optimizer(adamw, model), ckpt, adamw, "ckpt.pt")
    single = train_config()
    with pytest.raises(ConfigError, match=r"ckpt.pt holds parameter groups of \[2, 2\] parameters, .* gives \[4\]"):
        load_optimizer_state(build_optimizer(single, model), ckpt, single, "ckpt.pt")
