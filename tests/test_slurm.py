"""Runs under SLURM: ``srun`` without ``torchrun`` sets up the process group from SLURM's variables, torchrun's
own variables win under ``srun torchrun``, and a job of several tasks whose process srun did not start is
refused before anything is written. SLURM itself is faked through the environment."""

from __future__ import annotations

import random
import socket
import subprocess
import sys

import pytest
from test_cli import config_file, run_error, subprocess_env

from ssltm.distributed import SLURM_PORT_BASE, first_host, slurm_environment

SRUN_TASK = {  # what srun gives task 1 of a step of 4 tasks on two nodes
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}


def test_srun_tasks_get_torchruns_variables_from_slurms():
    assert slurm_environment(SRUN_TASK) == {
        "RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(SLURM_PORT_BASE + 4242),
    }
    # a MASTER_ADDR or MASTER_PORT given by hand is kept
    mine = slurm_environment({**SRUN_TASK, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "23456", "SLURM_JOB_ID": "1"})
    assert (mine["MASTER_ADDR"], mine["MASTER_PORT"]) == ("10.0.0.7", "23456")
    assert slurm_environment({**SRUN_TASK, "SLURM_JOB_ID": "123456"})["MASTER_PORT"] == str(SLURM_PORT_BASE + 3456)


@pytest.mark.parametrize(
    "environ",
    [
        {},  # no SLURM
        {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"},  # a single-task job's batch script
        {**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"},  # srun -n 1 in a job of 4 tasks
        # srun torchrun: torchrun's numbering of its workers wins
        {**SRUN_TASK, "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "MASTER_ADDR": "gpu07"},
    ],
    ids=["no-slurm", "one-task", "srun-one-task", "srun-torchrun"],
)
def test_nothing_to_set_up(environ):
    assert slurm_environment(environ) == {}


def test_several_tasks_without_a_rank_are_refused():
    batch_script = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-2]"}
    with pytest.raises(ValueError) as caught:
        slurm_environment(batch_script)
    message = str(caught.value)
    assert message.startswith("SLURM gives this job 8 tasks (SLURM_NTASKS=8), but this process has no rank: ")
    assert "srun --ntasks-per-node=GPUS_PER_NODE python -m ssltm" in message
    assert "srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES" in message and "\n" not in message
    with pytest.raises(ValueError, match="SLURM_STEP_NUM_TASKS=4 but no SLURM_PROCID"):
        slurm_environment({k: v for k, v in SRUN_TASK.items() if k != "SLURM_PROCID"})


def test_train_refuses_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")  # no warning about the Triton interpreter
    for key, value in {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    work = tmp_path / "run"
    err = run_error(capsys, ["train", config_file(tmp_path), "--set", "train.max_iters=1", "--work-dir", str(work)])
    assert err.startswith("ssltm train: error: SLURM gives this job 2 tasks") and err.count("\n") == 1
    assert not work.exists()


def test_first_host_of_a_host_list():
    cases = {"node7": "node7", "gpu[03-05,09],cpu1": "gpu03", "a,b": "a", "rack[1-2]-n[7,9]": "rack1-n7"}
    assert {nodelist: first_host(nodelist) for nodelist in cases} == cases


JOIN = """
import os, torch
from ssltm import distributed as dist
env = dist.setup("cpu")
total = dist.all_reduce_sum(torch.tensor([env.rank + 1.0]))
print(env.rank, env.world_size, env.local_rank, int(total.item()), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
dist.teardown()
"""


def free_slurm_port() -> int:
    """A port in the range that SLURM job ids map to, free now."""
    for port in random.Random().sample(range(SLURM_PORT_BASE, SLURM_PORT_BASE + 10000), 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port")


def test_two_srun_tasks_form_one_process_group(tmp_path):
    """Two processes with what srun gives the tasks of a 2-task step (and no torchrun variables) join one gloo
    group: ranks from SLURM_PROCID, the first node of the step as MASTER_ADDR, the port from the job id."""
    port = free_slurm_port()
    env = {k: v for k, v in subprocess_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        SLURM_JOB_ID=str(10000 + port - SLURM_PORT_BASE),
        SLURM_NTASKS="2",
        SLURM_STEP_NUM_TASKS="2",
        SLURM_STEP_NODELIST="localhost",
    )
    tasks = [
        subprocess.Popen(
            [sys.executable, "-c", JOIN],
            env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for rank in (0, 1)
    ]
    outputs = [task.communicate(timeout=120) for task in tasks]
    for task, (_, err) in zip(tasks, outputs, strict=True):
        assert task.returncode == 0, err[-2000:]
    assert [out.split() for out, _ in outputs] == [
        [str(rank), "2", str(rank), "3", "localhost", str(port)] for rank in (0, 1)
    ]
