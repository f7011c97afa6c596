"""Collectives on CPU tensors under the process group a CUDA machine gets.

On CUDA the process group maps `cuda` to nccl, which has no CPU backend; the framework's own
reductions (losses packed for logging, evaluation sums, float64 tool sums, pickled objects) are
of CPU tensors, so the group must also map `cpu` to gloo (framework.distributed.backend_spec).
NCCL cannot run here, so it is emulated by gloo registered for `cuda` only: that group refuses
a CPU all-reduce exactly as NCCL does, and the framework's CUDA device map, with gloo in
nccl's place, must carry a real 2-rank NVAE training run (loss packing, evaluation, KL
balancing), BN recalibration and IW bits/dim.
"""
import subprocess
import sys

import pytest

from conftest import NVAE, REPO, TINY_NVAE, env, free_port
from framework.distributed import backend_spec

WORKER = r"""
import os, sys, torch, torch.distributed as td
from framework import distributed as dist
mode, run_dir = sys.argv[1], sys.argv[2]
spec = dist.backend_spec(True, gpu_backend="gloo") if mode == "cuda-map" else "cuda:gloo"
td.init_process_group(spec)
if mode == "cuda-only":  # what NCCL alone is: no backend for CPU tensors
    try:
        dist.all_reduce_sum(torch.ones(2))
        line = "REDUCED"
    except RuntimeError as e:
        line = "REFUSED " + str(e).splitlines()[0]
    os.write(1, (line + "\n").encode())  # one write: the two ranks' lines do not interleave
    sys.exit(0)
from framework.train import main
rc = main([sys.argv[3], *sys.argv[4:], f"run.dir={run_dir}"])
from framework.eval.bpd import evaluate_bpd
from framework.eval.checkpoints import load
from framework.eval.recalibrate import recalibrate
loaded = load(run_dir)
rec = recalibrate(loaded, iters=2, batch_size=4, progress=False)
bpd = evaluate_bpd(loaded, iw_samples=2, batch_size=100, progress=False)
os.write(1, f"DONE {rc} {rec['layers_recalibrated']} {bpd['images']}\n".encode())
td.barrier()  # the group is this script's (the trainer and the tools adopted it): ended here
td.destroy_process_group()
"""


def worker(mode, run_dir, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--no-python", sys.executable, "-c", WORKER, mode, str(run_dir), *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


def test_the_cuda_process_group_maps_cpu_tensors_to_gloo():
    assert backend_spec(True) == "cpu:gloo,cuda:nccl"
    assert backend_spec(False) == "gloo"


def test_a_cuda_only_group_refuses_cpu_collectives(tmp_path):
    p = worker("cuda-only", tmp_path)
    assert p.stdout.count("No backend type associated with device type cpu") == 2, p.stdout + p.stderr[-3000:]
    assert p.stdout.count("REFUSED") == 2 and "REDUCED" not in p.stdout


@pytest.mark.slow
def test_training_and_tools_reduce_through_the_cuda_device_map(tmp_path):
    run = tmp_path / "run"
    p = worker("cuda-map", run, NVAE, *TINY_NVAE, "train.steps=2", "train.eval_every=1", "train.ema=0")
    done = [ln for ln in p.stdout.splitlines() if ln.startswith("DONE")]
    assert len(done) == 2, p.stdout[-2000:] + p.stderr[-4000:]
    _, rc, layers, images = done[0].split()
    assert rc == "0" and int(layers) > 0 and int(images) > 0
