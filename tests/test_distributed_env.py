"""framework.distributed finds rank, world and master from torchrun, SLURM or nothing."""
from framework.distributed import detect, first_host


def test_first_host_of_slurm_nodelists():
    assert first_host("node07") == "node07"
    assert first_host("gpu[03-05,07]") == "gpu03"
    assert first_host("gpu[11,2-4],cpu1") == "gpu11"
    assert first_host("a-b-1,a-b-2") == "a-b-1"


def test_torchrun_variables_win():
    e = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h1", "MASTER_PORT": "1234",
                "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.source) == (3, 8, 1, "h1", 1234, "torchrun")


def test_slurm_variables():
    e = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2", "SLURM_JOB_NODELIST": "n[4-6]",
                "SLURM_JOB_ID": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.source) == (5, 6, 2, "n4", "slurm")
    assert e.master_port == detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "6", "SLURM_JOB_ID": "1234",
                                    "SLURM_JOB_NODELIST": "n[4-6]"}).master_port


def test_single_process_otherwise():
    e = detect({})
    assert (e.rank, e.world_size, e.local_rank, e.source) == (0, 1, 0, "single")
    # one Slurm task (e.g. an interactive srun) is a single process too
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "single"


def test_two_cpu_ranks_leave_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU all-reduce maps a /dev/shm segment per rank and never unlinks it; init() does."""
    import os
    import subprocess
    import sys

    from conftest import REPO, env, free_port

    port = free_port()
    script = tmp_path / "allreduce.py"
    script.write_text("import torch\nfrom framework import distributed as d\nenv = d.init()\n"
                      "t = d.all_reduce_sum(torch.ones(3))\nassert t.tolist() == [2.0] * 3, t\nd.shutdown()\n")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        str(script)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    left = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer") and f"_{port}_" in n]
    assert left == []
