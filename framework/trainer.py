"""The one training loop, for every family (see framework/task.py for what a family gives it).

A step: for each engine in the task's order, every micro-batch's loss is back-propagated, the
losses are averaged over ranks, and the update is taken unless the loss or the gradient norm is
non-finite or above the recipe's thresholds (VDVAE's skip). Then EMA, metrics, and — every N
steps — evaluation, a sample grid and a checkpoint. SIGUSR2/SIGTERM make the loop checkpoint at
the next step boundary and exit with EXIT_REQUEUE, which launchers requeue on.
"""
from __future__ import annotations

import errno
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
from .checkpoint import Checkpointer, DamagedCheckpoint, complete_checkpoints, read_state, verify_files, warn
from .config import engine_config, recipe_hash, to_yaml, training_keys
from .data import build_loaders
from .ema import EMA
from .engine import build_engine, compute_dtype
from .errors import UserError
from .images import save_grid
from .models import build_task
from .task import Last, Samples, StepContext, Sum, Task, Visualizes, has

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
        if self.path.exists():  # drop what was logged after the checkpoint (all of it on a fresh start)
            keep = []
            for ln in self.path.read_text().splitlines():
                try:
                    rec = json.loads(ln)
                except ValueError:  # a line cut by a kill
                    continue
                if start_step > 0 and rec.get("step", 0) <= start_step:
                    keep.append(ln)
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
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"{self.path}: disk full while logging step {record.get('step')}; the checkpoints "
                                f"written so far are intact; free space and run again to resume") from None
            raise
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            for closer in (self.file.close, *( [self.tb.close] if self.tb is not None else [])):
                try:
                    closer()
                except OSError:  # a full disk: the error that stopped the run has been raised already
                    pass


def data_fingerprint(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _changes(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    missing = object()
    out = []
    for k in keys:
        a, b = old.get(k, missing), new.get(k, missing)
        if a != b:
            fa = "(absent)" if a is missing else json.dumps(a)
            fb = "(absent)" if b is missing else json.dumps(b)
            out.append(f"{k} ({fa} -> {fb})")
    return out


class Trainer:
    def __init__(self, recipe):
        self.recipe = r = recipe
        # a process group someone else started (a test's, a tool's) is theirs to end; one started
        # here (DeepSpeed's, on any world size) is ended by close()
        self._owns_group = not torch.distributed.is_initialized()
        self.env = env = dist.init()
        self.run_dir = Path(r.run.dir)
        self.device = env.device
        self.dtype = compute_dtype(r.engine)
        _seed_everything(r.run.seed)  # the same initial weights on every rank
        self.task = build_task(r, env)
        modules = self.task.modules()
        self.frozen = self.task.frozen_modules()
        both = set(modules) & set(self.frozen)
        if both:
            raise ValueError(f"{r.model.family}: {sorted(both)} both trained and frozen")
        for m in self.frozen.values():  # used, never trained: no engine, no checkpoint, no EMA
            m.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.order = list(modules)
        self.main = self.task.main or self.order[0]
        unknown = sorted(set(r.engine.engines) - set(modules))
        if unknown:
            raise UserError(f"key 'engine.engines.{unknown[0]}': family {r.model.family!r} has no engine "
                            f"{unknown[0]!r} (its engines: {', '.join(modules)})")
        self.engine_cfgs = {n: engine_config(r, n, self.task.engine_overrides(n)) for n in modules}
        batches = self.task.global_batches(r.train.steps)
        self.train_data, self.eval_data = build_loaders(r.data, env, r.engine.grad_accum, r.run.seed, self.task.fields,
                                                        batches)
        self.engines = {}
        for name, module in modules.items():
            self.engines[name] = build_engine(
                name, module, self.engine_cfgs[name], self.train_data.batch_size, env.world_size, r.train.steps,
                threshold=r.train.skip.grad_norm_threshold, param_groups=self.task.param_groups(name, module))
        ema_name = self.task.ema_module or self.main
        self.ema = (EMA(self.engines[ema_name].module, r.train.ema, warmup=self.task.ema_warmup)
                    if r.train.ema > 0 else None)
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", r.train.keep_checkpoints, env)
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.stop = _StopSignal()
        self._vis_batch = None
        self.fid_net, self._fid_ref = None, None
        if r.train.fid_every:  # checked before anything is written: the family samples, the weights are there
            from .eval.fid import InceptionFeatures
            from .task import require

            require(self.task, Samples, "key 'train.fid_every'")
            self.fid_net = InceptionFeatures(r.eval.inception_weights, self.device)

    # -- pieces of a step -------------------------------------------------------------------
    def _ctx(self, step: int, micro: int, batch_size: int | None = None, stream: str = "", phase: str = "train",
             rows=None, valid: int = -1) -> StepContext:
        return StepContext(step=step, micro=micro, device=self.device, dtype=self.dtype,
                           rank=self.env.rank, world_size=self.env.world_size,
                           batch_size=batch_size or self.recipe.data.batch_size,
                           grad_accum=self.recipe.engine.grad_accum, seed=self.recipe.run.seed, stream=stream,
                           phase=phase, rows=rows, valid=valid, _engines=self.engines, _frozen=self.frozen)

    def active(self, name: str, step: int) -> bool:
        return step >= self.engine_cfgs[name].start_step and bool(self.task.active(name, step))

    def _train_engine(self, name: str, micro_batches, step: int) -> tuple[dict, object]:
        r, eng = self.recipe, self.engines[name]
        gas = len(micro_batches)
        totals: dict[str, torch.Tensor] = {}
        for m, batch in enumerate(micro_batches):
            ctx = self._ctx(step, m, batch_size=self.train_data.micro_at(step), stream=name)
            x = self.task.prepare_batch(batch, ctx)
            loss, metrics = self.task.loss(name, x, ctx)
            if name == self.main and (step + 1) in r.train.debug.nan_loss_at_steps:
                loss = loss * float("nan")  # fault injection (tests): a non-finite loss
            eng.backward(loss)
            if m < gas - 1:
                eng.step(boundary=False)
            for k, v in {"loss": loss, **metrics}.items():
                last = isinstance(v, Last)
                v = torch.as_tensor(v.value if last else v).detach().float().reshape(()).to(self.device)
                totals[k] = v if last else totals.get(k, 0.0) + v / gas
        keys = sorted(totals)
        packed = dist.all_reduce_sum(torch.stack([totals[k] for k in keys])).tolist()
        means = {k: packed[i] / self.env.world_size for i, k in enumerate(keys)}
        loss = means["loss"]
        force = ""
        if not math.isfinite(loss):
            force = "loss_nonfinite"
        elif r.train.skip.loss_threshold > 0 and loss > r.train.skip.loss_threshold:
            force = "loss_above_threshold"
        decision = eng.step(boundary=True, force_skip=force)
        return means, decision

    def _eval_mode(self, on: bool) -> None:
        for e in self.engines.values():
            e.module.train(not on)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        task = self.task
        if type(task).evaluate is Task.evaluate:  # the family has no evaluation metrics
            return {}
        self._eval_mode(True)
        per_image: dict[str, torch.Tensor] = {}
        set_sums: dict[str, torch.Tensor] = {}
        count = 0
        if self.recipe.train.debug.sleep_in_eval_s:  # fault injection (tests): a slow evaluation
            time.sleep(self.recipe.train.debug.sleep_in_eval_s)
        bs = self.eval_data.batch_size
        try:
            for batch, n_valid in self.eval_data:
                ctx = self._ctx(self.step, 0, batch_size=bs, phase="eval", rows=batch["index"].numpy(), valid=n_valid)
                out = task.evaluate(task.prepare_batch(batch, ctx), ctx)
                if not out:
                    return {}
                for k, v in out.items():
                    if isinstance(v, Sum):
                        val = v.value.detach().double().cpu()
                        set_sums[k] = set_sums[k] + val if k in set_sums else val
                    else:
                        val = v.detach()[:n_valid].double().sum().cpu()
                        per_image[k] = per_image.get(k, 0.0) + val
                count += n_valid
        finally:
            self._eval_mode(False)
        pk, sk = sorted(per_image), sorted(set_sums)
        flat = [torch.as_tensor(per_image[k], dtype=torch.float64).reshape(1) for k in pk]
        flat += [set_sums[k].reshape(-1) for k in sk] + [torch.tensor([float(count)], dtype=torch.float64)]
        packed = dist.all_reduce_sum(torch.cat(flat))
        total = float(packed[-1])
        if total == 0:
            return {}
        out = {f"val/{k}": float(packed[i]) / total for i, k in enumerate(pk)}
        at, sums = len(pk), {}
        for k in sk:
            n = set_sums[k].numel()
            sums[k] = packed[at:at + n].reshape(set_sums[k].shape)
            at += n
        if sums:
            out.update({f"val/{k}": float(v) for k, v in task.finish_eval(sums, int(total)).items()})
        return out

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        r = self.recipe.train
        paths = None
        self._eval_mode(True)
        try:
            if has(self.task, Samples):
                g = torch.Generator(device=self.device).manual_seed(self.recipe.run.seed + 1)  # the same every time
                ctx = self._ctx(self.step, 0, phase="sample", rows=list(range(r.num_samples)))
                if self.ema is not None:
                    with self.ema.swapped():
                        images = self.task.sample(r.num_samples, r.sample_temperature, g, ctx)
                else:
                    images = self.task.sample(r.num_samples, r.sample_temperature, g, ctx)
                if self.env.is_main:
                    paths = self.run_dir / "samples" / f"step_{self.step:08d}.png"
                    self.log.image("samples", save_grid(images, paths), self.step)
            if has(self.task, Visualizes):
                if self._vis_batch is None:
                    self._vis_batch = next(iter(self.eval_data), None)
                if self._vis_batch is not None:
                    batch, n_valid = self._vis_batch
                    ctx = self._ctx(self.step, 0, batch_size=self.eval_data.batch_size, phase="eval",
                                    rows=batch["index"].numpy(), valid=n_valid)
                    images = self.task.visualize(self.task.prepare_batch(batch, ctx), ctx)
                    if self.env.is_main:
                        path = self.run_dir / "samples" / f"recon_step_{self.step:08d}.png"
                        self.log.image("reconstructions", save_grid(images, path), self.step)
                        paths = paths or path
        finally:
            self._eval_mode(False)
        return paths

    @torch.no_grad()
    def fid(self) -> dict[str, float]:
        """val/fid: train.fid_samples samples (EMA weights when kept) against the validation split
        (a prior: its first stage's images), the statistics of the split cached beside the .beton."""
        import contextlib

        from .data.loader import BetonInfo
        from .eval.fid import frechet_distance, reference_stats, sample_features, stats_of

        r, task = self.recipe, self.task
        first = getattr(task, "first", None)
        d = first.recipe.data if first is not None else r.data
        bs = r.data.eval_batch_size or r.data.batch_size
        if self._fid_ref is None:
            self._fid_ref, _ = reference_stats(BetonInfo(d.path), "val", self.fid_net, self.env, d.channels, bs,
                                               r.data.workers, progress=False)

        def draw(b, g):
            ctx = self._ctx(self.step, 0, batch_size=b, phase="sample", rows=list(range(b)))
            return task.sample(b, r.train.sample_temperature, g, ctx)

        self._eval_mode(True)
        try:
            with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
                fake, _ = sample_features(r.train.fid_samples, draw, self.fid_net, self.env, bs, r.run.seed,
                                          progress=False, lockstep=True)
        finally:
            self._eval_mode(False)
        value = None
        if self.env.is_main:
            s = stats_of(fake)
            value = frechet_distance(s.mu, s.sigma, self._fid_ref.mu, self._fid_ref.sigma)
        return {"val/fid": float(dist.broadcast_object(value))}

    def fingerprint(self) -> dict:
        r = self.recipe
        return {"recipe_hash": recipe_hash(r), "training_keys": training_keys(r), "world_size": self.env.world_size,
                "data": data_fingerprint(r.data.path)}

    def save(self) -> Path:
        order = self.train_data.order
        state = {"step": self.step, "samples_seen": order.images_before(self.step),
                 "epoch": order.epoch_of(self.step), "skipped_total": self.skipped_total,
                 "consecutive_skips": self.consecutive_skips, "zero_stage": self.recipe.engine.zero_stage,
                 "engines": self.order, "time": time.time(), **self.fingerprint()}
        return self.ckpt.save(self.step, self.engines, self.ema, state, task_state=self.task.state_dict(),
                              sleep_s=self.recipe.train.debug.sleep_in_checkpoint_s)

    # -- resume ------------------------------------------------------------------------------
    def _check_resumable(self, path: Path, state: dict) -> list[str]:
        """-> the differences allowed by train.resume_changed=allow; refuses them otherwise."""
        r, now = self.recipe, self.fingerprint()
        changes = []
        if state.get("world_size") != now["world_size"]:
            changes.append(f"world size ({state.get('world_size')} -> {now['world_size']})")
        if "training_keys" in state:
            changes += _changes(state["training_keys"], now["training_keys"])
        elif self.env.is_main:
            warn(f"{path}: written before checkpoints recorded their recipe; only the world size is compared")
        if "data" in state and state["data"] != now["data"]:
            a, b = state["data"], now["data"]
            what = [f"size {a['size']} -> {b['size']}"] if a["size"] != b["size"] else []
            if a["mtime_ns"] != b["mtime_ns"]:
                what.append("modified since")
            changes.append(f"data file {r.data.path} ({', '.join(what)})")
        if not changes:
            return []
        if r.train.resume_changed != "allow":
            raise UserError(f"{path}: this recipe differs from the checkpoint's in {'; '.join(changes)}; the run "
                            f"would not continue exactly (set train.resume_changed=allow to resume anyway)")
        if state.get("zero_stage", r.engine.zero_stage) != r.engine.zero_stage:
            raise UserError(f"{path}: written on ZeRO-{state.get('zero_stage')}, this run is ZeRO-"
                            f"{r.engine.zero_stage}; DeepSpeed cannot load one stage's optimizer shards into "
                            f"another (resume with engine.zero_stage={state.get('zero_stage')})")
        if state.get("world_size") != now["world_size"] and r.engine.zero_stage > 0:
            raise UserError(f"{path}: written by world size {state.get('world_size')}, this run has "
                            f"{now['world_size']}; ZeRO-{r.engine.zero_stage} shards cannot be re-split (resume "
                            f"with world size {state.get('world_size')})")
        return changes

    def _resume(self) -> tuple[Path | None, list[str]]:
        """Loads the newest checkpoint that is whole, passing over damaged ones with a warning."""
        env = self.env
        cands = dist.broadcast_object([str(p) for p in complete_checkpoints(self.run_dir / "checkpoints")]
                                      if env.is_main else None)
        for cand in reversed(cands):
            path = Path(cand)
            verdict = None
            if env.is_main:
                try:
                    state = read_state(path)
                    verify_files(path, state)
                    verdict = ("ok", state)
                except DamagedCheckpoint as e:
                    verdict = ("damaged", str(e))
            verdict = dist.broadcast_object(verdict)
            if verdict[0] == "damaged":
                if env.is_main:
                    warn(f"{verdict[1]}; passing over {path.name} for the previous checkpoint")
                continue
            changes = self._check_resumable(path, verdict[1])  # the same decision on every rank
            status, msg = 0.0, ""
            try:
                state, task_state = self.ckpt.load(path, self.engines, self.ema)
                self.task.load_state_dict(task_state)
            except DamagedCheckpoint as e:
                status, msg = 1.0, str(e)
            except (UserError, ValueError) as e:
                status, msg = 2.0, str(e)
            worst = dist.all_reduce_sum(torch.tensor([status, float(status > 0)]))
            if float(worst[1]) == 0:
                self.step = state["step"]
                self.skipped_total = state["skipped_total"]
                self.consecutive_skips = state["consecutive_skips"]
                return path, changes
            if status == 2.0 or float(worst[0]) > float(worst[1]):  # someone's error is not a damaged file
                raise UserError(msg or f"{path}: another rank could not load this checkpoint")
            if msg:
                warn(f"{msg}; passing over {path.name} for the previous checkpoint")
        if cands:  # never silently to fresh state: the user decides what to do with the damaged ones
            raise UserError(f"{self.run_dir / 'checkpoints'}: none of its {len(cands)} checkpoint(s) can be loaded "
                            f"(see the warnings above); move them away to start this run afresh")
        return None, []

    # -- the loop ----------------------------------------------------------------------------
    def _start(self) -> None:
        r, env = self.recipe, self.env
        self.ckpt.clean_partial()
        latest, changes = self._resume()  # loaded before anything is written: a refused resume changes nothing
        if env.is_main:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            first = self.run_dir / "recipe.yaml"
            if latest is None or not first.exists():
                _write_atomic(first, to_yaml(r))
            elif changes:
                n = 1
                while (self.run_dir / f"recipe.resume-{n}.yaml").exists():
                    n += 1
                _write_atomic(self.run_dir / f"recipe.resume-{n}.yaml",
                              f"# resumed at step {self.step} from {latest.name} with changes: {'; '.join(changes)}\n"
                              + to_yaml(r))
        dist.barrier()
        self.log = MetricsLog(self.run_dir, self.step, env.is_main)
        if env.is_main:
            params = {n: sum(getattr(p, "ds_numel", p.numel()) for p in e.module.parameters())
                      for n, e in self.engines.items()}
            frozen = {n: sum(p.numel() for p in m.parameters()) for n, m in self.frozen.items()}
            print(f"run {self.run_dir} | family {r.model.family} | world {env.world_size} ({env.source}) | "
                  f"ZeRO-{r.engine.zero_stage} {r.engine.precision} | global batch {self._batch_text()} | "
                  f"parameters {', '.join(f'{n} {c:,}' for n, c in params.items())}"
                  + (f" | frozen {', '.join(f'{n} {c:,}' for n, c in frozen.items())}" if frozen else ""), flush=True)
            if latest is not None:
                print(f"resumed from {latest} at step {self.step}", flush=True)
                if changes:
                    warn(f"resumed with changed training keys (train.resume_changed=allow): {'; '.join(changes)}")
                    self.log.log({"step": self.step, "event": "resume_changed", "changes": changes})

    def _batch_text(self) -> str:
        d, r = self.train_data, self.recipe
        if d.order.batches is None:
            return (f"{d.global_batch} = {r.data.batch_size} per rank x {self.env.world_size} ranks x "
                    f"{r.engine.grad_accum} accum")
        sizes = list(dict.fromkeys(int(b) for b in d.order.batches))
        return (f"{' -> '.join(map(str, sizes))} (the family's schedule) over {self.env.world_size} ranks x "
                f"{r.engine.grad_accum} accum")

    def _progress(self):
        from tqdm import tqdm

        r = self.recipe.train
        return tqdm(total=r.steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                    disable=not (self.env.is_main and r.progress), file=sys.stderr)

    def _requeue(self, bar) -> int:
        path = self.save()
        if self.env.is_main:
            bar.close()
            print(f"signal {signal.Signals(self.stop.received).name}: checkpoint {path} "
                  f"written at step {self.step}; exiting {EXIT_REQUEUE} to be requeued", flush=True)
        return EXIT_REQUEUE

    def fit(self) -> int:
        r = self.recipe.train
        self.stop.install()  # before anything slow: a signal during the first evaluation still checkpoints
        bar = None
        try:
            self._start()
            bar = self._progress()
            if self.step == 0 and r.eval_every:  # the untrained model's figures: the baseline of the curve
                val = self.evaluate()
                if val:
                    self.log.log({"step": 0, **val})
                if self._any_stop():
                    return self._requeue(bar)
            t_last = time.perf_counter()
            while self.step < r.steps:
                s = self.step
                for name, e in self.engines.items():
                    if self.task.reset_optimizer(name, s):
                        e.reset_optimizer_state()
                active = [n for n in self.order if self.active(n, s)]
                lrs = {n: self.engines[n].set_lr(s, self.task.lr(n, s)) for n in active}
                micro = self.train_data.batch(s)
                record: dict = {"step": s + 1}
                skipped = []
                for name in active:
                    means, decision = self._train_engine(name, micro, s)
                    prefix = "" if name == self.main else f"{name}/"
                    record.update({f"{prefix}{k}": v for k, v in means.items()})
                    record[f"{prefix}grad_norm"] = decision.grad_norm
                    if decision.skip:
                        skipped.append(f"{name}:{decision.reason}")
                self.task.after_step(s, self.engines)
                self.step = s + 1
                if skipped:
                    self.skipped_total += 1
                    self.consecutive_skips += 1
                else:
                    self.consecutive_skips = 0
                    if self.ema is not None and (self.task.ema_module or self.main) in active:
                        self.ema.update()
                now = time.perf_counter()
                if self.main in lrs:
                    record["lr"] = lrs[self.main]
                record.update(skipped=bool(skipped), skips_total=self.skipped_total,
                              sec_per_step=now - t_last,
                              images_per_sec=self.train_data.global_batch_at(s) / max(now - t_last, 1e-9))
                record.update({f"{n}/lr": v for n, v in lrs.items() if n != self.main})
                t_last = now
                if skipped:
                    record["skip_reason"] = ",".join(skipped)
                if self.step % r.log_every == 0 or self.step == r.steps:
                    self.log.log(record)
                bar.update(1)
                if "loss" in record:
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
                if r.fid_every and self.step % r.fid_every == 0:
                    self.log.log({"step": self.step, **self.fid()})
                if (r.sample_every and self.step % r.sample_every == 0) or last:
                    self.sample_grid()
                if self._any_stop():
                    return self._requeue(bar)
                if (r.checkpoint_every and self.step % r.checkpoint_every == 0) or last:
                    self.save()
                if r.debug.sleep_after_step_s:
                    time.sleep(r.debug.sleep_after_step_s)
        finally:
            if bar is not None:
                bar.close()
            self.stop.restore()
            if hasattr(self, "log"):
                self.log.close()
        if self.env.is_main:
            print(f"done: {self.step} steps | metrics {self.run_dir / 'metrics.jsonl'} | samples "
                  f"{self.run_dir / 'samples'} | checkpoints {self.run_dir / 'checkpoints'} | "
                  f"tensorboard --logdir {self.run_dir / 'tb'}", flush=True)
        return 0

    def close(self) -> None:
        """After fit returned on every rank (done, requeue or abort: decisions all ranks share): the
        loaders stop, then the process group ends in order (all ranks here, then destroyed). A process
        that exits with the group alive can abort at interpreter shutdown ("terminate called without
        an active exception", SIGABRT: seen in CI on 2 ranks under torchrun and on 1)."""
        self.train_data.close()
        dist.barrier()  # the group exists in a single process too (DeepSpeed's): ended the same way
        if self._owns_group:
            # (ending an adopted group would break its owner: a later init_process_group over the
            # same store reads the old group's keys and can hang, seen with torchrun)
            dist.shutdown()

    def _any_stop(self) -> bool:
        """Whether any rank got a stop signal: a reduction, so that every rank takes the same branch
        (a signal landing between two ranks' checks cannot split them)."""
        got = float(dist.all_reduce_sum(torch.tensor([1.0 if self.stop.received else 0.0]))[0])
        if got > 0 and not self.stop.received:
            self.stop.received = signal.SIGUSR2
        return got > 0


def train(recipe) -> int:
    """The entry every launcher ends in."""
    trainer = Trainer(recipe)
    try:
        rc = trainer.fit()
    except TrainingAborted as e:
        print(f"error: training aborted: {e}", file=sys.stderr, flush=True)
        rc = EXIT_ABORT
    trainer.close()
    return rc
