# Set-up is two commands: `make demo` and `make test`; both create .venv and install what is missing.
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCHVISION_VERSION ?= 0.28.0
# Debian packages FFCV builds against; slurm/local_cluster.sh installs Slurm's own.
APT_PACKAGES ?= pkg-config libopencv-dev libturbojpeg0-dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: setup system-deps demo demo-vq test test-fast bench clean-runs

# make data/photos256.beton writes the 256 px smoke set (3000 crops of the bundled photographs)

setup: $(STAMP)

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing \
	  || { $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; }; \
	fi

$(STAMP): pyproject.toml Makefile | system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	@# LPIPS's linear heads ship in the lpips wheel; without its torchvision dependency (PyPI's
	@# torchvision does not import beside the CPU torch build): framework/losses reads the file only
	$(PY) -m pip install -q --no-deps "lpips==0.1.4"
	@# torch-fidelity's FID Inception (framework/eval/fid.py), with torchvision matched to TORCH_SPEC; without
	@# their declared dependencies, so pip never replaces the pinned torch. (Beside the CPU torch, PyPI's
	@# torchvision cannot load its C++ ops: framework.eval.fid.import_torch_fidelity works around its import.)
	$(PY) -m pip install -q --no-deps "torchvision==$(TORCHVISION_VERSION)" "torch-fidelity==0.4.0"
	@touch $(STAMP)

data/photos256.beton: | setup
	mkdir -p data
	$(PY) tools/write_ffcv.py bundled:photos $@

data/mnist5k.beton: | setup
	mkdir -p data
	$(PY) tools/write_ffcv.py bundled:mnist5k $@

DEMO_RUN ?= runs/nvae_mnist5k

# Trains the small NVAE, then the after-training chain on its newest checkpoint: BN recalibration
# (100 iterations, a demo-sized share of NVAE's 500), bits/dim by importance weighting with K=8,
# the sampling profile (plain vs fast path), sample grids at three temperatures and FID of 500
# samples at t=0.8 against the 500 validation digits (random Inception weights when the real file is
# not in the torch hub cache: then the figure is not FID, and the tool says so). (The
# recalibration's output goes through a file, not `tee /dev/stderr`, which would truncate a log
# that stdout and stderr share: make demo >log 2>&1.)
demo: setup data/mnist5k.beton
	$(PY) -m framework.train recipes/nvae/mnist5k.yaml run.dir=$(DEMO_RUN) $(ARGS)
	@set -e; \
	$(PY) tools/recalibrate_bn.py $(DEMO_RUN) --iters 100 --overwrite > $(DEMO_RUN)/recalibrate.log; \
	cat $(DEMO_RUN)/recalibrate.log; ck=$$(sed -n 's/^wrote //p' $(DEMO_RUN)/recalibrate.log); \
	$(PY) tools/eval_bpd.py $$ck --iw-samples 8; \
	$(PY) tools/profile_sampling.py $$ck --batch-sizes 1,36 --repeats 5 --json $$ck.profile.json | grep -v '^{'; \
	$(PY) tools/sample.py $$ck --n 64 --temperatures 0.6,0.8,1.0; \
	inc=$$($(PY) -c "from framework.eval.fid import default_inception_path as p; print(p() if p().is_file() else '')"); \
	if [ -z "$$inc" ]; then inc=random; echo "note: no Inception weights in the torch hub cache: FID with random weights (not FID)"; fi; \
	$(PY) tools/eval_fid.py $$ck --n 500 --split val --temperature 0.8 --inception-weights $$inc; \
	echo "after training: $$ck (recalibrated checkpoint), $$ck.bpd-val-k8.json, $$ck.profile.json, $$ck.fid-val-n500-t0.8.json, $(DEMO_RUN)/samples/"

# The two-stage chain on the bundled photographs at 256 px: VQGAN stage 1 (vqgan/photos256_smoke.yaml:
# 40 steps, then its validation figures), the code .beton (all 3000 images), a reconstruction grid,
# then the GPT prior over the codes (prior/photos256_gpt_smoke.yaml: 100 steps), its bits per token,
# decoded samples (16 x 16 codes = 256 px, and 32 x 32 = 512 px by the sliding window) and the
# sampling profile (cached vs uncached). Without torchvision's VGG16 file in the torch hub cache,
# LPIPS runs with random VGG weights and the demo says so.
DEMO_VQ_RUN ?= runs/vqgan_photos256_smoke
DEMO_PRIOR_RUN ?= runs/prior_photos256_gpt_smoke
demo-vq: setup data/photos256.beton
	@vgg=$$($(PY) -c "from framework.losses.vgg import vgg16_weights_path as p; print(p())"); \
	if [ -f "$$vgg" ]; then lp=""; else lp="model.lpips.vgg_weights=random"; \
	  echo "note: $$vgg not found: LPIPS uses random VGG16 weights (its values are not LPIPS)"; fi; \
	$(PY) -m framework.train recipes/vqgan/photos256_smoke.yaml run.dir=$(DEMO_VQ_RUN) $$lp $(ARGS)
	$(PY) tools/encode_codes.py $(DEMO_VQ_RUN) data/photos256.beton data/photos256_codes.beton --overwrite
	$(PY) tools/sample.py $(DEMO_VQ_RUN) --n 16
	$(PY) -m framework.train recipes/prior/photos256_gpt_smoke.yaml run.dir=$(DEMO_PRIOR_RUN) \
	  model.first_stage=$(DEMO_VQ_RUN) $(PRIOR_ARGS)
	$(PY) tools/eval_bpd.py $(DEMO_PRIOR_RUN)
	$(PY) tools/sample.py $(DEMO_PRIOR_RUN) --n 16 --temperatures 1.0 --top-k 100 --codes-out $(DEMO_PRIOR_RUN)/samples/codes.npz
	$(PY) tools/sample.py $(DEMO_PRIOR_RUN) --n 4 --temperatures 1.0 --top-k 100 --grid 32,32
	$(PY) tools/profile_sampling.py $(DEMO_PRIOR_RUN) --batch-sizes 1,8 --json $(DEMO_PRIOR_RUN)/profile.json | grep -v '^{'

test: setup
	$(PY) -m pytest -q tests $(ARGS)

# The unit tests and the quick integration ones (under 5 minutes on 2 cores): no Slurm, no
# multi-minute training (pytest -m "not slow"); `make test` (CI) runs everything.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests $(ARGS)

bench: setup data/mnist5k.beton
	$(PY) tools/bench/engine_overhead.py
	$(PY) tools/bench/loader.py
	$(PY) tools/bench/nvae_step.py
	$(PY) tools/bench/noise.py
	$(PY) tools/bench/vqgan_step.py
	$(PY) tools/bench/prior_sampling.py
	$(PY) tools/bench/fid.py
	$(PY) tools/bench/pggan_step.py
	$(PY) tools/bench/imle_search.py
	$(PY) tools/bench/glo_table.py

clean-runs:
	rm -rf runs
