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
# throughput as soon as the consumer touches a batch. Passive waiting costs torch's CPU
# kernels a futex wake-up per parallel region. Must be set before torch loads libgomp;
# a value the user sets wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
