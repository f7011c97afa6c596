"""Who am I in the job: rank, local rank, world size and master address.

Read from torchrun's variables, else from SLURM's, else a single process. The result is
exported as the variables torch.distributed and DeepSpeed read (so DeepSpeed never goes
looking for MPI) and the process group is started: gloo on the CPU; on CUDA a device map,
nccl for CUDA tensors and gloo for CPU ones (`backend_spec`), so that a collective on a CPU
tensor (a metric, a float64 sum, an object) works on every machine. Every collective of the
framework goes through the helpers at the end of this file.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        # local ranks beyond the visible GPUs share them (two ranks on one GPU: tools/gpu_check.sh)
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    @property
    def backend(self) -> str:
        return backend_spec(torch.cuda.is_available())


# NCCL serves CUDA tensors only; the framework's own reductions are of CPU tensors (losses packed
# for logging, float64 sums of the tools, pickled objects), so on CUDA the process group maps
# each device type to a backend. FRAMEWORK_GPU_BACKEND=gloo replaces nccl (e.g. two ranks on one
# GPU, which NCCL refuses; tools/gpu_check.sh uses it).
def backend_spec(cuda: bool, gpu_backend: str | None = None) -> str:
    if not cuda:
        return "gloo"
    gpu_backend = gpu_backend or os.environ.get("FRAMEWORK_GPU_BACKEND", "nccl")
    return f"cpu:gloo,cuda:{gpu_backend}"


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, bracket = m.group(1), m.group(3)
    if bracket is None:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def node_address(host: str) -> str:
    """An address for a Slurm node name: the name if it resolves, else the node's NodeAddr
    (`scontrol show node`), e.g. the nodes of slurm/local_cluster.sh, all on 127.0.0.1."""
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        pass
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return host
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return host


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_port(job_id: str) -> int:
    # Every task of the job must agree on the port without talking to each other.
    return 20000 + int(job_id) % 20000 if job_id.isdigit() else 29500


def detect(environ=os.environ) -> DistEnv:
    e = environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e.get("LOCAL_RANK", 0)), int(e["WORLD_SIZE"]),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and int(e["SLURM_NTASKS"]) > 1:
        nodelist = e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST") or "127.0.0.1"
        addr = e.get("MASTER_ADDR") or first_host(nodelist)
        port = int(e.get("MASTER_PORT") or _slurm_port(e.get("SLURM_JOB_ID", "")))
        return DistEnv(int(e["SLURM_PROCID"]), int(e.get("SLURM_LOCALID", 0)), int(e["SLURM_NTASKS"]),
                       addr, port, "slurm")
    return DistEnv(0, 0, 1, "127.0.0.1", _free_port(), "single")


def _quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def init(env: DistEnv | None = None) -> DistEnv:
    """Exports the job's coordinates and starts the process group (idempotent)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env = env or detect()
    if env.source == "slurm" and not os.environ.get("MASTER_ADDR"):
        env = replace(env, master_addr=node_address(env.master_addr))
    # DeepSpeed picks its GPU by LOCAL_RANK: where ranks share GPUs, that is the GPU's index
    local = env.device.index if env.device.type == "cuda" else env.local_rank
    os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(local), WORLD_SIZE=str(env.world_size),
                      LOCAL_SIZE=os.environ.get("LOCAL_WORLD_SIZE", str(env.world_size)),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    import deepspeed

    _quiet_deepspeed()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.device)
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():
        # (torch's group may exist already, e.g. started by a test with another device map;
        # DeepSpeed then adopts it, but still maps its shm segment on the CPU)
        if not torch.cuda.is_available() and not torch.distributed.is_initialized():
            _check_shm(env)
        deepspeed.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False,
                                   verbose=False, rank=env.rank, world_size=env.world_size)
        if not torch.cuda.is_available():
            _unlink_shm_buffer(env)
    return env


# DeepSpeed's CPU all-reduce (its JIT-built shm comm op) maps one POSIX shared-memory segment per
# rank, /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (~66 MiB), and
# never unlinks it: every run leaks one per rank until /dev/shm is full and the next multi-process
# start hangs. Once every rank has mapped every segment (the barrier after init), the names are
# no longer needed; unlinking keeps the mappings alive and frees the memory when the job exits.
SHM_DIR = "/dev/shm"
SHM_SEGMENT_MIB = 66


def _shm_name(env: DistEnv, rank: int) -> str:
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                                 f"{os.environ['MASTER_PORT']}_{rank}")


def _check_shm(env: DistEnv) -> None:
    """A full /dev/shm makes DeepSpeed's CPU init spin forever; say so instead."""
    from .errors import UserError

    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return
    free_mib = st.f_bavail * st.f_frsize / 2**20
    if free_mib < 2 * SHM_SEGMENT_MIB:
        raise UserError(f"{SHM_DIR}: only {free_mib:.0f} MiB free, DeepSpeed's CPU all-reduce needs "
                        f"{SHM_SEGMENT_MIB} MiB per rank (stale deepspeed_allreduce_buffer_* files there?)")


def _unlink_shm_buffer(env: DistEnv) -> None:
    path = _shm_name(env, env.rank)
    if not os.path.exists(path):
        return
    torch.distributed.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (the same shape on each), concatenated along dim 0 in rank order."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def broadcast_object(obj, src: int = 0):
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
