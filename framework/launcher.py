"""SLURM (and local) launches through submitit, with checkpoint-and-requeue.

`slurm/launch.py` validates the recipe, fixes the run folder (absolute, so every requeued attempt
finds the same checkpoints) and submits a `TrainJob`: one task per GPU (per core slot without
GPUs), `#SBATCH --signal=USR2@signal_delay_s`, at most `max_requeues` requeues for time limits.

What happens on the signal (the time limit's, or a preemption's `scancel --signal=USR2`):
the trainer's handler notes it, every rank finishes the step, a checkpoint is written, and
`train()` returns EXIT_REQUEUE. The job then hands the signal to submitit's own handler, which
on rank 0 pickles `TrainJob.checkpoint()` (the same job: it resumes from the newest checkpoint),
runs `scontrol requeue` and exits; the other ranks wait for Slurm to end them. Each attempt's
ranks get RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from submitit's job environment (MASTER_ADDR:
the first node's address; a port derived from the job id), the variables torchrun would set.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import submitit

from .distributed import node_address

def job_port(job_id: str) -> int:
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def export_rank_env(job_env, local: bool) -> None:
    """RANK & co. for framework.distributed from submitit's view of the job."""
    host = "127.0.0.1" if local else node_address(job_env.hostnames[0])
    os.environ.update(RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks),
                      LOCAL_RANK=str(job_env.local_rank), LOCAL_WORLD_SIZE=str(job_env.num_tasks // job_env.num_nodes),
                      MASTER_ADDR=host, MASTER_PORT=str(job_port(job_env.job_id)))


class TrainJob(submitit.helpers.Checkpointable):
    """The callable every task of every attempt runs."""

    def __init__(self, recipe: str, overrides: list[str], run_dir: str, local: bool = False):
        self.recipe, self.overrides, self.run_dir, self.local = recipe, list(overrides), run_dir, local

    def __call__(self) -> str:
        from .config import load_recipe
        from .trainer import EXIT_REQUEUE, train

        job_env = submitit.JobEnvironment()
        export_rank_env(job_env, self.local)
        recipe = load_recipe(self.recipe, self.overrides + [f"run.dir={self.run_dir}"])
        rc = train(recipe)
        if rc == EXIT_REQUEUE:
            handler = signal.getsignal(signal.SIGUSR2)  # submitit's, restored by the trainer
            if job_env.global_rank == 0 and callable(handler):
                handler(signal.SIGUSR2, None)  # checkpoint() -> pickle, scontrol requeue, exit
            if not self.local:
                time.sleep(600)  # the other ranks: Slurm ends this attempt
            raise RuntimeError("stopped by a signal after checkpointing; not requeued")
        if rc != 0:
            raise RuntimeError(f"training exited with status {rc}")
        return self.run_dir

    def checkpoint(self, *args, **kwargs):
        # the trainer has written the checkpoint already; the requeued attempt resumes from it
        return submitit.helpers.DelayedSubmission(TrainJob(self.recipe, self.overrides, self.run_dir, self.local))


def parse_time(text: str) -> int:
    """Slurm time 'D-HH:MM:SS', 'HH:MM:SS', 'MM:SS' or minutes -> whole minutes (at least 1)."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, (m, s) = 0, parts
    else:
        h, m, s = parts[-3:]
    return max(1, days * 1440 + h * 60 + m + (1 if s else 0))


def python_command() -> str:
    return sys.executable


def make_executor(folder: Path, cfg, local: bool):
    """A submitit executor from the launcher settings (`cfg`: the merged launcher block)."""
    gpus = cfg.gpus_per_node
    tasks = cfg.tasks_per_node or max(gpus, 1)
    minutes = parse_time(cfg.time)
    if local:
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=minutes, tasks_per_node=tasks, nodes=1, gpus_per_node=gpus,
                             signal_delay_s=cfg.signal_delay_s)
        return ex
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=cfg.max_requeues, python=python_command())
    params = dict(job_name=cfg.job_name or "framework", nodes=cfg.nodes, ntasks_per_node=tasks, cpus_per_task=cfg.cpus_per_task,
                  time=minutes, signal_delay_s=cfg.signal_delay_s, stderr_to_stdout=False)
    if gpus:
        params["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(cfg, key):
            params[key] = getattr(cfg, key)
    ex.update_parameters(**params)
    return ex
