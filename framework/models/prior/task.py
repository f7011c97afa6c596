"""A prior over a stage-1 model's code grids, as a task of the trainer: one engine `prior` (the GPT
or the PixelCNN), the stage-1 model as the frozen module `first_stage` (its decoder turns sampled
codes into images; never an engine, never in a checkpoint).

Data: the code .beton of tools/encode_codes.py (`codes`, `codes_flipped` with --flip, `label`,
`split`); each row's index comes with it, so the mirrored twin (data.flip) and the dropped label
(model.label_dropout, for classifier-free guidance) are functions of (seed, step, index): the same
on any number of ranks. The loss is the cross-entropy of every code given the ones before it in
raster order; validation reports bits per token (nats / ln 2 per code) and bits per image (the
sum over the grid), a property of the code grid and not of pixels.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...config import AT_LEAST_0, AT_LEAST_1, FRACTION, Range
from ...errors import UserError
from ...task import Task as BaseTask
from ...task import draw_base, row_seed
from .gpt import GPT, gpt_parameters
from .pixelcnn import GatedPixelCNN
from .sampling import SamplingConfig, check_sampling, sample_gpt, sample_pixelcnn, sample_window


@dataclass
class GPTConfig:  # taming's transformer_config keys
    block_size: int = 256  # positions: at least the grid's h x w (condition + h*w - 1 codes)
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 512
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0


@dataclass
class PixelCNNConfig:
    dim: int = 64
    layers: int = 15
    first_kernel: int = 7
    kernel: int = 3
    out_hidden: int = 512


@dataclass
class SamplingDefaults:  # what sample grids in training and tools/sample.py use unless told otherwise
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    guidance: float = 1.0  # classifier-free guidance scale (needs n_classes and label_dropout > 0 to mean anything)


@dataclass
class ModelConfig:
    family: str = "prior"
    arch: str = "gpt"  # gpt | pixelcnn
    first_stage: str = ""  # the stage-1 run or checkpoint folder (a stage-1 recipe: random weights, for timing)
    vocab_size: int = 1024  # codes of the first stage
    grid: list[int] = field(default_factory=lambda: [16, 16])  # the code grid (h, w) the prior is trained on
    n_classes: int = 0  # > 0: class-conditional on the .beton's labels
    label_dropout: float = 0.0  # share of training rows whose label is replaced by "no class" (guidance)
    sos_token: int = 0  # unconditional GPT: the start token, a code id (taming's SOSProvider)
    gpt: GPTConfig = field(default_factory=GPTConfig)
    pixelcnn: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)


RANGES = {
    "vocab_size": Range(2, 2**31 - 1), "grid": AT_LEAST_1, "n_classes": AT_LEAST_0, "label_dropout": FRACTION,
    "sos_token": AT_LEAST_0,
    "gpt.block_size": AT_LEAST_1, "gpt.n_layer": AT_LEAST_1, "gpt.n_head": AT_LEAST_1, "gpt.n_embd": AT_LEAST_1,
    "gpt.embd_pdrop": FRACTION, "gpt.resid_pdrop": FRACTION, "gpt.attn_pdrop": FRACTION,
    "pixelcnn.dim": AT_LEAST_1, "pixelcnn.layers": AT_LEAST_1, "pixelcnn.first_kernel": AT_LEAST_1,
    "pixelcnn.kernel": AT_LEAST_1, "pixelcnn.out_hidden": AT_LEAST_1,
    "sampling.top_k": AT_LEAST_0, "sampling.top_p": Range(0, 1, lo_open=True), "sampling.guidance": AT_LEAST_0,
}

LN2 = math.log(2.0)


def check_model(m) -> None:
    if m.arch not in ("gpt", "pixelcnn"):
        raise UserError(f"key 'model.arch' is {m.arch!r}; expected gpt or pixelcnn")
    if len(m.grid) != 2:
        raise UserError(f"key 'model.grid' is {list(m.grid)}; expected [h, w]")
    h, w = m.grid
    if m.arch == "gpt":
        if m.gpt.block_size < h * w:
            raise UserError(f"key 'model.gpt.block_size' is {m.gpt.block_size}; a {h}x{w} grid needs {h * w} "
                            f"positions (the condition and {h * w - 1} codes)")
        if m.gpt.n_embd % m.gpt.n_head:
            raise UserError(f"key 'model.gpt.n_embd' ({m.gpt.n_embd}) must be a multiple of model.gpt.n_head "
                            f"({m.gpt.n_head})")
        if m.sos_token >= m.vocab_size:
            raise UserError(f"key 'model.sos_token' is {m.sos_token}; a code id below model.vocab_size "
                            f"({m.vocab_size})")
    else:
        for k in ("first_kernel", "kernel"):
            if getattr(m.pixelcnn, k) % 2 == 0:
                raise UserError(f"key 'model.pixelcnn.{k}' is {getattr(m.pixelcnn, k)}; it must be odd")
    if m.label_dropout > 0 and not m.n_classes:
        raise UserError("key 'model.label_dropout' needs a class-conditional prior (model.n_classes > 0)")
    check_sampling(SamplingConfig(1.0, m.sampling.top_k, m.sampling.top_p, m.sampling.guidance), m.vocab_size,
                   m.n_classes > 0)


def build_prior(m, checkpointing: bool = False) -> torch.nn.Module:
    if m.arch == "gpt":
        g = m.gpt
        return GPT(m.vocab_size, g.block_size, g.n_layer, g.n_head, g.n_embd, g.embd_pdrop, g.resid_pdrop,
                   g.attn_pdrop, m.n_classes, checkpointing)
    p = m.pixelcnn
    return GatedPixelCNN(m.vocab_size, p.dim, p.layers, p.first_kernel, p.kernel, p.out_hidden, m.n_classes)


def _row_uniform(seed: int, tag: int, step: int, index: torch.Tensor) -> np.ndarray:
    base = draw_base(seed, tag, step)
    return np.array([row_seed(base, int(i)) / float(1 << 63) for i in index.tolist()])


class Task(BaseTask):
    main = "prior"

    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        m = self.cfg = recipe.model
        check_model(m)
        self.grid = (int(m.grid[0]), int(m.grid[1]))
        self.tokens = self.grid[0] * self.grid[1]
        self.prior = build_prior(m, recipe.engine.activation_checkpointing == "blocks")
        self.fields = ("codes", "index") + (("label",) if m.n_classes else ()) + \
            (("codes_flipped",) if recipe.data.flip else ())
        self.first = None  # the stage-1 model (framework.eval.checkpoints.Loaded), read by frozen_modules
        self.sampling = SamplingConfig(recipe.train.sample_temperature, m.sampling.top_k, m.sampling.top_p,
                                       m.sampling.guidance)
        self.sample_grid_size = self.grid  # tools/sample.py may ask for a larger grid (sliding window)
        g = m.gpt
        self._dropout = m.arch == "gpt" and max(g.embd_pdrop, g.resid_pdrop, g.attn_pdrop) > 0

    # -- the first stage and the codes ------------------------------------------------------------
    def load_first_stage(self, path: str = ""):
        """The stage-1 model named by model.first_stage (or `path`), checked against this prior."""
        from ...eval.checkpoints import load
        from ...task import Codes, require

        path = path or self.cfg.first_stage
        if not path:
            raise UserError("key 'model.first_stage' is empty; name the stage-1 run (or checkpoint) whose codes "
                            "this prior models")
        p = Path(path)
        if not (p.exists() or str(p).endswith((".yaml", ".yml"))):
            raise UserError(f"key 'model.first_stage': {p}: no such run or checkpoint folder")
        with torch.random.fork_rng(devices=[]):  # loading reseeds torch; the prior's streams must not move
            first = load(p, self.env, frozen=False)
        require(first.task, Codes, f"key 'model.first_stage' ({p})")
        k, h, w = first.task.code_shape()
        m = self.cfg
        if (k, h, w) != (m.vocab_size, *self.grid):
            raise UserError(f"key 'model.first_stage': {p} makes {h}x{w} grids of {k} codes, this prior models "
                            f"{self.grid[0]}x{self.grid[1]} grids of {m.vocab_size} (model.vocab_size, model.grid)")
        first.module.requires_grad_(False)
        self.first = first
        return first

    def check_codes(self, path: str | None = None) -> None:
        """The code .beton against the prior: its grid (the stored field) and vocabulary (the sidecar
        JSON tools/encode_codes.py writes beside it)."""
        from ...data.loader import import_ffcv

        import_ffcv()
        from ffcv.reader import Reader

        p = Path(path or self.recipe.data.path)
        if not p.is_file():
            return
        try:
            r = Reader(str(p))
        except Exception as e:  # FFCV asserts on a foreign file
            raise UserError(f"{p}: not a readable .beton file ({type(e).__name__}: {e})") from None
        if "codes" not in r.field_names:
            raise UserError(f"key 'data.path': {p} holds no code grids (fields {', '.join(r.field_names)}); write "
                            f"them with tools/encode_codes.py from the first stage")
        shape = tuple(r.handlers["codes"].shape)
        if shape != self.grid:
            raise UserError(f"key 'data.path': {p} holds {'x'.join(map(str, shape))} code grids, model.grid is "
                            f"{self.grid[0]}x{self.grid[1]}")
        side = p.with_name(p.name + ".json")
        if side.is_file():
            meta = json.loads(side.read_text())
            if int(meta.get("codes", -1)) != self.cfg.vocab_size:
                raise UserError(f"key 'data.path': {p} was encoded with {meta.get('codes')} codes ({side}), "
                                f"model.vocab_size is {self.cfg.vocab_size}")
        if self.recipe.data.flip and "codes_flipped" not in r.field_names:
            raise UserError(f"key 'data.flip': {p} has no mirrored twins; encode with tools/encode_codes.py --flip "
                            f"or set data.flip=false")

    # -- the trainer's interface --------------------------------------------------------------
    def modules(self):
        return {"prior": self.prior}

    def frozen_modules(self):
        self.check_codes()
        if self.first is None:
            self.load_first_stage()
        return {"first_stage": self.first.module}

    def param_groups(self, name, module):
        """taming's Net2NetTransformer groups: weight decay on linear weights only (not on biases,
        LayerNorms, embeddings or the position embedding)."""
        if self.cfg.arch != "gpt":
            return None
        decay = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Linear)}
        params = [p for p in module.parameters() if p.requires_grad]
        return [{"params": [p for p in params if id(p) in decay]},
                {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]

    def prepare_batch(self, batch, ctx):
        codes = batch["codes"].long()
        index = batch["index"]
        if ctx.phase == "train" and "codes_flipped" in batch:  # the mirrored twin for half the rows
            mirror = torch.from_numpy(_row_uniform(ctx.seed, 0xF11B, ctx.step, index) < 0.5)
            codes = torch.where(mirror[:, None, None], batch["codes_flipped"].long(), codes)
        label = None
        if self.cfg.n_classes:
            label = batch["label"].long().reshape(-1)
            if ctx.phase == "train" and self.cfg.label_dropout > 0:
                drop = torch.from_numpy(_row_uniform(ctx.seed, 0x1ABE1, ctx.step, index) < self.cfg.label_dropout)
                label = torch.where(drop, torch.full_like(label, self.cfg.n_classes), label)
            label = label.to(ctx.device)
        return {"codes": codes.to(ctx.device, non_blocking=True), "label": label}

    def logits(self, module, x) -> torch.Tensor:
        """(B, h*w, vocab): the logits of every code given the ones before it."""
        codes, b = x["codes"], x["codes"].shape[0]
        if self.cfg.arch == "pixelcnn":
            out = module(codes, x["label"])
            return out.permute(0, 2, 3, 1).reshape(b, self.tokens, -1)
        flat = codes.reshape(b, -1)
        cond = x["label"] if self.cfg.n_classes else torch.full((b,), self.cfg.sos_token, device=codes.device)
        return module(torch.cat([cond.view(b, 1).to(flat), flat[:, :-1]], dim=1))

    @contextmanager
    def _dropout_rng(self, ctx):
        """Dropout masks from a generator seeded by (seed, step, the micro-batch's first global row):
        a resumed run draws the ones it would have drawn, and 1 rank with 2 micro-batches the ones of
        2 ranks."""
        if not self._dropout:
            yield
            return
        devices = [ctx.device] if torch.device(ctx.device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(draw_base(ctx.seed, 0xD0, ctx.step, int(ctx.rows[0])))
            yield

    def loss(self, name, x, ctx):
        with self._dropout_rng(ctx):
            logits = self.logits(ctx.model("prior"), x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x["codes"].reshape(-1))
        return loss, {"bits_per_token": loss.detach() / LN2}

    def token_nll(self, module, x) -> torch.Tensor:
        """(B,) negative log-likelihood of each grid in nats (the sum over its codes)."""
        logits = self.logits(module, x).float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x["codes"].reshape(-1), reduction="none")
        return nll.view(logits.shape[0], -1).sum(1)

    @torch.no_grad()
    def evaluate(self, x, ctx):
        nll = self.token_nll(ctx.module("prior"), x).double()
        return {"bits_per_token": nll / (self.tokens * LN2), "bits_per_image": nll / LN2}

    # -- sampling ----------------------------------------------------------------------------------
    def sample_labels(self, n: int):
        return torch.arange(n) % self.cfg.n_classes if self.cfg.n_classes else None

    @torch.no_grad()
    def sample_codes(self, module, n: int, generator: torch.Generator, sampling: SamplingConfig | None = None,
                     grid: tuple[int, int] | None = None, labels=None, cached: bool = True,
                     limit: int = 0) -> torch.Tensor:
        """(n, H, W) codes; a grid larger than the training grid is drawn with the sliding window;
        `limit` > 0 draws only the first `limit` codes (timing)."""
        s = check_sampling(sampling or self.sampling, self.cfg.vocab_size, self.cfg.n_classes > 0)
        grid = tuple(grid or self.grid)
        labels = self.sample_labels(n) if labels is None else labels
        if self.cfg.arch == "pixelcnn":
            if grid != self.grid:
                raise UserError(f"grid {grid[0]}x{grid[1]}: the PixelCNN samples its training grid "
                                f"{self.grid[0]}x{self.grid[1]} only")
            return sample_pixelcnn(module, n, grid, generator, s, labels, limit)
        if grid != self.grid:
            if not cached:
                from .sampling import sample_window_reference

                return sample_window_reference(module, n, grid, self.grid, generator, s, labels, self.cfg.sos_token,
                                               limit)
            return sample_window(module, n, grid, self.grid, generator, s, labels, self.cfg.sos_token, limit)
        return sample_gpt(module, n, grid, generator, s, labels, self.cfg.sos_token, cached, limit)

    @torch.no_grad()
    def decode(self, idx: torch.Tensor, first=None) -> torch.Tensor:
        """Codes -> images in [0, 1] through the frozen stage-1 decoder."""
        first = first or self.first
        if first is None:
            raise UserError("no first stage loaded to decode the codes (model.first_stage)")
        return (first.task.decode_indices(first.module, idx).float() + 1) / 2

    @torch.no_grad()
    def sample(self, n, temperature, generator, ctx):
        s = SamplingConfig(temperature, self.sampling.top_k, self.sampling.top_p, self.sampling.guidance)
        codes = self.sample_codes(ctx.module("prior"), n, generator, s, self.sample_grid_size)
        return self.decode(codes)

    # -- tools --------------------------------------------------------------------------------
    def example_forward(self, name, module, batch, device):
        h, w = self.grid
        x = {"codes": torch.zeros(batch, h, w, dtype=torch.long, device=device),
             "label": torch.zeros(batch, dtype=torch.long, device=device) if self.cfg.n_classes else None}
        self.logits(module, x)

    def summary(self):
        m, (h, w) = self.cfg, self.grid
        out = {"input": f"{h} x {w} grids of codes 0..{m.vocab_size - 1}", "arch": m.arch, "code_grid": f"{h} x {w}", "codes": m.vocab_size, "tokens_per_image": h * w,
               "uniform_bits_per_token": round(math.log2(m.vocab_size), 3),
               "conditioning": f"{m.n_classes} classes" if m.n_classes else "none (start token)",
               "first_stage": m.first_stage or "(none)"}
        if m.arch == "gpt":
            g = m.gpt
            out["closed_form_parameters"] = gpt_parameters(m.vocab_size, g.block_size, g.n_layer, g.n_embd, m.n_classes)
        return out


__all__ = ["GPTConfig", "ModelConfig", "PixelCNNConfig", "RANGES", "SamplingDefaults", "Task"]
