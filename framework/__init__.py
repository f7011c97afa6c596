"""Training framework for deep generative image models: recipes, DeepSpeed ZeRO engines,
FFCV data, one resumable training loop, model families (see README.md)."""
import os as _os
from pathlib import Path as _Path

REPO_ROOT = _Path(__file__).resolve().parent.parent

# DeepSpeed JIT-builds its shared-memory comm op (about a minute) on the first
# init_distributed; keep the build cache inside the repository (git-ignored) so it is
# built once per machine and not once per fresh /tmp.
_os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))

# OpenMP threads that spin after a parallel region steal the cores FFCV's decoding threads
# run on: measured here (2 cores, tools/bench/loader.py) the spinning halves FFCV's jpg
# throughput. Passive waiting costs torch's CPU kernels a futex wake-up per parallel region
# (the NVAE mnist step on 2 cores: +35%), so it is the default only where a GPU does the
# compute. Must be set before torch loads libgomp; a value the user sets wins.
if _os.path.exists("/proc/driver/nvidia"):  # a GPU machine: the CPU's work is feeding the data
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _keep_freed_memory() -> None:
    """glibc hands tensors of more than 128 KiB back to the kernel when freed and faults fresh
    pages in for the next step; on this VM that cost the NVAE mnist step a fifth of its time
    (tools/bench/nvae_step.py). Keep freed memory in the heap for reuse instead (what CUDA's
    caching allocator does for GPU memory): blocks up to 32 MiB come from the heap, which is
    trimmed only when 1 GiB lies free at its top. FRAMEWORK_MALLOC=default turns this off."""
    import ctypes
    import platform

    if platform.system() != "Linux" or _os.environ.get("FRAMEWORK_MALLOC") == "default":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)


_keep_freed_memory()
