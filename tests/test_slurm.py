"""SLURM (issue 7): the submitit launcher against a real Slurm cluster on 127.0.0.1
(slurm/local_cluster.sh: slurmctld, 2 slurmd, munge, slurmdbd over MariaDB), started by the tests."""
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_VAE, VAE, env, free_port, metrics, run_train, train_losses

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # a private Slurm cluster: minutes; not in make test-fast

CLUSTER = REPO / "slurm" / "local_cluster.sh"
LAUNCH = REPO / "slurm" / "launch.py"


def cluster_env(folder: Path, port: int) -> dict:
    e = env()
    e.update(SLURM_LOCAL_DIR=str(folder), SLURM_LOCAL_PORT=str(port), SLURM_CONF=str(folder / "etc" / "slurm.conf"))
    return e


def cluster(cmd: str, e: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), cmd, *args], env=e, capture_output=True, text=True, timeout=900)


_USED_BLOCKS: set[int] = set()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def ports_base() -> int:
    """A private block of 40 ports, 21000 + 100 k: one that no other cluster of this test session
    has (the module's cluster is still up while a test starts its own) and whose ports are free."""
    for k in random.Random(free_port()).sample(range(20), 20):
        if k not in _USED_BLOCKS and all(_port_free(21000 + 100 * k + i) for i in range(40)):
            _USED_BLOCKS.add(k)
            return 21000 + 100 * k
    raise RuntimeError("no free block of 40 ports in 21000..22999")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    e = cluster_env(folder, ports_base())
    p = cluster("start", e, "--nodes", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    yield e
    cluster("stop", e)


def launch(e: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(LAUNCH), *args], cwd=REPO, env=e, capture_output=True, text=True,
                       timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"launch failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def job_id(p: subprocess.CompletedProcess) -> str:
    return p.stdout.split("submitted slurm job ", 1)[1].split()[0]


def wait_gone(e: dict, jid: str, limit_s: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < limit_s:
        q = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], env=e, capture_output=True, text=True)
        if not q.stdout.strip():
            return
        time.sleep(2)
    raise AssertionError(f"job {jid} still queued after {limit_s} s")


def final_state(e: dict, jid: str, limit_s: float = 60) -> list[str]:
    """The job's accounting state once slurmdbd has recorded its end (sacct can still say RUNNING for
    a few seconds after the job has left the queue); after limit_s, whatever it says."""
    t0 = time.time()
    while True:
        state = subprocess.run(["sacct", "-n", "-X", "-j", jid, "-o", "State"], env=e, capture_output=True,
                               text=True).stdout.split()
        if (state and state[-1] not in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING")) or time.time() - t0 > limit_s:
            return state
        time.sleep(1)


def tiny(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [VAE, *TINY_VAE, f"run.dir={run_dir}", f"train.steps={steps}", *SAME, *extra]


# a constant learning rate after warm-up: runs of any length share their first steps' losses
SAME = ["engine.zero_stage=2", "engine.schedule.decay=constant"]


def training_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in metrics(run_dir) if "loss" in m]


@pytest.fixture(scope="module")
def torchrun_losses(tmp_path_factory):
    """The reference: the same recipe under torchrun, 2 processes, uninterrupted (40 steps)."""
    d = tmp_path_factory.mktemp("torchrun") / "run"
    run_train(VAE, TINY_VAE + [f"run.dir={d}", "train.steps=40", *SAME], nproc=2)
    return train_losses(d)


@pytest.mark.parametrize("layout", [("2", "1"), ("1", "2")], ids=["2nodes_x_1task", "1node_x_2tasks"])
def test_multi_task_jobs_train_like_torchrun(slurm, torchrun_losses, tmp_path, layout):
    nodes, tasks = layout
    d = tmp_path / "run"
    p = launch(slurm, *tiny(d, 6), "--nodes", nodes, "--tasks-per-node", tasks, "--gpus-per-node", "0",
               "--cpus-per-task", "1", "--time", "00:20:00", "--wait")
    assert "submitted slurm job" in p.stdout and f"run folder {d}" in p.stdout
    out = "".join(f.read_text() for f in (d / "slurm").glob("*_0_log.out"))
    assert "world 2 (torchrun)" in out and "global batch 16" in out
    got = train_losses(d)
    assert sorted(got) == list(range(1, 7))
    for s, v in got.items():
        assert abs(v - torchrun_losses[s]) < 1e-6, (s, v, torchrun_losses[s])


def test_preemption_checkpoints_requeues_and_resumes_exactly(slurm, torchrun_losses, tmp_path):
    d = tmp_path / "run"
    p = launch(slurm, *tiny(d, 40, "train.debug.sleep_after_step_s=0.4"), "--tasks-per-node", "2",
               "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "00:30:00")
    jid = job_id(p)
    t0 = time.time()
    while time.time() - t0 < 300 and not ((d / "metrics.jsonl").is_file() and len(training_steps(d)) >= 8):
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", jid], env=slurm, check=True)
    wait_gone(slurm, jid)
    out = "".join(f.read_text() for f in sorted((d / "slurm").glob(f"{jid}_0_log.out")))
    assert "signal SIGUSR2: checkpoint" in out and "resumed from" in out and "done: 40 steps" in out, out[-3000:]
    resumed_at = int(out.split("resumed from", 1)[1].split(" at step ", 1)[1].split()[0])
    assert 8 <= resumed_at < 40
    steps = training_steps(d)
    assert steps == list(range(1, 41))  # none trained twice, none skipped
    got = train_losses(d)
    for s in range(1, 41):
        assert abs(got[s] - torchrun_losses[s]) < 1e-6, (s, got[s], torchrun_losses[s])
    state = final_state(slurm, jid)
    assert state and state[-1] == "COMPLETED", state


@pytest.mark.timeout(3000)
def test_a_time_limit_shorter_than_the_run_requeues_until_done(slurm, tmp_path):
    d = tmp_path / "run"
    # 200 steps that sleep 0.45 s each: 90 s of sleep alone, more than one attempt's 60 s (2-minute
    # limit, USR2 60 s before it), so at least one requeue on any machine; each attempt keeps what it
    # trained, so a slow machine (a slow start-up) only needs more attempts: the budget of requeues
    # and the wait are set so that the outcome does not depend on the machine's speed
    p = launch(slurm, *tiny(d, 200, "train.debug.sleep_after_step_s=0.45", "train.checkpoint_every=0"),
               "--tasks-per-node", "1", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "00:02:00",
               "--signal-delay-s", "60", "--max-requeues", "40")
    jid = job_id(p)
    wait_gone(slurm, jid, limit_s=2900)
    out = (d / "slurm" / f"{jid}_0_log.out").read_text()
    assert out.count("resumed from") >= 1 and "done: 200 steps" in out, out[-3000:]
    assert training_steps(d) == list(range(1, 201))


def test_a_bad_recipe_is_refused_before_submission(slurm, tmp_path):
    d = tmp_path / "run"
    before = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm, capture_output=True, text=True).stdout
    p = launch(slurm, *tiny(d, 6, "train.stpes=3"), "--gpus-per-node", "0", check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error:") and "train.stpes" in p.stderr
    assert "did you mean 'train.steps'" in p.stderr
    after = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm, capture_output=True, text=True).stdout
    assert before == after and not d.exists()


def test_local_and_dry_run_need_no_slurm(tmp_path):
    e = env()
    e["SLURM_CONF"] = str(tmp_path / "no-such-slurm.conf")  # any Slurm command would fail
    d = tmp_path / "dry"
    p = launch(e, *tiny(d, 6), "--nodes", "3", "--gpus-per-node", "8", "--partition", "gpu", "--time", "2-00:00:00",
               "--dry-run")
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120", "#SBATCH --time=2880"):
        assert line in p.stdout, line
    assert not d.exists()
    d = tmp_path / "local"
    p = launch(e, *tiny(d, 6), "--local", "--tasks-per-node", "2", "--gpus-per-node", "0", "--time", "00:10:00",
               "--wait")
    assert "submitted local job" in p.stdout and f"done: {d}" in p.stdout
    assert training_steps(d) == list(range(1, 7))
    out = "".join(f.read_text() for f in (d / "slurm").glob("*_0_log.out"))
    assert "world 2" in out


def test_stop_leaves_no_daemon_running(tmp_path):
    folder = tmp_path / "c"
    e = cluster_env(folder, ports_base())
    p = cluster("start", e, "--nodes", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    pids = {f.stem: int(f.read_text()) for f in (folder / "pids").glob("*.pid")}
    assert {"munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd-n1"} <= set(pids)
    assert cluster("start", e, "--nodes", "1").returncode == 0  # idempotent: already running
    assert cluster("stop", e).returncode == 0
    for name, pid in pids.items():
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), name
    assert "not running" in cluster("status", e).stdout
    assert cluster("stop", e).returncode == 0  # idempotent: already stopped


def test_plain_srun_ranks_find_each_other_by_slurm_variables(slurm, tmp_path):
    """Tools started with srun (no launcher): rank, world and master from SLURM's variables; the
    first node's name (n1, not in DNS) is resolved to its NodeAddr."""
    script = tmp_path / "ranks.py"
    script.write_text("import torch\nfrom framework import distributed as d\nenv = d.init()\n"
                      "t = d.all_reduce_sum(torch.ones(1))\nprint('rank', env.rank, 'of', env.world_size, env.source, "
                      "env.master_addr, int(t))\nd.shutdown()\n")
    p = subprocess.run(["srun", "-N2", "-n2", "--cpus-per-task=1", sys.executable, str(script)], cwd=REPO,
                       env=slurm, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = sorted(ln for ln in p.stdout.splitlines() if ln.startswith("rank"))
    assert lines == ["rank 0 of 2 slurm 127.0.0.1 2", "rank 1 of 2 slurm 127.0.0.1 2"], p.stdout
