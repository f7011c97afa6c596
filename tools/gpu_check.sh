#!/usr/bin/env bash
# What holds on a CUDA machine, in under 5 minutes on one GPU: no arguments, nothing to set up
# beyond `make setup`. One line per check: its name, its figure, PASS / FAIL / SKIP; the logs
# of every check stay in $GPU_CHECK_DIR (default: a fresh temporary folder, printed first).
# (Its train-1, resume-1, train-2, vqgan, pggan and glann's training runs were run on a CPU with gloo; the rest needs CUDA.)
#
#   device-map   the CUDA process group (cpu:gloo,cuda:nccl): all-reduce of a CPU and a CUDA tensor,
#                an object broadcast, through framework.distributed's helpers
#   train-1      1 rank on nccl: tiny NVAE, bf16, ZeRO-2, activation checkpointing, 20 steps,
#                evaluation, checkpoints at 10 and 20 (images/s)
#   resume-1     the step-20 checkpoint removed, the run resumed from step 10 (largest loss difference)
#   train-2      2 processes: nccl on 2 GPUs; on 1 GPU both ranks share it over the same device map
#                with gloo in nccl's place (NCCL refuses two ranks on one device); against 1 process
#                with the same global batch (largest loss difference)
#   vqgan        1 rank on nccl: tiny VQGAN, bf16, ZeRO-3, the GAN terms from step 2 (adaptive weight,
#                LPIPS with random VGG16 weights), EMA codebook with restarts, 6 steps (images/s, usage)
#   vqgan-step   tools/bench/vqgan_step.py on CUDA: the faceshq step at batch 4, framework vs taming's
#                algorithm (speed-up per image)
#   prior        the vqgan block's codes (encode_codes.py on CUDA), then a tiny GPT prior on nccl, bf16,
#                ZeRO-3, checkpointed blocks (xformers' kernel when installed): finite, below uniform
#   prior-sample tools/profile_sampling.py on CUDA: the 12-layer / 512 GPT, cached vs uncached (tokens/s)
#   fid          tools/eval_fid.py on CUDA: the train-1 NVAE, 512 samples against the 500 validation
#                digits (the real Inception when its file is in the torch hub cache, else random
#                weights), then the same with the reference cached (FID, images/s)
#   pggan        1 rank on nccl: a tiny PGGAN across a phase boundary (minibatch 16 -> 8, optimiser
#                resets, the gradient penalty's double backward) on ZeRO-3 against ZeRO-0 (largest
#                loss difference), then bf16 on ZeRO-2 (finite)
#   pggan-step   tools/bench/pggan_step.py on CUDA: the official 256 px networks' step at 64 and 256 px
#                (images/s, the double backward's share)
#   glann        1 rank on nccl: a tiny GLO run (bf16, ZeRO-3, VGG distance with random weights), then
#                IMLE over its codes (the search on the GPU through torch); a 20k x 40k nearest-neighbour
#                search on CUDA against the CPU's answer (seconds, equal assignments)
#   profile      tools/profile_sampling.py on CUDA: celebahq256 at random weights, plain vs fast path
#   noise        one training step's latent noise for celebahq256 (batch 4) drawn on the GPU (ms)
#   xformers     memory-efficient attention on CUDA, when xformers is installed
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export PYTHONUNBUFFERED=1
echo "gpu_check: logs in $OUT"
FAILED=0

line() { printf '%-11s %-58s %s\n' "$1" "$2" "$3"; [ "$3" = FAIL ] && FAILED=$((FAILED + 1)); return 0; }

if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  line cuda "torch.cuda.is_available() is False" FAIL
  exit 1
fi
line cuda "$($PY -c 'import torch; print(torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| torch", torch.__version__, "cuda", torch.version.cuda, "nccl", ".".join(map(str, torch.cuda.nccl.version())))')" PASS
NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())')

BETON="$OUT/mnist5k.beton"
$PY -c "
from framework.data import sources
from framework.data.write import write_beton
write_beton(sources.mnist5k(0.1), '$BETON', 32, 'raw', progress=False)" >"$OUT/data.log" 2>&1 \
  || { line data "could not write $BETON (see data.log)" FAIL; exit 1; }

# -- device-map ----------------------------------------------------------------------------------
if timeout 120 $PY - >"$OUT/device-map.log" 2>&1 <<'EOF'
import os, torch, torch.distributed as td
from framework import distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(dist._free_port()))
spec = dist.backend_spec(True)
td.init_process_group(spec, rank=0, world_size=1)
a = torch.ones(3); b = torch.ones(3, device="cuda")
td.all_reduce(a); td.all_reduce(b)
assert dist.broadcast_object({"x": 1}) == {"x": 1}
print("OK", spec, td.get_backend())
td.destroy_process_group()
EOF
then line device-map "$(tail -1 "$OUT/device-map.log")" PASS
else line device-map "$(tail -1 "$OUT/device-map.log" | cut -c1-58)" FAIL; fi

NV="recipes/nvae/mnist5k.yaml data.path=$BETON model.num_channels_enc=16 model.num_channels_dec=16
    model.num_groups_per_scale=2 model.num_latent_per_group=8 data.batch_size=16 data.eval_batch_size=100
    train.progress=false train.eval_every=10 train.sample_every=20 train.num_samples=16 train.checkpoint_every=10
    engine.precision=bf16 engine.zero_stage=2 engine.activation_checkpointing=blocks train.steps=20"
losses() { $PY -c "
import json, sys
for ln in open(sys.argv[1]):
    m = json.loads(ln)
    if 'loss' in m: print(m['step'], m['loss'])" "$1"; }

# -- train-1 / resume-1 --------------------------------------------------------------------------
R1="$OUT/train1"
if timeout 240 $PY -m framework.train $NV run.dir="$R1" >"$OUT/train-1.log" 2>&1; then
  ips=$($PY -c "
import json; ms=[json.loads(l) for l in open('$R1/metrics.jsonl')]
t=[m['images_per_sec'] for m in ms if 'images_per_sec' in m][2:]
v=[m['val/bpd'] for m in ms if 'val/bpd' in m]
print(f'{sorted(t)[len(t)//2]:.0f} images/s (median), val bpd {v[-1]:.3f}')")
  line train-1 "$ips" PASS
  cp "$R1/metrics.jsonl" "$OUT/train1.metrics"
  rm -rf "$R1/checkpoints/step_00000020"
  if timeout 240 $PY -m framework.train $NV run.dir="$R1" >"$OUT/resume-1.log" 2>&1 \
     && grep -q "at step 10" "$OUT/resume-1.log"; then
    d=$($PY -c "
import json
a={m['step']:m['loss'] for m in map(json.loads, open('$OUT/train1.metrics')) if 'loss' in m}
b={m['step']:m['loss'] for m in map(json.loads, open('$R1/metrics.jsonl')) if 'loss' in m}
assert sorted(b)==list(range(1,21)), sorted(b)
print(f'{max(abs(a[s]-b[s])/max(abs(a[s]),1e-9) for s in range(11,21)):.1e}')")
    st=$([ "$($PY -c "print(float('$d') < 0.02)")" = True ] && echo PASS || echo FAIL)
    line resume-1 "steps 11-20 again from step 10: max rel. loss diff $d" "$st"
  else line resume-1 "did not resume from step 10 (see resume-1.log)" FAIL; fi
else
  line train-1 "$(grep -m1 -i 'error' "$OUT/train-1.log" | cut -c1-58)" FAIL
  line resume-1 "not run (train-1 failed)" SKIP
fi

# -- train-2 ---------------------------------------------------------------------------------------
VA="recipes/vae/mnist5k.yaml data.path=$BETON model.width=16 model.latent_dim=8 train.progress=false
    train.eval_every=0 train.sample_every=0 train.num_samples=4 train.steps=10 engine.zero_stage=2"
if [ "$NGPU" -ge 2 ]; then how="nccl, 2 GPUs"; GB=nccl; else how="1 GPU shared, gloo for cuda"; GB=gloo; fi
if timeout 200 $PY -m framework.train $VA run.dir="$OUT/one" data.batch_size=16 >"$OUT/train-2-ref.log" 2>&1 \
   && FRAMEWORK_GPU_BACKEND=$GB timeout 240 $PY -m torch.distributed.run --nproc_per_node=2 \
        --master_port=$($PY -c 'from framework.distributed import _free_port; print(_free_port())') \
        -m framework.train $VA run.dir="$OUT/two" data.batch_size=8 >"$OUT/train-2.log" 2>&1; then
  d=$($PY -c "
import json
a={m['step']:m['loss'] for m in map(json.loads, open('$OUT/one/metrics.jsonl')) if 'loss' in m}
b={m['step']:m['loss'] for m in map(json.loads, open('$OUT/two/metrics.jsonl')) if 'loss' in m}
print(f'{max(abs(a[s]-b[s]) for s in a):.1e}')")
  st=$([ "$($PY -c "print(float('$d') < 1e-3)")" = True ] && echo PASS || echo FAIL)
  line train-2 "$how: max |loss - 1-process loss| $d" "$st"
else line train-2 "$how: failed (see train-2*.log)" FAIL; fi

# -- vqgan / vqgan-step ----------------------------------------------------------------------------
VQ="recipes/vqgan/mnist5k_smoke.yaml data.path=$BETON model.ch=32 model.ch_mult=[1,2] model.num_res_blocks=1
    model.attn_resolutions=[16] model.quantizer.n_embed=64 model.quantizer.ema=true model.quantizer.restart_dead=2
    model.lpips.vgg_weights=random model.loss.disc_start=2 data.batch_size=16 train.progress=false
    train.eval_every=0 train.sample_every=6 train.num_samples=8 train.steps=6 engine.precision=bf16 engine.zero_stage=3"
if timeout 240 $PY -m framework.train $VQ run.dir="$OUT/vqgan" >"$OUT/vqgan.log" 2>&1; then
  fig=$($PY -c "
import json, math; ms=[json.loads(l) for l in open('$OUT/vqgan/metrics.jsonl') if 'loss' in l]
ok = all(math.isfinite(m['loss']) for m in ms) and all(math.isfinite(m['d_weight']) for m in ms[2:])
print(f"{ms[-1]['images_per_sec']:.0f} images/s, usage {ms[-1]['usage']:.2f}, d_weight {ms[-1]['d_weight']:.2g}")
import sys; sys.exit(0 if ok else 1)") && st=PASS || st=FAIL
  line vqgan "$fig" "$st"
else line vqgan "$(grep -m1 -i 'error' "$OUT/vqgan.log" | cut -c1-58)" FAIL; fi
if timeout 300 $PY tools/bench/vqgan_step.py --steps 3 --batches 4 >"$OUT/vqgan-step.json" 2>"$OUT/vqgan-step.log"; then
  fig=$($PY -c "
import json; r=json.load(open('$OUT/vqgan-step.json'))['framework_vs_taming']
print(' | '.join(f"{k}: {v['speedup_per_image']}x, mem {v['memory_ratio']}x" for k, v in r.items()))")
  line vqgan-step "$fig" PASS
else line vqgan-step "$(tail -1 "$OUT/vqgan-step.log" | cut -c1-58)" FAIL; fi

# -- prior / prior-sample ----------------------------------------------------------------------------
if [ -d "$OUT/vqgan/checkpoints" ] && timeout 120 $PY tools/encode_codes.py "$OUT/vqgan" "$BETON" "$OUT/codes.beton" \
     --no-progress >"$OUT/encode.log" 2>&1 && timeout 240 $PY -m framework.train recipes/prior/mnist5k_gpt_smoke.yaml \
     run.dir="$OUT/prior" model.first_stage="$OUT/vqgan" data.path="$OUT/codes.beton" model.vocab_size=64 \
     model.grid=[16,16] model.gpt.block_size=256 engine.precision=bf16 engine.zero_stage=3 \
     engine.activation_checkpointing=blocks train.steps=20 train.eval_every=20 train.sample_every=20 \
     train.progress=false >"$OUT/prior.log" 2>&1; then
  fig=$($PY -c "
import json, math; ms=[json.loads(l) for l in open('$OUT/prior/metrics.jsonl')]
v=[m['val/bits_per_token'] for m in ms if 'val/bits_per_token' in m][-1]
ok = all(math.isfinite(m['loss']) for m in ms if 'loss' in m) and v < 6
print(f\"{ms[-2].get('images_per_sec', 0):.0f} grids/s, val {v:.2f} bits/token (uniform 6)\")
import sys; sys.exit(0 if ok else 1)") && st=PASS || st=FAIL
  line prior "$fig" "$st"
else line prior "$(grep -m1 -i 'error' "$OUT/prior.log" "$OUT/encode.log" 2>/dev/null | cut -c1-58)" FAIL; fi
if timeout 240 $PY tools/profile_sampling.py recipes/prior/faceshq256_gpt.yaml model.gpt.n_layer=12 model.gpt.n_head=8 \
     model.gpt.n_embd=512 model.gpt.block_size=256 model.first_stage=recipes/vqgan/faceshq256.yaml --batch-sizes 1,8 \
     --no-progress --json "$OUT/prior-sample.json" >"$OUT/prior-sample.log" 2>&1; then
  fig=$($PY -c "
import json; r=json.load(open('$OUT/prior-sample.json'))
t={(x['path'],x['batch']):x['tokens_per_s'] for x in r['results']}
same=min(r['same_tokens_cached_vs_uncached'].values())
print(f\"b1 {t[('cached',1)]:.0f} tok/s ({r['speedup_cached_vs_uncached']['1']:.1f}x), b8 {t[('cached',8)]:.0f}, same {same:.2f}\")")
  line prior-sample "$fig" PASS
else line prior-sample "$(tail -1 "$OUT/prior-sample.log" | cut -c1-58)" FAIL; fi

# -- fid -------------------------------------------------------------------------------------------
INC=$($PY -c "from framework.eval.fid import default_inception_path as p; print(p() if p().is_file() else 'random')")
if [ -d "$R1/checkpoints" ] && timeout 300 $PY tools/eval_fid.py "$R1" --num-samples 512 --split val \
     --inception-weights "$INC" --no-progress --out "$OUT/fid1.json" >"$OUT/fid.log" 2>&1 \
   && timeout 200 $PY tools/eval_fid.py "$R1" --num-samples 512 --split val --inception-weights "$INC" \
     --no-progress --out "$OUT/fid2.json" >>"$OUT/fid.log" 2>&1; then
  fig=$($PY -c "
import json; a=json.load(open('$OUT/fid1.json')); b=json.load(open('$OUT/fid2.json'))
ok = b['reference_cache']['cached'] and abs(a['fid'] - b['fid']) <= 1e-6 * max(1, a['fid'])
print(f\"FID {a['fid']:.2f} ({'random w' if a['inception_weights'] == 'random' else 'Inception'}), {512 / b['seconds']:.0f} img/s cached\")
import sys; sys.exit(0 if ok else 1)") && st=PASS || st=FAIL
  line fid "$fig" "$st"
else line fid "$(tail -1 "$OUT/fid.log" 2>/dev/null | cut -c1-58)" FAIL; fi

# -- pggan / pggan-step ------------------------------------------------------------------------------
PG="recipes/pggan/mnist5k_smoke.yaml data.path=$BETON model.latent=16 model.fmap_base=64 model.fmap_max=16
    model.schedule.phase_images=32 model.schedule.fade_images=64 model.schedule.batch=8
    model.schedule.minibatch_repeats=1 train.steps=10 train.log_every=1 train.progress=false train.sample_every=10
    train.checkpoint_every=0"
PGB="model.schedule.batch_per_resolution={4: 16, 8: 8, 16: 8}"
if timeout 240 $PY -m framework.train $PG "$PGB" run.dir="$OUT/pg0" engine.zero_stage=0 >"$OUT/pggan.log" 2>&1 \
   && timeout 240 $PY -m framework.train $PG "$PGB" run.dir="$OUT/pg3" engine.zero_stage=3 >>"$OUT/pggan.log" 2>&1 \
   && timeout 240 $PY -m framework.train $PG "$PGB" run.dir="$OUT/pgbf" engine.zero_stage=2 engine.precision=bf16 \
        >>"$OUT/pggan.log" 2>&1; then
  fig=$($PY -c "
import json, math
r = {k: [json.loads(l) for l in open(f'$OUT/{k}/metrics.jsonl') if 'loss' in l] for k in ('pg0', 'pg3', 'pgbf')}
d = max(abs(a[k] - b[k]) / max(1, abs(a[k])) for a, b in zip(r['pg0'], r['pg3']) for k in ('loss', 'gen/loss'))
ok = d < 1e-3 and len(r['pg3']) == 10 and all(math.isfinite(m['loss']) for m in r['pgbf'])
print(f\"ZeRO-3 vs 0: max rel. diff {d:.1e}, {r['pg3'][-1]['resolution']:.0f} px, bf16 finite\")
import sys; sys.exit(0 if ok else 1)") && st=PASS || st=FAIL
  line pggan "$fig" "$st"
else line pggan "$(grep -m1 -i 'error' "$OUT/pggan.log" | cut -c1-58)" FAIL; fi
if timeout 300 $PY tools/bench/pggan_step.py --steps 5 --batch64 32 --batch256 16 >"$OUT/pggan-step.json" \
     2>"$OUT/pggan-step.log"; then
  fig=$($PY -c "
import json; r=json.load(open('$OUT/pggan-step.json'))
ips={k: v.get('images_per_sec') for k, v in r['results'].items() if k.endswith('wgan_gp')}
print(' | '.join(f'{k.split(\"_\")[0]} {v} img/s' for k, v in ips.items()), '| double bw', r['double_backward_share_of_step'])")
  line pggan-step "$fig" PASS
else line pggan-step "$(tail -1 "$OUT/pggan-step.log" | cut -c1-58)" FAIL; fi

# -- glann -----------------------------------------------------------------------------------------
GL="data.path=$BETON data.batch_size=16 train.steps=6 train.log_every=1 train.progress=false train.sample_every=6
    train.checkpoint_every=0"
if timeout 240 $PY -m framework.train recipes/glann/mnist5k_smoke_glo.yaml $GL model.glo.vgg_weights=random \
     run.dir="$OUT/glo" engine.zero_stage=3 engine.precision=bf16 >"$OUT/glann.log" 2>&1 \
   && timeout 240 $PY -m framework.train recipes/glann/mnist5k_smoke_imle.yaml $GL model.glo_run="$OUT/glo" \
     model.imle.refresh_every=3 run.dir="$OUT/imle" >>"$OUT/glann.log" 2>&1; then
  fig=$($PY -c "
import json, math, sys, time, torch
from framework.models.glann.search import nearest
r = [json.loads(l) for l in open('$OUT/imle/metrics.jsonl') if 'nn_distance' in l]
g = torch.Generator().manual_seed(0)
q, p = torch.randn(20000, 64, generator=g), torch.randn(40000, 64, generator=g)
nearest(q[:10].cuda(), p[:10].cuda(), 'torch')
t0 = time.perf_counter(); a, _ = nearest(q.cuda(), p.cuda(), 'torch'); torch.cuda.synchronize(); t = time.perf_counter() - t0
b, _ = nearest(q, p, 'torch')
same = torch.equal(a.cpu(), b)
print(f'GLO bf16 Z3, IMLE {len(r)} steps; 20k x 40k search {t:.2f} s, = CPU: {same}')
sys.exit(0 if same and len(r) == 6 and all(math.isfinite(m['loss']) for m in r) else 1)") && st=PASS || st=FAIL
  line glann "$fig" "$st"
else line glann "$(grep -m1 -i 'error' "$OUT/glann.log" | cut -c1-58)" FAIL; fi

# -- profile ---------------------------------------------------------------------------------------
if timeout 200 $PY tools/profile_sampling.py recipes/nvae/celebahq256.yaml --batch-sizes 1,8 --repeats 3 \
     --warmup 1 --no-progress --json "$OUT/profile.json" >"$OUT/profile.log" 2>&1; then
  fig=$($PY -c "
import json; r=json.load(open('$OUT/profile.json'))
ms={(x['path'],x['batch']):x['ms_per_image'] for x in r['results']}
d=max(r['max_abs_diff_fast_vs_plain'].values())
print(f\"b8 plain {ms[('plain',8)]:.1f} / fast {ms[('fast',8)]:.1f} ms/img, diff {d:.0e}\")
import sys; sys.exit(0 if d < 1e-3 else 1)") && st=PASS || st=FAIL
  line profile "$fig" "$st"
else line profile "$(tail -1 "$OUT/profile.log" | cut -c1-58)" FAIL; fi

# -- noise -----------------------------------------------------------------------------------------
if fig=$(timeout 120 $PY - 2>"$OUT/noise.log" <<'EOF'
import time, torch
from framework.config import load_recipe
from framework.distributed import DistEnv
from framework.models import build_task
from framework.task import StepContext
r = load_recipe("recipes/nvae/celebahq256.yaml", check_files=False)
shapes = build_task(r, DistEnv(0, 0, 1, "127.0.0.1", 0, "single")).model.latent_shapes
def step(world):
    c = StepContext(step=1, micro=0, device=torch.device("cuda"), dtype=torch.bfloat16, rank=world - 1,
                    world_size=world, batch_size=4, grad_accum=1, seed=0, stream="nvae")
    out = [c.randn(*s) for s in shapes]
    torch.cuda.synchronize()
    return out
step(1)
ms = {}
for w in (1, 96):
    t0 = time.perf_counter(); step(w); ms[w] = 1000 * (time.perf_counter() - t0)
print(f"world 1: {ms[1]:.1f} ms, world 96: {ms[96]:.1f} ms per rank")
EOF
); then line noise "$fig" PASS; else line noise "$(tail -1 "$OUT/noise.log" | cut -c1-58)" FAIL; fi

# -- xformers --------------------------------------------------------------------------------------
if $PY -c 'import xformers' 2>/dev/null; then
  if fig=$(timeout 60 $PY -c "
import torch, xformers.ops as xo
q = torch.randn(2, 256, 8, 64, device='cuda', dtype=torch.bfloat16)
o = xo.memory_efficient_attention(q, q, q)
ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q))).transpose(1, 2)
print(f'max diff vs SDPA {(o - ref).abs().max().item():.1e}')" 2>"$OUT/xformers.log"); then line xformers "$fig" PASS
  else line xformers "$(tail -1 "$OUT/xformers.log" | cut -c1-58)" FAIL; fi
else line xformers "not installed (pip install -e '.[xformers]')" SKIP; fi

echo "gpu_check: $FAILED failed"
[ "$FAILED" = 0 ]
