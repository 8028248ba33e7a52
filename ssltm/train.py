"""Training (paper §4.1.2): SGD with momentum or AdamW, poly learning rate after an optional warm-up, parameter
groups (:mod:`ssltm.optim`), mixed precision, gradient accumulation, DDP under ``torchrun``, checkpoints with
exact resume, periodic validation keeping the best checkpoint.

Exact resume: the data order is a function of ``(train.seed, epoch)`` and each clip's augmentation a function
of ``(seed, epoch, index)``, so a run restarted from the checkpoint of iteration N draws the same batches from
N on (the unlabelled clips of the objectives that read them too: a second order in lockstep); the model,
optimizer, scheduler, gradient scaler and every process's random number generators come back from the checkpoint.

The run's messages go to the console and to ``WORK_DIR/train.log`` (:mod:`ssltm.runlog`); with
``train.tensorboard`` its losses, learning rate, speed, validation metrics and a validation picture also go
to TensorBoard, in ``WORK_DIR/tb/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from . import __version__
from . import distributed as dist
from .build import DatasetInfo, build_dataset, build_model, build_unlabeled_dataset, dataset_info, eval_options
from .checkpoint import link_checkpoint, load_checkpoint, load_weights, rng_state, save_checkpoint, set_rng_state
from .config import ConfigError, config_differences, to_yaml
from .evaluate import evaluate, results_json, results_table
from .model.backbone import pretrained_source
from .objectives import TrainStep, build_objectives
from .optim import build_optimizer, build_schedule, load_optimizer_state
from .precision import amp_dtype, autocast
from .runlog import FILE_ONLY, LOGGER, RunLog, check_tensorboard
from .visualize import prediction_picture

# A run sized by train.max_minutes alone fixes its length after the first FIT_EVERY + 1 iterations (the
# first pays one-off costs) and refits it every FIT_EVERY iterations, at the mean speed of the last FIT_WINDOW.
FIT_EVERY = 3
FIT_WINDOW = 10
CHECKPOINT_NAME = re.compile(r"iter_(\d+)\.pt")
RUN_FILES = ("latest.pt", "best.pt", "log.jsonl", "train.log", "config.yaml")  # besides the iter_<N>.pt checkpoints
# The unlabelled clips' order is a ClipOrder of its own, seeded train.seed + this.
UNLABELED_SEED_OFFSET = 7919
TENSORBOARD_DIR = "tb"  # the run's TensorBoard event files (train.tensorboard)
BOARD_PICTURE_HEIGHT = 240  # at most this many rows per frame in TensorBoard's validation picture


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stopped before applying that step."""


@dataclass
class TrainResult:
    iteration: int
    work_dir: Path
    stopped: str  # "finished", "time" (train.max_minutes), "interrupted" (Ctrl-C / SIGTERM)
    checkpoint: Path | None
    best: dict[str, Any] | None = None
    val_results: dict[str, Any] | None = None  # the last validation's metrics (fractions, as VideoMetrics gives)


class ClipOrder(Sampler[list[tuple[int, int]]]):
    """The micro-batches of one process, from iteration ``start`` on, forever.

    Each epoch is a permutation of ``indices`` drawn from ``(seed, epoch)``; iteration ``it`` takes the
    global batch at position ``it % iters_per_epoch`` of epoch ``it // iters_per_epoch`` (the clips that do
    not fill a batch are left out of that epoch). The global batch is cut into ``grad_accum * world_size``
    micro-batches; micro-batch ``a * world_size + rank`` is this process's accumulation step ``a``. Items are
    ``(epoch, index)`` for :class:`EpochIndexed`. ``what`` names the clips in the error for too few of them.
    """

    def __init__(
        self,
        indices: Sequence[int],
        batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        seed: int,
        start: int,
        what: str = "training clips",
    ):
        if len(indices) < batch_size:
            raise ConfigError(f"train.batch_size={batch_size} is more than the {len(indices)} {what}")
        self.indices = torch.as_tensor(list(indices))
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.world_size, self.rank, self.seed, self.start = world_size, rank, seed, start
        self.micro = batch_size // (grad_accum * world_size)
        self.iters_per_epoch = len(self.indices) // batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.indices[torch.randperm(len(self.indices), generator=generator)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        it, order, order_epoch = self.start, None, -1
        while True:
            epoch, step = divmod(it, self.iters_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = self.epoch_order(epoch), epoch
            batch = order[step * self.batch_size : (step + 1) * self.batch_size].tolist()
            for a in range(self.grad_accum):
                first = (a * self.world_size + self.rank) * self.micro
                yield [(epoch, i) for i in batch[first : first + self.micro]]
            it += 1


class EpochIndexed(Dataset):
    """``dataset[(epoch, i)]``: clip ``i`` with the augmentation and reference of ``epoch``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        self.dataset.set_epoch(epoch)
        return self.dataset[i]


def _ignore_sigint(_worker: int) -> None:
    # Ctrl-C reaches the whole process group: loader workers keep serving while the main process saves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """Turns the first SIGINT / SIGTERM into a request to stop after the current iteration (a second
    SIGINT interrupts at once)."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        LOGGER.info(
            f"{signal.Signals(signum).name}: stopping after this iteration and saving a checkpoint "
            "(Ctrl-C again to stop at once, without one)"
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class _State:
    iteration: int = 0
    elapsed: float = 0.0  # seconds of training over all runs of this work dir, resumes included
    best: dict[str, Any] | None = None


@dataclass
class _Step:
    """What one training iteration reports to the loop."""

    values: list[float]  # the loss terms (the model's loss_terms), averaged over micro-batches and processes
    lr: float  # the learning rate the step used
    stop: str | None  # "interrupted" (a process was asked to stop), "time" (train.max_minutes) or None


@dataclass
class _Clock:
    """The run's time: its budget (train.max_minutes in seconds, or None), the seconds of training before this
    run started, and the seconds of each iteration and of its wait for data in this run."""

    budget: float | None
    start_elapsed: float
    start: float = field(default_factory=time.perf_counter)
    step_times: list[float] = field(default_factory=list)
    data_times: list[float] = field(default_factory=list)

    def elapsed(self) -> float:
        """Seconds of training over all runs of the work dir, resumes included."""
        return self.start_elapsed + time.perf_counter() - self.start


class Trainer:
    """One training run of a config; :meth:`run` trains and returns how it ended, :meth:`close` closes its
    TensorBoard writer. Its messages go to ``run_log``, which :meth:`run` opens in the work dir."""

    def __init__(
        self,
        cfg: DictConfig,
        env: dist.DistEnv,
        resume: str | Path | None = None,
        overwrite: bool = False,
        *,
        run_log: RunLog,
    ):
        self.cfg, self.env, self.run_log = cfg, env, run_log
        self.work_dir = Path(cfg.work_dir)
        t = cfg.train
        if t.max_iters is None and t.epochs is None and t.max_minutes is None:
            raise ConfigError("set the length of the run: train.max_iters, train.epochs or train.max_minutes")
        if t.batch_size % (t.grad_accum * env.world_size):
            raise ConfigError(
                f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum={t.grad_accum} "
                f"times the {env.world_size} process(es)"
            )
        if t.tensorboard:
            check_tensorboard()
        self.board = None  # the TensorBoard writer, on the first process from run() on
        if resume is None:
            _claim_work_dir(self.work_dir, overwrite, env)
        torch.manual_seed(t.seed + env.rank)
        np.random.seed(t.seed + env.rank)
        self.info: DatasetInfo = dataset_info(cfg)
        self.train_set, self.train_indices = build_dataset(cfg, cfg.data.train_split, train=True)
        self.validate_every = t.checkpoint_every if t.val_every is None else t.val_every
        if t.validate:
            self.val_set, self.val_indices = build_dataset(cfg, cfg.data.val_split, train=False)
            self.eval_options = eval_options(cfg)
        self.amp_dtype = amp_dtype(t.amp, env.device)

        model = build_model(cfg, self.info.num_classes).to(env.device)
        source = pretrained_source(model)
        self.pretrained = None if source is None else source.as_dict()  # for the checkpoint's meta
        if source is not None and resume is None:
            LOGGER.info(source.describe())
            if (problem := source.mismatch()) is not None:
                LOGGER.warning(f"warning: {problem}")
        if env.distributed and env.device.type == "cuda" and t.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.module = model  # the bare model (its state_dict, predict)
        # the model and its objectives (train.objectives), built on the device after the SyncBatchNorm conversion
        self.train_step = TrainStep(model, build_objectives(cfg, model))
        needs = self.train_step.needs
        # "strong": "reference_strong" on the labelled clips and the unlabelled ones; "strong_frames": "frames_strong"
        # and "reference_strong" on the unlabelled ones (each drawn from its sample's own seed).
        self.train_set.strong_reference = "strong" in needs
        # The training split's unlabelled clips, when an objective reads them (batch["unlabeled"]).
        self.unlabeled_set: Dataset | None = None
        if "unlabeled" in needs:
            self.unlabeled_set = build_unlabeled_dataset(
                cfg, strong_reference="strong" in needs, strong_frames="strong_frames" in needs
            )
        if env.distributed:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(self.train_step, device_ids=device_ids)
        else:
            self.model = self.train_step
        self.loss_terms: tuple[str, ...] = self.train_step.loss_terms  # logged, checked and reduced, in this order
        self.optimizer = build_optimizer(t, model)
        self.schedule, self.scheduler = build_schedule(t, self.optimizer)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = _State()
        self.rng_to_restore = None
        self.val_results = None
        self.resumed_from = None if resume is None else Path(resume)
        if self.resumed_from is not None:
            self._resume(self.resumed_from)
        self.order = ClipOrder(
            self.train_indices, t.batch_size, t.grad_accum, env.world_size, env.rank, t.seed, self.state.iteration
        )
        fixed = t.max_iters or (t.epochs * self.order.iters_per_epoch if t.epochs else None)
        self.fit_to_time = fixed is None  # length from train.max_minutes (see _fit_to_budget)
        if fixed is not None:
            self.schedule.max_iters = fixed
        self.log_file = self.work_dir / "log.jsonl"

    # --- checkpoints -------------------------------------------------------------------------------
    def _resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path, training=True)
        load_weights(self.module, ckpt, path, OmegaConf.to_container(self.cfg))
        load_optimizer_state(self.optimizer, ckpt, self.cfg.train, path)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.train_step.restore(ckpt, path)
        train_state = ckpt.get("train_state", {})
        self.state = _State(
            iteration=int(ckpt["iteration"]),
            elapsed=float(train_state.get("elapsed", 0.0)),
            best=train_state.get("best"),
        )
        # the weights this run started from: those of the run that wrote the checkpoint
        self.pretrained = ckpt["meta"].get("pretrained", self.pretrained)
        states = ckpt["rng"]
        if len(states) != self.env.world_size:
            LOGGER.info(f"note: {path} was written by {len(states)} process(es), this run has {self.env.world_size}")
        self.rng_to_restore = states[self.env.rank % len(states)]
        differ = [
            key
            for key in config_differences(ckpt["config"], OmegaConf.to_container(self.cfg))
            if key not in ("work_dir", "train.progress")
        ]
        if differ:
            LOGGER.info(f"note: resuming {path} with a config that differs in: {', '.join(differ)}")
        LOGGER.info(f"resumed from {path} at iteration {self.state.iteration}")

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.state.iteration,
            "rng": dist.all_gather_object(rng_state()),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "meta": checkpoint_meta(self.info, self.env.world_size, self.pretrained),
            "train_state": {"elapsed": self.state.elapsed, "best": self.state.best},
            **self.train_step.checkpoint_state(),
        }

    def save(self) -> Path:
        """Write ``iter_<N>.pt`` and point ``latest.pt`` at it, and ``best.pt`` too when iteration N validated
        best (links, not copies); every process must call this."""
        state = self.checkpoint_state()  # a collective: all processes take part
        path = self.work_dir / f"iter_{self.state.iteration}.pt"
        if self.env.is_main:
            save_checkpoint(path, state)
            link_checkpoint(path, self.work_dir / "latest.pt")
            if self._best_now():
                link_checkpoint(path, self.work_dir / "best.pt")
        dist.barrier()
        return path

    def _best_now(self) -> bool:
        return self.state.best is not None and self.state.best["iteration"] == self.state.iteration

    # --- logging -----------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    # --- validation --------------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        # Evaluation must not move the training random number generators: a resumed run would diverge.
        devices = [self.env.device.index] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            results = evaluate(
                self.train_step.eval_model(),
                self.val_set,
                self.val_indices,
                self.info.num_classes,
                self.env,
                **self.eval_options,
                amp_dtype=self.amp_dtype,
                num_workers=self.cfg.data.num_workers,
                progress=self.cfg.train.progress,
            )
        self.val_results = results
        summary = results_json(results, self.info.classes)
        summary["iteration"] = self.state.iteration
        self.log({"iter": self.state.iteration, "val": summary})
        best = self.state.best
        improved = summary["mIoU"] is not None and (best is None or summary["mIoU"] > best["mIoU"])
        if improved:  # best.pt: with this iteration's checkpoint (Trainer.save), which then records it
            self.state.best = {"mIoU": summary["mIoU"], "iteration": self.state.iteration}
        LOGGER.info(f"iteration {self.state.iteration}: val mIoU {summary['mIoU']}{' (best)' if improved else ''}")
        LOGGER.log(
            FILE_ONLY, f"validation at iteration {self.state.iteration}:\n{results_table(results, self.info.classes)}"
        )
        if self.board is not None:
            self._board_validation(summary)
        return summary

    def _board_validation(self, summary: dict[str, Any]) -> None:
        """The validation metrics (percent) and the picture of a few validation frames, to TensorBoard."""
        step = self.state.iteration
        for key, value in summary.items():
            if isinstance(value, float):  # the metrics; not per_class, the TC settings or the iteration
                self.board.add_scalar(f"val/{key}", value, step)
        devices = [self.env.device.index] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), autocast(self.env.device, self.amp_dtype):
            picture = prediction_picture(
                self.train_step.eval_model(),
                self.val_set,
                self.val_indices,
                self.env.device,
                self.info.classes,
                self.info.palette,
                max_height=BOARD_PICTURE_HEIGHT,
            )
        self.board.add_image("val/predictions", picture, step, dataformats="HWC")
        self.board.flush()

    # --- the loop ----------------------------------------------------------------------------------
    def _loader(self) -> Iterator[dict[str, Any]]:
        """The training micro-batches; with :attr:`unlabeled_set`, each carries the unlabelled micro-batch drawn
        with it as ``"unlabeled"`` (:meth:`_unlabeled_loader`)."""
        batches = self._clip_loader(self.train_set, self.order, self.cfg.train.seed)
        unlabeled = self._unlabeled_loader()
        return batches if unlabeled is None else _with_unlabeled(batches, unlabeled)

    def _unlabeled_loader(self) -> Iterator[dict[str, Any]] | None:
        """The unlabelled micro-batches, one per labelled micro-batch (None without :attr:`unlabeled_set`): a
        :class:`ClipOrder` over the unlabelled clips with the labelled one's batch size, accumulation, processes
        and start iteration, seeded ``train.seed + UNLABELED_SEED_OFFSET``, so that iteration N's unlabelled
        micro-batches are a function of N and a resumed run draws the uninterrupted run's."""
        if self.unlabeled_set is None:
            return None
        t, env = self.cfg.train, self.env
        seed = t.seed + UNLABELED_SEED_OFFSET
        order = ClipOrder(
            range(len(self.unlabeled_set)),
            t.batch_size,
            t.grad_accum,
            env.world_size,
            env.rank,
            seed,
            self.state.iteration,
            what="unlabelled training clips",
        )
        return self._clip_loader(self.unlabeled_set, order, seed)

    def _clip_loader(self, dataset: Dataset, order: ClipOrder, seed: int) -> Iterator[dict[str, Any]]:
        workers = self.cfg.data.num_workers
        loader = DataLoader(
            EpochIndexed(dataset),
            batch_sampler=order,
            num_workers=workers,
            pin_memory=self.env.device.type == "cuda",
            # Its own generator: creating the loader must not draw from the global RNG (exact resume).
            generator=torch.Generator().manual_seed(seed + self.env.rank),
            worker_init_fn=_ignore_sigint if workers else None,
            persistent_workers=workers > 0,
        )
        return iter(loader)

    def _forward_backward(self, batches: Iterator[dict[str, Any]]) -> tuple[torch.Tensor, float]:
        """One optimizer step's forward and backward passes; returns the loss terms averaged over its
        micro-batches and the seconds spent waiting for data."""
        accum = self.cfg.train.grad_accum
        terms = torch.zeros(len(self.loss_terms), dtype=torch.float64, device=self.env.device)
        waited = 0.0
        for a in range(accum):
            tick = time.perf_counter()
            batch = _to_device(next(batches), self.env.device)
            waited += time.perf_counter() - tick
            sync = a == accum - 1 or not isinstance(self.model, DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with autocast(self.env.device, self.amp_dtype):
                    losses = self.model(batch, self.state.iteration)
                self.scaler.scale(losses["total"] / accum).backward()
            terms += torch.stack([torch.as_tensor(losses[k]).detach().double() for k in self.loss_terms]) / accum
        return terms, waited

    def _train_step(self, batches: Iterator[dict[str, Any]], stop_requested: bool, clock: _Clock) -> _Step:
        """One iteration: the forward and backward passes, the loss terms averaged over the processes, then
        (when they are finite) the optimizer, gradient scaler and learning-rate steps.

        The stop signals (``stop_requested`` here, the time budget of ``clock``) are summed in the same
        collective as the loss terms, so that every process ends at the same iteration.

        Raises:
            NonFiniteLossError: a loss term is NaN or infinite (the step is not applied).
        """
        state = self.state
        terms, waited = self._forward_backward(batches)
        clock.data_times.append(waited)
        state.elapsed = clock.elapsed()
        out_of_time = clock.budget is not None and state.elapsed >= clock.budget
        flags = torch.cat([terms, terms.new_tensor([stop_requested, out_of_time])])
        dist.all_reduce_sum(flags)
        values = (flags[: len(self.loss_terms)] / self.env.world_size).tolist()
        self._check_finite(values)
        lr = self.optimizer.param_groups[0]["lr"]  # this step's
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # The schedule counts iterations: one the fp16 grad scaler skipped (inf/NaN gradients
            # at its current scale) still advances it, which torch's order check would flag.
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            self.scheduler.step()
        self.train_step.after_step(state.iteration)
        state.iteration += 1
        stop = "interrupted" if flags[-2] > 0 else "time" if flags[-1] > 0 else None
        return _Step(values, lr, stop)

    def _check_finite(self, values: list[float]) -> None:
        named = dict(zip(self.loss_terms, values, strict=True))
        bad = [name for name, v in named.items() if not math.isfinite(v)]
        if not bad:
            return
        iteration = self.state.iteration + 1
        terms = ", ".join(f"{k}={v:.4g}" for k, v in named.items())
        latest = self.work_dir / "latest.pt"
        where = f"the last checkpoint is {latest}" if latest.exists() else "no checkpoint was written"
        self.log(
            {
                "iter": iteration,
                "error": f"non-finite loss term {bad[0]!r}",
                # JSON has no NaN or infinity: those are written as strings
                **{k: v if math.isfinite(v) else str(v) for k, v in named.items()},
            }
        )
        raise NonFiniteLossError(
            f"non-finite loss at iteration {iteration}: loss term {bad[0]!r} is {named[bad[0]]} "
            f"({terms}); stopped before applying this step, {where}"
        )

    def run(self) -> TrainResult:
        state = self.state
        self._open_work_dir()
        self.model.train()
        batches = self._loader()
        if self.rng_to_restore is not None:
            set_rng_state(self.rng_to_restore)
        bar = self._progress_bar()
        max_minutes = self.cfg.train.max_minutes
        clock = _Clock(None if max_minutes is None else 60 * max_minutes, state.elapsed)
        stopped, saved_at = "finished", None
        LOGGER.info(
            f"training {self.work_dir}: {len(self.train_indices)} clips, {self.env.world_size} process(es) on "
            f"{self.env.device.type}, from iteration {state.iteration}"
        )
        with StopRequest() as stop:
            while self.schedule.max_iters is None or state.iteration < self.schedule.max_iters:
                tick = time.perf_counter()
                step = self._train_step(batches, stop.requested, clock)
                clock.step_times.append(time.perf_counter() - tick)
                self._maybe_fit_to_budget(clock, bar)
                bar.set_postfix_str(_postfix(self.loss_terms, step.values, step.lr), refresh=False)
                bar.update(1)
                if self._log_due():
                    self._log_step(step, clock)
                stopped = step.stop or "finished"
                end = step.stop is not None or state.iteration == self.schedule.max_iters
                # Validation first, so that this iteration's checkpoint records its result (and best.pt links it).
                if self._validation_due(end, stopped):
                    self.validate()
                if self._checkpoint_due(end):
                    saved_at = self.save()
                if end:
                    break
        bar.close()
        self.log({"iter": state.iteration, "end": stopped, "elapsed_s": round(state.elapsed, 2)})
        ending = {"finished": "finished", "time": "train.max_minutes reached", "interrupted": "interrupted"}[stopped]
        LOGGER.log(FILE_ONLY, f"{ending} at iteration {state.iteration}; checkpoint {saved_at}")
        return TrainResult(state.iteration, self.work_dir, stopped, saved_at, state.best, self.val_results)

    # --- the cadence of the loop -------------------------------------------------------------------
    def _open_work_dir(self) -> None:
        """Write the run's ``config.yaml``; start ``log.jsonl``, ``train.log`` and the TensorBoard folder afresh,
        or cut a resumed run's ``log.jsonl`` back to its checkpoint and append to the others."""
        if not self.env.is_main:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "config.yaml").write_text(to_yaml(self.cfg))
        resumed = self.resumed_from is not None
        board_dir = self.work_dir / TENSORBOARD_DIR
        if resumed:
            _trim_log(self.log_file, self.state.iteration)
            self.log({"iter": self.state.iteration, "resumed_from": str(self.resumed_from)})
        else:  # what a run that never wrote a checkpoint left
            self.log_file.unlink(missing_ok=True)
            shutil.rmtree(board_dir, ignore_errors=True)
        self.run_log.open(self.work_dir / "train.log", append=resumed)
        if self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run hides what a killed run wrote after its checkpoint: the events from its first
            # iteration on (purge_step), so that no curve doubles back.
            self.board = SummaryWriter(str(board_dir), purge_step=self.state.iteration + 1 if resumed else None)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (after :meth:`run`, however it ended)."""
        if self.board is not None:
            self.board.close()

    def _progress_bar(self) -> tqdm:
        return tqdm(
            total=self.schedule.max_iters,
            initial=self.state.iteration,
            desc="train",
            unit="it",
            dynamic_ncols=True,
            disable=not (self.env.is_main and self.cfg.train.progress),
        )

    def _maybe_fit_to_budget(self, clock: _Clock, bar: tqdm) -> None:
        """For a run sized by ``train.max_minutes`` alone: fit its length after the first FIT_EVERY + 1 iterations,
        then every FIT_EVERY iterations."""
        done = len(clock.step_times)
        if self.fit_to_time and done > FIT_EVERY and (done - 1) % FIT_EVERY == 0:
            self._fit_to_budget(clock.step_times[1:][-FIT_WINDOW:], clock.budget - self.state.elapsed)
            bar.total = self.schedule.max_iters

    def _log_due(self) -> bool:
        iteration = self.state.iteration
        return iteration % self.cfg.train.log_every == 0 or iteration == self.schedule.max_iters

    def _validation_due(self, end: bool, stopped: str) -> bool:
        """Every ``validate_every`` iterations, and at the end of a run that was not interrupted."""
        due = bool(self.validate_every) and self.state.iteration % self.validate_every == 0
        return self.cfg.train.validate and (due or (end and stopped != "interrupted"))

    def _checkpoint_due(self, end: bool) -> bool:
        """Every ``train.checkpoint_every`` iterations, at the end, and at a new best validation (for best.pt)."""
        return self.state.iteration % self.cfg.train.checkpoint_every == 0 or end or self._best_now()

    def _fit_to_budget(self, step_times: list[float], remaining: float) -> None:
        """Set ``max_iters`` to the iterations that fit the rest of ``train.max_minutes`` at the measured speed."""
        per_step = sum(step_times) / len(step_times)
        first = self.schedule.max_iters is None
        fitted = self.state.iteration + max(1, int(0.9 * remaining / per_step))
        self.schedule.max_iters = dist.broadcast_object(fitted)
        if first:
            LOGGER.info(
                f"{per_step:.2f} s per iteration: about {self.schedule.max_iters} iterations fit train.max_minutes "
                "(refitted as the speed changes)"
            )

    def _log_step(self, step: _Step, clock: _Clock) -> None:
        n = min(self.cfg.train.log_every, len(clock.step_times))
        per_step = sum(clock.step_times[-n:]) / n
        remaining = None if self.schedule.max_iters is None else self.schedule.max_iters - self.state.iteration
        record = {
            "iter": self.state.iteration,
            "lr": step.lr,
            **{k: round(v, 6) for k, v in zip(self.loss_terms, step.values, strict=True)},
            "s_per_iter": round(per_step, 4),
            "data_s_per_iter": round(sum(clock.data_times[-n:]) / n, 4),
            "eta_s": None if remaining is None else round(remaining * per_step, 1),
            "elapsed_s": round(self.state.elapsed, 2),
        }
        if self.env.device.type == "cuda":
            record["max_mem_mb"] = round(torch.cuda.max_memory_allocated(self.env.device) / 2**20)
        self.log(record)
        if self.board is not None:
            it = self.state.iteration
            for key, value in zip(self.loss_terms, step.values, strict=True):
                self.board.add_scalar(f"loss/{key}", value, it)
            self.board.add_scalar("train/lr", step.lr, it)
            self.board.add_scalar("train/it_per_s", 1 / per_step, it)  # over the log interval


def _with_unlabeled(batches: Iterator[dict[str, Any]], unlabeled: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        batch["unlabeled"] = next(unlabeled)
        yield batch


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The micro-batch with its tensors (those of nested dicts too: ``batch["unlabeled"]``) on ``device``."""
    return {
        key: value.to(device, non_blocking=True)
        if isinstance(value, torch.Tensor)
        else _to_device(value, device)
        if isinstance(value, dict)
        else value
        for key, value in batch.items()
    }


def _postfix(terms: Sequence[str], values: Sequence[float], lr: float) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in zip(terms, values, strict=True)) + f" lr {lr:.2e}"


def checkpoint_meta(info: DatasetInfo, world_size: int, pretrained: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint's ``meta``: the dataset's classes and palette, versions, the processes and the backbone's
    ImageNet weights file (``pretrained``: path and SHA-256, ``None`` without)."""
    import torchvision

    return {
        **info.as_dict(),
        "versions": {
            "ssltm": __version__,
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
        },
        "world_size": world_size,
        "pretrained": pretrained,
    }


def run_files(work_dir: Path) -> list[Path]:
    """What a training run leaves in ``work_dir``: its checkpoints, ``log.jsonl``, ``train.log`` and ``config.yaml``,
    and the folder ``tb/`` of its TensorBoard events."""
    if not work_dir.is_dir():
        return []
    return sorted(
        p
        for p in work_dir.iterdir()
        if (p.is_file() and (p.name in RUN_FILES or CHECKPOINT_NAME.fullmatch(p.name)))
        or (p.is_dir() and p.name == TENSORBOARD_DIR)
    )


def _claim_work_dir(work_dir: Path, overwrite: bool, env: dist.DistEnv) -> None:
    """Make ``work_dir`` ready for a run from iteration 0: an earlier run's checkpoints there are an error,
    or with ``overwrite`` its files move to ``work_dir/old-<time>/`` first."""
    files = run_files(work_dir)
    checkpoints = sorted((int(m[1]), p.name) for p in files if (m := CHECKPOINT_NAME.fullmatch(p.name)))
    if not overwrite and any(p.suffix == ".pt" for p in files):
        newest = f", the newest {checkpoints[-1][1]}" if checkpoints else ""
        raise FileExistsError(
            f"work dir {work_dir} holds the checkpoints of an earlier run{newest}: continue it with --resume, "
            f"or start again with --overwrite (moves its files to {work_dir / 'old-<time>'})"
        )
    if overwrite and files and env.is_main:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        old = work_dir / f"old-{stamp}"
        n = 1
        while old.exists():
            n += 1
            old = work_dir / f"old-{stamp}-{n}"
        old.mkdir()
        for path in files:
            os.replace(path, old / path.name)
        LOGGER.info(f"moved the earlier run's {len(files)} files in {work_dir} to {old}")
    dist.barrier()


def _trim_log(path: Path, iteration: int) -> None:
    """Drop the records of ``log.jsonl`` after ``iteration`` (a run killed after its checkpoint wrote them; the
    resumed run writes them again) and any line a kill cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("iter", 0) <= iteration:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def train(cfg: DictConfig, resume: str | Path | None = None, overwrite: bool = False) -> TrainResult:
    """Train ``cfg`` in this process (one of several under ``torchrun``).

    Without ``resume`` the run starts at iteration 0, which a work dir holding an earlier run's checkpoints
    refuses (FileExistsError) unless ``overwrite`` moves that run's files to ``work_dir/old-<time>/``.
    """
    env = dist.setup(cfg.device)
    try:
        with RunLog(env.is_main) as run_log:
            trainer = Trainer(cfg, env, resume, overwrite, run_log=run_log)
            try:
                return trainer.run()
            except BaseException as err:  # the file keeps how the run ended; the caller reports it
                LOGGER.log(FILE_ONLY, f"stopped by {type(err).__name__}" + (f": {err}" if str(err) else ""))
                raise
            finally:
                trainer.close()
    finally:
        dist.teardown()
