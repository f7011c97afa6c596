"""Submit a training run to SLURM (or run it through submitit locally), surviving time limits and
preemption: on USR2 the run checkpoints at the next step boundary, requeues itself, and every
attempt resumes from the newest checkpoint in the same run folder.

    python slurm/launch.py RECIPE [key=value ...] [--nodes N] [--gpus-per-node G] [--tasks-per-node T]
                           [--partition P] [--time HH:MM:SS] [--account A] [--qos Q] [--constraint C]
                           [--mem M] [--cpus-per-task C] [--signal-delay-s S] [--max-requeues R]
                           [--local] [--dry-run] [--wait]

The recipe's `launcher:` block holds the same settings; flags win. The recipe is validated before
anything is submitted. One task per GPU (per --tasks-per-node without GPUs). Logs:
RUN_DIR/slurm/<job id>_<task>_log.{out,err}. `--local`: submitit's local executor, no Slurm
needed (one node). `--dry-run`: print the batch script and exit. `--wait`: block until the job
(with all its requeues) ends; exit status 0 if training finished.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.errors import UserError, run_cli  # noqa: E402

FLAGS = {  # flag -> launcher key
    "nodes": int, "gpus_per_node": int, "tasks_per_node": int, "partition": str, "time": str, "account": str,
    "qos": str, "constraint": str, "mem": str, "cpus_per_task": int, "signal_delay_s": int, "max_requeues": int,
    "job_name": str,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python slurm/launch.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")
    for key, typ in FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, default=None)
    p.add_argument("--local", action="store_true", help="submitit's local executor instead of Slurm")
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job to end")
    return p.parse_args(argv)


def launcher_settings(recipe, args):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(recipe.launcher, resolve=True)
    for key in FLAGS:
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    if cfg["nodes"] < 1 or cfg["gpus_per_node"] < 0 or cfg["tasks_per_node"] < 0:
        raise UserError("launcher: nodes must be >= 1, gpus_per_node and tasks_per_node >= 0")
    if args.local and cfg["nodes"] != 1:
        raise UserError(f"--local runs on one node; got --nodes {cfg['nodes']}")
    from framework.launcher import parse_time

    try:
        parse_time(cfg["time"])
    except ValueError:
        raise UserError(f"launcher.time is {cfg['time']!r}; expected HH:MM:SS, D-HH:MM:SS or minutes") from None
    if not cfg["job_name"]:
        cfg["job_name"] = Path(recipe.run.dir).name
    return OmegaConf.create(cfg)


def main(argv=None) -> int:
    args = parse_args(argv)
    from framework.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # a bad recipe never reaches the queue
    run_dir = Path(recipe.run.dir).resolve()
    cfg = launcher_settings(recipe, args)
    from framework.launcher import TrainJob, make_executor

    # absolute paths: every attempt, wherever Slurm starts it, reads the same data and run folder
    overrides = [o for o in args.overrides if not o.startswith(("run.dir=", "data.path="))]
    overrides.append(f"data.path={Path(recipe.data.path).resolve()}")
    job = TrainJob(str(Path(args.recipe).resolve()), overrides, str(run_dir), local=args.local)
    folder = run_dir / "slurm"
    tasks = cfg.tasks_per_node or max(cfg.gpus_per_node, 1)
    if args.dry_run:
        if args.local:
            print(f"local: {tasks} task(s) of {job.recipe} {' '.join(overrides)} -> {run_dir}")
            return 0
        ex = make_executor(folder, cfg, local=False)
        print(ex._make_submission_file_text(ex._submitit_command_str, "DRY_RUN"))
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    ex = make_executor(folder, cfg, local=args.local)
    try:
        submitted = ex.submit(job)
    except Exception as e:  # sbatch's own message (no such partition, no Slurm) as one line
        raise UserError(f"submission failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}") from None
    where = "local" if args.local else "slurm"
    print(f"submitted {where} job {submitted.job_id} | {cfg.nodes} node(s) x {tasks} task(s) | time {cfg.time} | "
          f"USR2 {cfg.signal_delay_s} s before the limit, up to {cfg.max_requeues} requeues\n"
          f"run folder {run_dir}\nlogs {submitted.paths.stdout} {submitted.paths.stderr}", flush=True)
    if args.wait:
        try:
            submitted.results()  # every task's result (raises if one failed)
        except Exception as e:  # noqa: BLE001 - the job's own failure, reported as one line
            last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            print(f"error: job {submitted.job_id} failed: {last}", file=sys.stderr, flush=True)
            return 1
        print(f"job {submitted.job_id} done: {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
