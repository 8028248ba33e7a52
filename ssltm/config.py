"""Run configuration: a typed OmegaConf schema, YAML files in ``configs/`` and ``--set key=value`` overrides.

Every key a run reads is declared below with its default; a YAML file or an override that names any
other key is an error naming it (OmegaConf's struct mode), and values are converted to the declared
types. :func:`load_config` returns the merged, validated ``DictConfig``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .data import DATASETS, IMPORT_STRING
from .data.base import MODES as DATA_MODES
from .flow import FLOW_PROVIDERS, FLOWS
from .metrics import TC_PROTOCOLS
from .model.backbone import BACKBONES
from .model.ocrnet import DECODERS, OCR_SHORT_TERM
from .model.short_term import SHORT_TERM, resolve_short_term

AMP_MODES = ("auto", "bf16", "fp16", "off")
OPTIMIZERS = ("sgd", "adamw")  # train.optimizer (ssltm.optim builds them)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or an override names an unknown key or holds a bad value."""


@dataclass
class SyntheticConfig:
    """:class:`~ssltm.data.SyntheticVideos` settings; the last ``val_videos`` videos are held out for validation."""

    num_videos: int = 24
    val_videos: int = 4
    num_frames: int = 24
    size: Any = 96  # int or [H, W]
    num_classes: int = 6
    objects: list[int] = field(default_factory=lambda: [2, 5])
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # a name of ssltm.data.DATASETS, or "package.module:ClassName" (a ClipDataset)
    root: str | None = None  # dataset folder (not used by "synthetic")
    train_split: str = "train"
    val_split: str = "val"
    # Fraction of every video's frames, from its end, kept out of training and used as the validation
    # split instead of val_split (for datasets shipped without one, e.g. CamVid's train split alone).
    holdout: float | None = None
    # "full" or "sf": only the first frame of each training video is a query, the others are unlabelled (read by
    # vspw and synthetic; the other datasets have their own labelled frames)
    mode: str = "full"
    crop_size: Any = field(default_factory=lambda: [479, 479])  # int or [H, W]
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    eval_size: int | None = None  # shorter side frames are resized to for evaluation; None: as stored
    offsets: list[int] = field(default_factory=lambda: [3, 6, 9])
    # Samples carry "flow": OpenCV DIS from the query to each adjacent frame, on the augmented frames (ssltm.flow).
    flow_in_loader: bool = False
    num_workers: int = 2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class NetWarpConfig:
    """``model.short_term: netwarp`` settings."""

    flowcnn: bool = True  # refine the flow with FlowCNN; false: warp with the provider's flow as is
    c5: bool = False  # model.decoder ocrnet only: also warp the adjacent frame's C5 onto the query's (NetWarp-OCR)


ST_OCR_MEMORY = ("none", "first_clip")


@dataclass
class STOCRConfig:
    """``model.short_term: st_ocr`` settings (Spatial-Temporal OCR; with ``model.decoder: ocrnet``, TCB: only
    ``memory`` applies, the layers are OCRNet's)."""

    channels: int = 512
    key_channels: int = 256
    aux_weight: float = 0.4  # weight of the auxiliary head's cross-entropy
    memory: str = "none"  # one of ST_OCR_MEMORY (inference only): "first_clip" reuses the video's first clip


@dataclass
class SparseTTConfig:
    """``model.short_term: sparse_tt`` settings (Sparse Temporal Transformer; the slides' best setting)."""

    r: int = 5  # neighbourhood radius of the query selection's similarity
    tr: float = 0.5  # fraction of each image's pixels selected as queries, in [0, 1]
    s: int = 1  # key window radius of the query frame: l_d = min(s + d * eps, e) at temporal distance d
    e: int = 5  # largest key window radius
    eps: int = 1  # growth of the radius per frame of temporal distance
    heads: int = 8
    stride: int = 8  # the attention's feature stride (a multiple of 4; the fused features are stride 4)


@dataclass
class CFFMConfig:
    """``model.short_term: cffm`` settings (CFFM's transformer on the fused features at stride 8)."""

    dim: int = 256  # the embedding width (a 1x1 conv from the fused features)
    depth: int = 2  # blocks (2: CFFM's MiT-B0..B2 setting; B5 uses 4)
    heads: int = 8


@dataclass
class ModelConfig:
    backbone: str = "resnet101"  # one of BACKBONES: resnet18|resnet50|resnet101|swin_s
    pretrained: str | None = None  # local torchvision ImageNet checkpoint (state dict) of the backbone
    # One of DECODERS: "upernet" (PPM + FPN and the SSLTM heads) or "ocrnet" (OCRNet on a stride-8 trunk; needs
    # use_rfce and use_gcc false and short_term none (OCRNet), st_ocr (TCB) or netwarp (NetWarp-OCR)).
    decoder: str = "upernet"
    # The short-term module, one of SHORT_TERM; null: "stt" unless use_stt is false ("none").
    short_term: str | None = None
    use_stt: bool | None = None  # the older switch: true is short_term "stt", false "none"
    use_rfce: bool = True
    use_gcc: bool = True
    context: str = "reference"  # "reference" (RFCE) or "query" (QFCE)
    # Optical flow from the query to each adjacent frame for the short-term modules that read one (ssltm.flow):
    # one of FLOW_PROVIDERS, "raft" with the local raft_large state dict file flow_weights (nothing is downloaded).
    flow: str = "dis"
    flow_weights: str | None = None
    flow_iters: int = 20  # RAFT's refinement iterations
    # Recompute the backbone stages' and STT blocks' activations in the backward (less memory, a slower step).
    checkpointing: bool = False
    netwarp: NetWarpConfig = field(default_factory=NetWarpConfig)
    st_ocr: STOCRConfig = field(default_factory=STOCRConfig)
    sparse_tt: SparseTTConfig = field(default_factory=SparseTTConfig)
    cffm: CFFMConfig = field(default_factory=CFFMConfig)
    # Further SSLTM constructor arguments, passed as they are (e.g. fpn_dim, stt_dims, num_clusters).
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParamGroupConfig:
    """One ``train.param_groups`` entry: the parameters whose names ``pattern`` matches (``re.search``; the first
    matching entry takes a parameter) train at ``lr * lr_mult`` with weight decay ``weight_decay * decay_mult``."""

    pattern: str = MISSING
    lr_mult: float = 1.0
    decay_mult: float = 1.0


@dataclass
class TemporalLossConfig:
    """``train.temporal_loss`` (:class:`~ssltm.objectives.TemporalLoss`)."""

    weight: float = 0.1  # lambda, ETC's


MEAN_TEACHER_CONSISTENCY = ("mse", "ce")
MEAN_TEACHER_EVAL_MODELS = ("teacher", "student")


@dataclass
class MeanTeacherConfig:
    """``train.mean_teacher`` (:class:`~ssltm.objectives.MeanTeacher`); every value is this project's choice (SSLTM
    publishes none)."""

    weight: float = 100.0  # lambda of the consistency term
    rampup_iters: int = 4000  # the consistency's ramp-up exp(-5 (1 - t/R)^2) and alpha_rampup's iterations
    alpha_rampup: float = 0.99  # the teacher's EMA decay for the updates of iterations t < rampup_iters
    alpha: float = 0.999  # the EMA decay after them
    consistency: str = "mse"  # mse: of the two softmaxes; ce: cross entropy with the teacher's confident argmax
    confidence: float = 0.95  # ce: the teacher's pixels with a top probability at least this are pseudo-labels
    eval_model: str = "teacher"  # validation, best.pt, eval, infer and export use the teacher or the student


@dataclass
class IFRConfig:
    """``train.ifr`` (:class:`~ssltm.objectives.IFR`, Zhuang et al., CVPR 2022)."""

    # "batch": class c's prototype is the mean of the reference features predicted c over the whole micro-batch
    # (the public code's mask), "image": over the image's own reference only
    prototype_scope: str = "batch"
    unlabeled: bool = True  # the terms on unlabelled clips (needs unlabelled training frames)
    temperature: float = 0.5  # of the softmax over the cosine similarities to the prototypes
    logit_scale: float = 0.01  # the reconstructed features' logits are divided by it
    labeled_weight: float = 0.01
    unlabeled_weight: float = 0.001
    strong_weight: float = 0.1  # of the strong view's terms, relative to the weak view's
    rampup_iters: int = 4000  # r(t) = exp(-5 (1 - min(t, R) / R)^2); 0: r = 1


@dataclass
class TrainConfig:
    batch_size: int = 8  # clips per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1  # micro-batches per optimizer step and process
    optimizer: str = "sgd"  # one of OPTIMIZERS
    lr: float = 0.002
    momentum: float = 0.9  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    weight_decay: float = 0.0001
    poly_power: float = 0.9
    min_lr: float = 0.0
    # Linear warm-up (mmcv's "linear"): the schedule's factor times 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    # for it < warmup_iters, from warmup_ratio at iteration 0; 0 iterations: no warm-up.
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    # Parameter groups by name, the first matching pattern wins; the other parameters form the default group.
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    # Length of the run: max_iters if set, else epochs over the training clips, else as many iterations
    # as fit in max_minutes at the measured speed (refitted as it changes). max_minutes also stops any run.
    max_iters: int | None = None
    epochs: int | None = None
    max_minutes: float | None = None
    checkpoint_every: int = 1000
    validate: bool = True  # evaluate on data.val_split during and after training, keeping best.pt
    val_every: int | None = None  # None: with every checkpoint; 0: only at the end
    log_every: int = 10
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU), bf16, fp16 or off
    sync_bn: bool = True  # SyncBatchNorm under DDP on GPUs
    seed: int = 0
    progress: bool = True  # progress bar on the first process
    # losses, learning rate, speed, validation metrics and pictures to WORK_DIR/tb/ (pip install ssltm[tensorboard])
    tensorboard: bool = False
    # training objectives beyond the model's losses (ssltm.objectives.OBJECTIVES), each with its section below
    objectives: list[str] = field(default_factory=list)
    temporal_loss: TemporalLossConfig = field(default_factory=TemporalLossConfig)
    ifr: IFRConfig = field(default_factory=IFRConfig)
    mean_teacher: MeanTeacherConfig = field(default_factory=MeanTeacherConfig)


@dataclass
class EvalConfig:
    tc: bool = True
    mvc: list[int] = field(default_factory=lambda: [8, 16])
    tc_protocol: str = "vspw"  # one of TC_PROTOCOLS: "vspw" (TC_cal.py's sampling, the paper's) or "exact"
    flow: str = "dis"  # one of FLOWS: TC's optical flow, OpenCV DIS or RAFT (VSPW's; needs raft_weights)
    raft_weights: str | None = None  # local state dict file of torchvision's raft_large (nothing is downloaded)
    tc_videos: int | None = None  # TC on the first N videos only (VSPW's script: 100); None: all


@dataclass
class Config:
    work_dir: str | None = None  # None: work_dirs/<config file name>
    device: str = "auto"  # auto (the process's GPU under torchrun, else cuda, else cpu), cpu, cuda, cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def default_config() -> DictConfig:
    """The schema with its defaults, in struct mode (unknown keys raise)."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.model.kwargs, False)  # free-form: the model's constructor checks these names
    return cfg


def resolve_config_path(path: str | Path) -> Path:
    """``path`` as given, or a bare name (``"demo"``) looked up as ``configs/<name>.yaml`` of the source tree."""
    given = Path(path)
    if given.is_file():
        return given
    if given.suffix == "" and given.parent == Path("."):
        candidate = CONFIG_DIR / f"{given.name}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path}")


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> DictConfig:
    """The defaults, then ``base`` (a config stored in a checkpoint, if any), then the YAML file ``path`` (if
    any), then ``key=value`` overrides, validated.

    Raises:
        ConfigError: the file is missing or not a YAML mapping, or a key is unknown or a value has the
            wrong type or is out of range; the message names the file or override and the key.
    """
    cfg = default_config() if base is None else _merge(default_config(), OmegaConf.create(base), "checkpoint config")
    name = None
    if path is not None:
        file = resolve_config_path(path)
        name = file.stem
        try:
            content = yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {file} is not valid YAML: {err}") from err
        if content is not None and not isinstance(content, dict):
            raise ConfigError(f"config file {file} must hold a mapping of keys, got {type(content).__name__}")
        cfg = _merge(cfg, OmegaConf.create(content or {}), f"config file {file}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            other = OmegaConf.from_dotlist([item])
        except yaml.YAMLError as err:  # e.g. a backslash in a double-quoted regex: single quotes keep it as is
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--set {item}: the value is not valid YAML ({problem})") from None
        cfg = _merge(cfg, other, f"--set {item}")
    if cfg.work_dir is None:
        cfg.work_dir = str(Path("work_dirs") / (name or "run"))
    validate(cfg)
    return cfg


def _merge(cfg: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except ConfigKeyError as err:
        if err.object_type is ParamGroupConfig:  # a list entry's key, which OmegaConf names without its path
            keys = ", ".join(f.name for f in fields(ParamGroupConfig))
            raise ConfigError(
                f"{source}: unknown key {err.key!r} in a train.param_groups entry (keys: {keys})"
            ) from None
        key = err.full_key or err.key
        raise ConfigError(f"{source}: unknown config key {key!r}{_suggestion(cfg, str(key))}") from None
    except OmegaConfBaseException as err:
        key = err.full_key or err.key
        raise ConfigError(f"{source}: bad value for {key!r}: {err.msg.splitlines()[0]}") from None
    except TypeError as err:  # e.g. train.param_groups.0.lr_mult=... while the list is empty
        raise ConfigError(f"{source}: {err}; set a list key as a whole, e.g. train.param_groups=[...]") from None


def _suggestion(cfg: DictConfig, key: str) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return ""
    known = [str(k) for k in node]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"; did you mean {(parent + '.' if parent else '') + close[0]!r}?" if close else ""
    return f" (known keys{' under ' + repr(parent) if parent else ''}: {', '.join(known)}){hint}"


def _pair(value: Any, key: str) -> tuple[int, int]:
    pair = [value, value] if isinstance(value, int) else list(value) if OmegaConf.is_list(value) else value
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) and v > 0 for v in pair)):
        raise ConfigError(f"{key} must be a positive int or a list [H, W] of positive ints, got {value!r}")
    return pair[0], pair[1]


def crop_size(cfg: DictConfig) -> tuple[int, int]:
    return _pair(cfg.data.crop_size, "data.crop_size")


def validate(cfg: DictConfig) -> None:
    """Check the values a run depends on; raise :class:`ConfigError` naming the key."""
    data, train, model = cfg.data, cfg.train, cfg.model
    # The form only: a class of the user's is imported when a run builds its data, not for every config read.
    if data.dataset not in DATASETS and not IMPORT_STRING.fullmatch(data.dataset):
        raise ConfigError(
            f"data.dataset must be one of {tuple(DATASETS)} or 'package.module:ClassName', got {data.dataset!r}"
        )
    if data.mode not in DATA_MODES:
        raise ConfigError(f"data.mode must be one of {DATA_MODES}, got {data.mode!r}")
    crop_size(cfg)
    _pair(data.synthetic.size, "data.synthetic.size")
    if len(data.scale_range) != 2 or not 0 < data.scale_range[0] <= data.scale_range[1]:
        raise ConfigError(f"data.scale_range must be [low, high] with 0 < low <= high, got {list(data.scale_range)}")
    if data.holdout is not None and not 0 < data.holdout < 1:
        raise ConfigError(f"data.holdout must be a fraction in (0, 1) or null, got {data.holdout!r}")
    if any(o <= 0 for o in data.offsets) or list(data.offsets) != sorted(set(data.offsets)):
        raise ConfigError(f"data.offsets must be strictly increasing positive ints, got {list(data.offsets)}")
    synthetic = data.synthetic
    if not 0 < synthetic.val_videos < synthetic.num_videos:
        raise ConfigError(
            f"data.synthetic.val_videos must be in 1..num_videos-1 = 1..{synthetic.num_videos - 1}, "
            f"got {synthetic.val_videos}"
        )
    if model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone must be one of {BACKBONES}, got {model.backbone!r}")
    if model.context not in ("reference", "query"):
        raise ConfigError(f"model.context must be 'reference' or 'query', got {model.context!r}")
    if model.flow not in FLOW_PROVIDERS:
        raise ConfigError(f"model.flow must be one of {FLOW_PROVIDERS}, got {model.flow!r}")
    if model.flow_iters < 1:
        raise ConfigError(f"model.flow_iters must be at least 1, got {model.flow_iters}")
    if model.flow == "raft" and not (model.flow_weights and Path(model.flow_weights).is_file()):
        raise ConfigError(
            f"model.flow 'raft' needs model.flow_weights: a local state dict file of torchvision's raft_large "
            f"(nothing is downloaded), got {'no file at ' + model.flow_weights if model.flow_weights else 'null'}"
        )
    name = short_term(cfg)
    _check_decoder(model, name)
    if name == "netwarp" and len(data.offsets) != 1:
        raise ConfigError(
            f"model.short_term 'netwarp' warps one adjacent frame: data.offsets must hold one offset, "
            f"got {list(data.offsets)}"
        )
    if name == "cffm" and len(data.offsets) != 3:
        raise ConfigError(
            f"model.short_term 'cffm' reads the query and three adjacent frames: data.offsets must hold three "
            f"offsets (CFFM's [3, 6, 9]), got {list(data.offsets)}"
        )
    if name == "cffm" and model.use_rfce:
        raise ConfigError(
            "model.short_term 'cffm' reads exactly four frames: set model.use_rfce=false (RFCE would pass the "
            "reference frame alone through it)"
        )
    for key in ("dim", "depth", "heads"):
        if model.cffm[key] < 1:
            raise ConfigError(f"model.cffm.{key} must be at least 1, got {model.cffm[key]}")
    if model.cffm.dim % model.cffm.heads:
        raise ConfigError(
            f"model.cffm.dim ({model.cffm.dim}) must be divisible by model.cffm.heads ({model.cffm.heads})"
        )
    if model.st_ocr.memory not in ST_OCR_MEMORY:
        raise ConfigError(f"model.st_ocr.memory must be one of {ST_OCR_MEMORY}, got {model.st_ocr.memory!r}")
    _check_sparse_tt(model.sparse_tt)
    for key in ("batch_size", "grad_accum", "checkpoint_every", "log_every"):
        if train[key] < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {train[key]}")
    for key in ("max_iters", "epochs"):
        if train[key] is not None and train[key] < 1:
            raise ConfigError(f"train.{key} must be at least 1 or null, got {train[key]}")
    if train.max_minutes is not None and train.max_minutes <= 0:
        raise ConfigError(f"train.max_minutes must be positive or null, got {train.max_minutes}")
    if train.val_every is not None and train.val_every < 0:
        raise ConfigError(f"train.val_every must be >= 0 or null, got {train.val_every}")
    if train.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {train.lr}")
    _check_optimizer(train)
    if train.amp not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {AMP_MODES}, got {train.amp!r}")
    from .objectives import check_objectives  # the objectives import this module

    check_objectives(cfg)
    ev = cfg.eval
    if any(n < 2 for n in ev.mvc):
        raise ConfigError(f"eval.mvc lengths must be at least 2, got {list(ev.mvc)}")
    if ev.tc_protocol not in TC_PROTOCOLS:
        raise ConfigError(f"eval.tc_protocol must be one of {TC_PROTOCOLS}, got {ev.tc_protocol!r}")
    if ev.flow not in FLOWS:
        raise ConfigError(f"eval.flow must be one of {FLOWS}, got {ev.flow!r}")
    if ev.tc and ev.flow == "raft" and not ev.raft_weights:
        raise ConfigError(
            "eval.flow 'raft' needs eval.raft_weights: a local state dict file of torchvision's raft_large"
        )
    if ev.tc_videos is not None and ev.tc_videos < 1:
        raise ConfigError(f"eval.tc_videos must be at least 1 or null, got {ev.tc_videos}")


def _check_decoder(model: DictConfig, name: str) -> None:
    """The decoder and what it takes: ocrnet has no RFCE/GCC, takes OCR_SHORT_TERM and a dilated ResNet."""
    if model.decoder not in DECODERS:
        raise ConfigError(f"model.decoder must be one of {DECODERS}, got {model.decoder!r}")
    if model.decoder != "ocrnet":
        if model.netwarp.c5:
            raise ConfigError(f"model.netwarp.c5=true needs model.decoder 'ocrnet', got {model.decoder!r}")
        return
    for key in ("use_rfce", "use_gcc"):
        if model[key]:
            raise ConfigError(f"model.decoder 'ocrnet' has no RFCE or GCC: set model.{key}=false")
    if name not in OCR_SHORT_TERM:
        raise ConfigError(
            f"model.decoder 'ocrnet' takes model.short_term one of {OCR_SHORT_TERM}, got {name!r}"
            + ("" if model.short_term else " (null resolves to 'stt')")
        )
    if model.backbone == "resnet18":
        raise ConfigError(
            "model.decoder 'ocrnet' dilates the ResNet (stride 8): model.backbone must be a bottleneck ResNet "
            "(resnet50, resnet101) or swin_s, not 'resnet18'"
        )


def require_unlabeled_frames(cfg: DictConfig, needed_by: str) -> None:
    """A ConfigError naming ``data.dataset`` and ``data.mode`` when the config rules out unlabelled training frames
    (:meth:`ssltm.data.ClipDataset.unlabeled_frames` is False), for ``needed_by`` (e.g. ``"train.objectives
    'mean_teacher'"``): CamVid, VSPW or synthetic in ``"full"``. Datasets whose files alone can tell are checked when
    their unlabelled clips are built (:func:`ssltm.build.build_unlabeled_dataset`)."""
    data = cfg.data
    if data.dataset in DATASETS and DATASETS[data.dataset].unlabeled_frames(cfg) is False:
        raise ConfigError(
            f"{needed_by} needs unlabelled training frames, which data.dataset {data.dataset!r} with data.mode "
            f"{data.mode!r} has none of (every frame is a labelled query): use data.mode 'sf' (vspw, synthetic) "
            "or a dataset with unlabelled frames (cityscapes, folder)"
        )


def _check_optimizer(train: DictConfig) -> None:
    if train.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer must be one of {OPTIMIZERS}, got {train.optimizer!r}")
    if len(train.betas) != 2 or not all(0 <= b < 1 for b in train.betas):
        raise ConfigError(f"train.betas must be [beta1, beta2] with each in [0, 1), got {list(train.betas)}")
    for key in ("momentum", "weight_decay", "min_lr"):
        if train[key] < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {train[key]}")
    if train.warmup_iters < 0:
        raise ConfigError(f"train.warmup_iters must be >= 0 (0: no warm-up), got {train.warmup_iters}")
    if not 0 < train.warmup_ratio <= 1:
        raise ConfigError(f"train.warmup_ratio must be in (0, 1], got {train.warmup_ratio}")
    for i, group in enumerate(train.param_groups):
        key = f"train.param_groups[{i}]"
        if OmegaConf.is_missing(group, "pattern"):
            raise ConfigError(f"{key}.pattern is missing: each group needs a regular expression on parameter names")
        try:
            re.compile(group.pattern)
        except re.error as err:
            raise ConfigError(f"{key}.pattern {group.pattern!r} is not a regular expression: {err}") from None
        for mult in ("lr_mult", "decay_mult"):
            if group[mult] < 0:
                raise ConfigError(f"{key}.{mult} must be >= 0, got {group[mult]}")


def _check_sparse_tt(section: DictConfig) -> None:
    if not 0 <= section.tr <= 1:
        raise ConfigError(f"model.sparse_tt.tr must be a fraction in [0, 1], got {section.tr}")
    for key, low in (("r", 1), ("s", 0), ("eps", 0), ("heads", 1)):
        if section[key] < low:
            raise ConfigError(f"model.sparse_tt.{key} must be at least {low}, got {section[key]}")
    if section.s > section.e:
        raise ConfigError(f"model.sparse_tt.s must be at most model.sparse_tt.e, got s={section.s}, e={section.e}")
    if section.stride < 4 or section.stride % 4:
        raise ConfigError(f"model.sparse_tt.stride must be a positive multiple of 4, got {section.stride}")


def short_term(cfg: DictConfig) -> str:
    """The short-term module of ``model.short_term`` and ``model.use_stt`` (see :func:`resolve_short_term`).

    Raises:
        ConfigError: an unknown name (listing :data:`SHORT_TERM`), or both keys set and contradicting.
    """
    model = cfg.model
    if model.short_term is not None and model.short_term not in SHORT_TERM:
        raise ConfigError(f"model.short_term must be one of {SHORT_TERM} or null, got {model.short_term!r}")
    try:
        return resolve_short_term(model.short_term, model.use_stt)
    except ValueError:
        raise ConfigError(
            f"model.use_stt={str(model.use_stt).lower()} contradicts model.short_term={model.short_term!r}: "
            "use_stt true means short_term 'stt' (set one of the two)"
        ) from None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def from_container(container: dict) -> DictConfig:
    """A config stored in a checkpoint (a plain dict) back as a validated ``DictConfig``."""
    return load_config(base=container)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two plain-dict configs (keys of either), sorted."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out
