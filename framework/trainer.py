"""The one training loop, for every family (see framework/task.py for what a family gives it).

A step: for each engine in the task's order, every micro-batch's loss is back-propagated, the
losses are averaged over ranks, and the update is taken unless the loss or the gradient norm is
non-finite or above the recipe's thresholds (VDVAE's skip). Then EMA, metrics, and — every N
steps — evaluation, a sample grid and a checkpoint. SIGUSR2/SIGTERM make the loop checkpoint at
the next step boundary and exit with EXIT_REQUEUE, which launchers requeue on.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .checkpoint import Checkpointer, latest_checkpoint
from .config import to_yaml
from .data import build_loaders, to_model_input
from .ema import EMA
from .engine import build_engine, compute_dtype
from .images import save_grid
from .models import build_task
from .task import StepContext, Task

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "checkpointed, run me again"
EXIT_ABORT = 3


class TrainingAborted(RuntimeError):
    pass


class _StopSignal:
    """Remembers SIGUSR2/SIGTERM; the loop acts on it at the next step boundary."""

    def __init__(self):
        self.received = 0
        self._previous = {}

    def install(self):
        for s in (signal.SIGUSR2, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLog:
    """RUN_DIR/metrics.jsonl (one JSON object per step) and TensorBoard, on rank 0."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run: drop what was logged after the checkpoint
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            _write_atomic(self.path, "".join(ln + "\n" for ln in keep))
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is a declared dependency; keep training without it
            self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class Trainer:
    def __init__(self, recipe):
        self.recipe = r = recipe
        self.env = env = dist.init()
        self.run_dir = Path(r.run.dir)
        self.device = env.device
        self.dtype = compute_dtype(r.engine)
        _seed_everything(r.run.seed)  # the same initial weights on every rank
        self.task = build_task(r, env)
        modules = self.task.modules()
        self.order = list(modules)
        self.main = self.task.main or self.order[0]
        self.train_data, self.eval_data = build_loaders(r.data, env, r.engine.grad_accum, r.run.seed)
        self.engines = {}
        for name, module in modules.items():
            self.engines[name] = build_engine(
                name, module, r.engine, r.data.batch_size, env.world_size, r.train.steps,
                threshold=r.train.skip.grad_norm_threshold, param_groups=self.task.param_groups(name, module))
        ema_name = self.task.ema_module or self.main
        self.ema = EMA(self.engines[ema_name].module, r.train.ema) if r.train.ema > 0 else None
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", r.train.keep_checkpoints, env)
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.stop = _StopSignal()

    # -- pieces of a step -------------------------------------------------------------------
    def _ctx(self, step: int, micro: int, batch_size: int | None = None, stream: str = "") -> StepContext:
        return StepContext(step=step, micro=micro, engines=self.engines, device=self.device, dtype=self.dtype,
                           rank=self.env.rank, world_size=self.env.world_size,
                           batch_size=batch_size or self.recipe.data.batch_size,
                           grad_accum=self.recipe.engine.grad_accum, seed=self.recipe.run.seed, stream=stream)

    def _train_engine(self, name: str, micro_batches, step: int) -> tuple[dict, object]:
        r, eng = self.recipe, self.engines[name]
        gas = len(micro_batches)
        totals: dict[str, torch.Tensor] = {}
        for m, xb in enumerate(micro_batches):
            x = to_model_input(xb, r.data.num_bits, self.device, self.dtype)
            loss, metrics = self.task.loss(name, x, self._ctx(step, m, stream=name))
            if name == self.main and (step + 1) in r.train.debug.nan_loss_at_steps:
                loss = loss * float("nan")  # fault injection (tests): a non-finite loss
            eng.backward(loss)
            if m < gas - 1:
                eng.step(boundary=False)
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float().reshape(()) / gas
        keys = sorted(totals)
        packed = torch.stack([totals[k].cpu() for k in keys] + [torch.tensor(float(self.stop.received))])
        packed = dist.all_reduce_sum(packed)
        means = {k: float(packed[i]) / self.env.world_size for i, k in enumerate(keys)}
        if packed[-1] > 0 and not self.stop.received:
            self.stop.received = signal.SIGUSR2  # another rank got the signal
        loss = means["loss"]
        force = ""
        if not math.isfinite(loss):
            force = "loss_nonfinite"
        elif r.train.skip.loss_threshold > 0 and loss > r.train.skip.loss_threshold:
            force = "loss_above_threshold"
        decision = eng.step(boundary=True, force_skip=force)
        return means, decision

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if type(self.task).evaluate is Task.evaluate:  # the family defines no evaluation metrics
            return {}
        for e in self.engines.values():
            e.module.eval()
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros(())
        bs = self.eval_data.batch_size
        for xb, n_valid in self.eval_data:
            x = to_model_input(xb, self.recipe.data.num_bits, self.device, self.dtype)
            out = self.task.evaluate(x, self._ctx(self.step, 0, batch_size=bs))
            for k, v in out.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + v[:n_valid].double().sum().cpu()
            count += n_valid
        for e in self.engines.values():
            e.module.train()
        if not sums:
            return {}
        keys = sorted(sums)
        packed = dist.all_reduce_sum(torch.stack([sums[k] for k in keys] + [count.double()]))
        return {f"val/{k}": float(packed[i] / packed[-1]) for i, k in enumerate(keys)}

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        r = self.recipe.train
        for e in self.engines.values():
            e.module.eval()
        g = torch.Generator().manual_seed(self.recipe.run.seed + 1)  # the same latents every time
        ctx = self._ctx(self.step, 0)
        if self.ema is not None:
            with self.ema.swapped():
                images = self.task.sample(r.num_samples, r.sample_temperature, g, ctx)
        else:
            images = self.task.sample(r.num_samples, r.sample_temperature, g, ctx)
        for e in self.engines.values():
            e.module.train()
        if not self.env.is_main:
            return None
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        grid = save_grid(images, path)
        self.log.image("samples", grid, self.step)
        return path

    def save(self) -> Path:
        state = {"step": self.step, "samples_seen": self.step * self.train_data.global_batch,
                 "epoch": self.step // self.train_data.steps_per_epoch, "skipped_total": self.skipped_total,
                 "consecutive_skips": self.consecutive_skips, "world_size": self.env.world_size,
                 "zero_stage": self.recipe.engine.zero_stage, "engines": self.order, "time": time.time()}
        return self.ckpt.save(self.step, self.engines, self.ema, state,
                              sleep_s=self.recipe.train.debug.sleep_in_checkpoint_s)

    # -- the loop ----------------------------------------------------------------------------
    def _start(self) -> None:
        r, env = self.recipe, self.env
        self.ckpt.clean_partial()
        latest = dist.broadcast_object(latest_checkpoint(self.run_dir / "checkpoints") if env.is_main else None)
        if latest is not None:  # loaded before anything is written: a refused resume changes nothing
            state = self.ckpt.load(Path(latest), self.engines, self.ema)
            self.step = state["step"]
            self.skipped_total = state["skipped_total"]
            self.consecutive_skips = state["consecutive_skips"]
        if env.is_main:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            _write_atomic(self.run_dir / "recipe.yaml", to_yaml(r))
        dist.barrier()
        self.log = MetricsLog(self.run_dir, self.step, env.is_main)
        if env.is_main:
            d = self.train_data
            params = {n: sum(getattr(p, "ds_numel", p.numel()) for p in e.module.parameters())
                      for n, e in self.engines.items()}
            print(f"run {self.run_dir} | family {r.model.family} | world {env.world_size} ({env.source}) | "
                  f"ZeRO-{r.engine.zero_stage} {r.engine.precision} | global batch {d.global_batch} = "
                  f"{r.data.batch_size} per rank x {env.world_size} ranks x {r.engine.grad_accum} accum | "
                  f"parameters {', '.join(f'{n} {c:,}' for n, c in params.items())}", flush=True)
            if latest is not None:
                print(f"resumed from {latest} at step {self.step}", flush=True)

    def _progress(self):
        from tqdm import tqdm

        r = self.recipe.train
        return tqdm(total=r.steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                    disable=not (self.env.is_main and r.progress), file=sys.stderr)

    def fit(self) -> int:
        r = self.recipe.train
        self._start()
        if self.step == 0 and r.eval_every:  # the untrained model's figures: the baseline of the curve
            val = self.evaluate()
            if val:
                self.log.log({"step": 0, **val})
        self.stop.install()
        bar = self._progress()
        t_last = time.perf_counter()
        try:
            while self.step < r.steps:
                s = self.step
                lrs = {n: e.set_lr(s) for n, e in self.engines.items()}
                micro = self.train_data.batch(s)
                record: dict = {"step": s + 1}
                skipped = []
                for name in self.order:
                    means, decision = self._train_engine(name, micro, s)
                    prefix = "" if name == self.main else f"{name}/"
                    record.update({f"{prefix}{k}": v for k, v in means.items()})
                    record[f"{prefix}grad_norm"] = decision.grad_norm
                    if decision.skip:
                        skipped.append(f"{name}:{decision.reason}")
                self.step = s + 1
                if skipped:
                    self.skipped_total += 1
                    self.consecutive_skips += 1
                else:
                    self.consecutive_skips = 0
                    if self.ema is not None:
                        self.ema.update()
                now = time.perf_counter()
                record.update(lr=lrs[self.main], skipped=bool(skipped), skips_total=self.skipped_total,
                              sec_per_step=now - t_last,
                              images_per_sec=self.train_data.global_batch / max(now - t_last, 1e-9))
                t_last = now
                if skipped:
                    record["skip_reason"] = ",".join(skipped)
                if self.step % r.log_every == 0 or self.step == r.steps:
                    self.log.log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", skips=self.skipped_total, refresh=False)
                if self.consecutive_skips >= r.skip.max_consecutive:
                    raise TrainingAborted(
                        f"{self.consecutive_skips} consecutive updates skipped (last at step {self.step}: "
                        f"{record.get('skip_reason')}); lower engine.optimizer.lr or raise "
                        f"train.skip.grad_norm_threshold")
                last = self.step == r.steps
                if (r.eval_every and self.step % r.eval_every == 0) or last:
                    val = self.evaluate()
                    if val:
                        self.log.log({"step": self.step, **val})
                if (r.sample_every and self.step % r.sample_every == 0) or last:
                    self.sample_grid()
                if self.stop.received:
                    path = self.save()
                    if self.env.is_main:
                        bar.close()
                        print(f"signal {signal.Signals(self.stop.received).name}: checkpoint {path} "
                              f"written at step {self.step}; exiting {EXIT_REQUEUE} to be requeued", flush=True)
                    return EXIT_REQUEUE
                if (r.checkpoint_every and self.step % r.checkpoint_every == 0) or last:
                    self.save()
                if r.debug.sleep_after_step_s:
                    time.sleep(r.debug.sleep_after_step_s)
        finally:
            bar.close()
            self.stop.restore()
            if hasattr(self, "log"):
                self.log.close()
        if self.env.is_main:
            print(f"done: {self.step} steps | metrics {self.run_dir / 'metrics.jsonl'} | samples "
                  f"{self.run_dir / 'samples'} | checkpoints {self.run_dir / 'checkpoints'} | "
                  f"tensorboard --logdir {self.run_dir / 'tb'}", flush=True)
        return 0


def train(recipe) -> int:
    """The entry every launcher ends in."""
    trainer = Trainer(recipe)
    try:
        return trainer.fit()
    except TrainingAborted as e:
        print(f"error: training aborted: {e}", file=sys.stderr, flush=True)
        return EXIT_ABORT
