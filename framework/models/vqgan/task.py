"""VQGAN stage 1 (and VQ-VAE) as a task of the trainer: engines `ae` (the autoencoder) then
`disc` (the PatchGAN, only when loss.disc_weight > 0), LPIPS as a frozen module (only when
loss.perceptual_weight > 0).

One autoencoder forward per step: the `ae` loss stores each micro-batch's reconstruction
(detached) and the `disc` loss of the same step and micro-batch reads it (taming's Lightning loop
runs the autoencoder again for its discriminator step, after the autoencoder's update; here the
discriminator sees the reconstruction before that update). Before loss.disc_start the
discriminator is inactive and the autoencoder's loss has no GAN term: no discriminator work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...config import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, Range
from ...errors import UserError
from ...task import Last, Sum
from ...task import Task as BaseTask
from .loss import D_LOSSES, VQGANLoss
from .model import VQModel
from .modules import NLayerDiscriminator
from .quantize import perplexity


@dataclass
class QuantizerConfig:
    kind: str = "vq"  # vq | fsq
    n_embed: int = 1024  # codes (vq)
    beta: float = 0.25  # commitment weight
    legacy_beta: bool = False  # true: beta on the codebook term, as taming's VectorQuantizer2(legacy=True)
    codebook_dim: int = 0  # > 0: look codes up in a linear projection to this many dims (factorised codes)
    l2_normalize: bool = False  # cosine-distance codes
    ema: bool = False  # codebook by exponential moving averages (not trained)
    ema_decay: float = 0.99
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA counts
    restart_dead: int = 0  # > 0: restart codes unused for this many steps (needs ema)
    usage_window: int = 100  # steps over which codebook usage is counted
    levels: list[int] = field(default_factory=list)  # fsq: levels per dimension, e.g. [8, 8, 8, 5, 5, 5]


@dataclass
class LossConfig:
    rec_loss: str = "l1"  # l1 | l2
    perceptual_weight: float = 1.0  # LPIPS; 0: no LPIPS (and no VGG weights needed)
    codebook_weight: float = 1.0
    disc_weight: float = 0.8  # 0: no discriminator at all (VQ-VAE)
    disc_factor: float = 1.0
    disc_start: int = 0  # first step of the discriminator and the GAN term
    disc_loss: str = "hinge"  # hinge | vanilla
    adaptive_weight: bool = True  # taming's |dnll/dw| / |dg/dw| weight on the GAN term


@dataclass
class LPIPSConfig:
    vgg_weights: str = ""  # "": torchvision's vgg16-397923af.pth in the torch hub cache; "random": tests only
    heads: str = ""  # "": lpips/weights/v0.1/vgg.pth inside the lpips package


@dataclass
class ModelConfig:
    family: str = "vqgan"
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.0
    z_channels: int = 256
    embed_dim: int = 256
    disc_num_layers: int = 3
    disc_ndf: int = 64
    channels_last: bool = True  # activations in NHWC memory order (faster convolutions)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)


RANGES = {
    "ch": AT_LEAST_1, "ch_mult": AT_LEAST_1, "num_res_blocks": AT_LEAST_0, "attn_resolutions": AT_LEAST_1,
    "dropout": FRACTION, "z_channels": AT_LEAST_1, "embed_dim": AT_LEAST_1, "disc_num_layers": AT_LEAST_1,
    "disc_ndf": AT_LEAST_1,
    "quantizer.n_embed": Range(2), "quantizer.beta": AT_LEAST_0, "quantizer.codebook_dim": AT_LEAST_0,
    "quantizer.ema_decay": FRACTION, "quantizer.ema_eps": POSITIVE, "quantizer.restart_dead": AT_LEAST_0,
    "quantizer.usage_window": AT_LEAST_1, "quantizer.levels": Range(2),
    "loss.perceptual_weight": AT_LEAST_0, "loss.codebook_weight": AT_LEAST_0, "loss.disc_weight": AT_LEAST_0,
    "loss.disc_factor": AT_LEAST_0, "loss.disc_start": AT_LEAST_0,
}


def check_objective(m) -> None:
    """What the schema and RANGES cannot say about the quantizer and loss, as one-line UserErrors."""
    q = m.quantizer
    if q.kind not in ("vq", "fsq"):
        raise UserError(f"key 'model.quantizer.kind' is {q.kind!r}; expected vq or fsq")
    if q.kind == "fsq" and not q.levels:
        raise UserError("key 'model.quantizer.levels': fsq needs its levels, e.g. [8, 8, 8, 5, 5, 5]")
    if q.restart_dead and not q.ema and q.kind == "vq":
        raise UserError("key 'model.quantizer.restart_dead' needs model.quantizer.ema: true (a trained "
                        "codebook lives in the optimizer's master weights, which a restart cannot reach)")
    if m.loss.rec_loss not in ("l1", "l2"):
        raise UserError(f"key 'model.loss.rec_loss' is {m.loss.rec_loss!r}; expected l1 or l2")
    if m.loss.disc_loss not in D_LOSSES:
        raise UserError(f"key 'model.loss.disc_loss' is {m.loss.disc_loss!r}; expected hinge or vanilla")


def check_architecture(m, data) -> None:
    down = 2 ** (len(m.ch_mult) - 1)
    if data.resolution % down:
        raise UserError(f"key 'data.resolution' is {data.resolution}; the encoder (model.ch_mult has "
                        f"{len(m.ch_mult)} levels) halves it {len(m.ch_mult) - 1} times, so it must be a multiple "
                        f"of {down}")
    for c in [m.ch * k for k in m.ch_mult]:
        if c % 32:
            raise UserError(f"key 'model.ch': every width ch x ch_mult must be a multiple of 32 (GroupNorm(32)); "
                            f"{m.ch} x {list(m.ch_mult)} gives {c}")


class Task(BaseTask):
    main = "ae"
    ema_module = "ae"

    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        m, d = recipe.model, recipe.data
        check_objective(m)
        self.cfg = m
        self.ae = self.build_autoencoder(m, d, recipe.engine.activation_checkpointing == "blocks")
        self.gan = m.loss.disc_weight > 0
        self.disc = NLayerDiscriminator(d.channels, m.disc_ndf, m.disc_num_layers) if self.gan else None
        self.lpips = None  # built by frozen_modules (it reads the VGG16 and head files)
        self.objective = VQGANLoss(m.loss, None)
        self._fake: dict[int, torch.Tensor] = {}

    def build_autoencoder(self, m, d, checkpointing: bool):
        check_architecture(m, d)
        return VQModel(m, d.channels, d.resolution, checkpointing)

    # -- the trainer's interface ------------------------------------------------------------
    def modules(self):
        return {"ae": self.ae, **({"disc": self.disc} if self.gan else {})}

    def frozen_modules(self):
        if self.lpips is None and self.cfg.loss.perceptual_weight > 0:
            from ...losses import LPIPS

            self.lpips = self.objective.lpips = LPIPS(self.cfg.lpips.vgg_weights, self.cfg.lpips.heads)
        return {"lpips": self.lpips} if self.lpips is not None else {}

    def active(self, name, step):
        return name != "disc" or step >= self.cfg.loss.disc_start

    def _gan_on(self, step: int) -> bool:
        return self.gan and step >= self.cfg.loss.disc_start

    def loss(self, name, x, ctx):
        if name == "disc":
            fake = self._fake.pop(ctx.micro)
            d = ctx.model("disc")
            real_logits, fake_logits = d(self.ae._fmt(x.detach())), d(fake)
            loss = self.objective.discriminator(real_logits, fake_logits)
            return loss, {"logits_real": real_logits.mean(), "logits_fake": fake_logits.mean()}
        gan = self._gan_on(ctx.step)
        out = ctx.model("ae")(x, ctx, return_last_input=gan)
        rec = out["rec"]
        rec_in = rec.detach().requires_grad_(True) if gan else rec
        terms = self.objective.reconstruction(x, rec_in)
        nll = terms["nll"].mean()
        metrics = {"rec_loss": terms["rec_loss"].mean().detach(), "nll": nll.detach(),
                   "qloss": out["qloss"].detach(), **{k: Last(v) for k, v in out["metrics"].items()}}
        if "lpips" in terms:
            metrics["lpips"] = terms["lpips"].mean().detach()
        if not gan:
            loss, _ = self.objective.autoencoder(nll, out["qloss"], rec)
            return loss, metrics
        self._fake[ctx.micro] = rec.detach()
        with ctx.frozen("disc") as d:
            logits = d(rec_in)
        loss, extra = self.objective.autoencoder(nll, out["qloss"], rec, rec_in, logits, out["last_input"],
                                                 ctx.module("ae").decoder.conv_out)
        return loss, {**metrics, **extra}

    @torch.no_grad()
    def evaluate(self, x, ctx):
        ae = ctx.module("ae")
        out = ae(x)
        rec = out["rec"].clamp(-1, 1)
        terms = self.objective.reconstruction(x, rec)
        mse01 = (x.float() - rec.float()).pow(2).mean((1, 2, 3)) / 4  # l1, mse, psnr: pixels in [0, 1]
        res = {"l1": (x.float() - rec.float()).abs().mean((1, 2, 3)) / 2, "mse": mse01,
               "psnr": 10 * torch.log10(1.0 / mse01.clamp_min(1e-10))}
        if "lpips" in terms:
            res["lpips"] = terms["lpips"]
        idx = out["indices"][:ctx.valid]
        res["code_counts"] = Sum(torch.bincount(idx.reshape(-1), minlength=ae.n_codes).double())
        return res

    def finish_eval(self, sums, images):
        c = sums["code_counts"]
        return {"usage": float((c > 0).double().mean()), "perplexity": float(perplexity(c))}

    def visualize(self, x, ctx):
        """Inputs above their reconstructions: rows of `nrow` inputs, then the same `nrow` rebuilt
        (the trainer's grid is ceil(sqrt(n)) wide: 2 x 8 images make 4 rows of 4)."""
        b = x.shape[0]
        pairs = 8 if b >= 8 else (2 if b >= 2 else 1)
        nrow = math.ceil(math.sqrt(2 * pairs))
        x = x[:pairs]
        rec = ctx.module("ae")(x)["rec"].clamp(-1, 1)
        rows = []
        for i in range(0, pairs, nrow):
            rows += [x[i:i + nrow], rec[i:i + nrow]]
        return (torch.cat(rows).float() + 1) / 2

    # -- Codes: what encode_codes, eval_recon and a prior use ------------------------------------
    @torch.no_grad()
    def encode_indices(self, module, x):
        return module.encode(x)[2]

    @torch.no_grad()
    def decode_indices(self, module, idx):
        return module.decode_code(idx).clamp(-1, 1)

    def code_shape(self):
        return self.ae.n_codes, self.ae.grid, self.ae.grid

    def state_dict(self):
        return {}

    def example_forward(self, name, module, batch, device):
        r = self.recipe.data.resolution
        module(torch.zeros(batch, self.recipe.data.channels, r, r, device=device))

    def _lpips_count(self) -> int:
        if self.cfg.loss.perceptual_weight <= 0:
            return 0
        from ...losses import LPIPS

        with torch.device("meta"):
            return sum(p.numel() for p in LPIPS(load=False).parameters())

    def summary(self):
        m = self.cfg
        grid = self.ae.grid
        parts = {n: sum(p.numel() for p in getattr(self.ae, n).parameters())
                 for n in ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")}
        return {"ae_parts": ", ".join(f"{n} {c:,}" for n, c in parts.items()),
                "code_grid": f"{grid} x {grid}", "codes": self.ae.n_codes,
                "bits_per_image": round(grid * grid * math.log2(self.ae.n_codes), 1),
                "lpips_frozen": f"{self._lpips_count():,}",
                "quantizer": m.quantizer.kind}
