"""One process per device, as ``torchrun`` or SLURM's ``srun`` start them: process group setup and the few
collectives a run needs.

Without either (no ``WORLD_SIZE`` in the environment, or 1; a single SLURM task) everything here degrades to
the single-process case, so the same code serves both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU if there is one, else the CPU; ``"cuda"``: this process's GPU;
    ``"cpu"`` or ``"cuda:N"`` as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA GPU")
    return device


SLURM_LAUNCH = (
    "start one task per GPU with srun (srun --ntasks-per-node=GPUS_PER_NODE python -m ssltm ...), or one task "
    "per node running torchrun (srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES "
    "--nproc_per_node=GPUS_PER_NODE --rdzv_backend=c10d --rdzv_endpoint=FIRST_NODE:29500 -m ssltm ...), "
    "or ask for one task (--ntasks=1)"
)
SLURM_PORT_BASE = 15000  # MASTER_PORT under srun: SLURM_PORT_BASE + SLURM_JOB_ID % 10000, unless MASTER_PORT is set


def slurm_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables ``torchrun`` would set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``) for a process that ``srun`` started as one of several tasks of a job step, from SLURM's:
    ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, the first host of ``SLURM_STEP_NODELIST``
    (where task 0 runs) and a port from ``SLURM_JOB_ID``; ``MASTER_ADDR`` and ``MASTER_PORT`` already in the
    environment are kept.

    Nothing to set (``{}``) when torchrun's ``RANK`` or ``WORLD_SIZE`` is there (under ``srun torchrun``
    torchrun's numbering wins), outside SLURM, and for a single task.

    Raises:
        ValueError: SLURM gives the job several tasks (``SLURM_NTASKS > 1``) but this process is not one of an
            ``srun`` step's (no ``SLURM_STEP_NUM_TASKS`` or ``SLURM_PROCID``) nor torchrun's: several copies
            started by hand would write one work dir, and a single one would leave the other tasks idle.
    """
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return {}
    step_tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "0"))
    if step_tasks <= 1:
        job_tasks = int(environ.get("SLURM_NTASKS", "1"))
        if step_tasks == 0 and job_tasks > 1:
            raise ValueError(
                f"SLURM gives this job {job_tasks} tasks (SLURM_NTASKS={job_tasks}), but this process has no rank: "
                f"srun did not start it (no SLURM_STEP_NUM_TASKS, SLURM_PROCID) nor torchrun (no RANK); " + SLURM_LAUNCH
            )
        return {}
    if "SLURM_PROCID" not in environ:
        raise ValueError(f"SLURM_STEP_NUM_TASKS={step_tasks} but no SLURM_PROCID (this task's rank); " + SLURM_LAUNCH)
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in environ and not nodes:
        raise ValueError("srun gave no SLURM_STEP_NODELIST to find task 0's host in; set MASTER_ADDR")
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(step_tasks),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodes),
        "MASTER_PORT": environ.get("MASTER_PORT")
        or str(SLURM_PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % 10000),
    }


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list, as ``scontrol show hostnames`` would list it first:
    ``gpu[03-05,09],cpu1`` -> ``gpu03``, ``rack[1-2]-n[7,9]`` -> ``rack1-n7``."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end])


def setup(device: str = "auto") -> DistEnv:
    """Join the process group ``torchrun`` (or ``srun``, see :func:`slurm_environment`) describes in the
    environment (NCCL on GPUs, gloo on CPUs)."""
    from_slurm = slurm_environment(os.environ)
    os.environ.update(from_slurm)  # init_process_group reads them, as under torchrun
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = local_rank
    if from_slurm and torch.cuda.device_count() == 1:
        gpu = 0  # srun gave each task its own GPU (--gpus-per-task=1, --gpu-bind): the one it sees
    dev = resolve_device(device, gpu)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistEnv(rank, world_size, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place (a no-op in a single process); returns ``tensor``."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``src``'s ``obj`` on every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Give ``tensors`` ``src``'s values on every process, in place: one broadcast per dtype (a no-op in a single
    process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src)
        for tensor, value in zip(group, flat.split([t.numel() for t in group]), strict=True):
            tensor.copy_(value.view_as(tensor))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
