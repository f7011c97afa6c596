"""NVAE as a task of the trainer: the reference's objective, regularisers and schedules.

loss (nats per image, what Adamax minimises, as the reference does)
    = mean_b[ recon_b + kl_coeff * sum_i w_i KL_i,b ] + lambda * (sum_convs sigma_max + sum_BN max|gamma|)
    kl_coeff  linear from kl_const_coeff to 1 over kl_anneal_portion of train.steps, after a constant
              kl_const_portion; w_i the KL balancing weights while kl_coeff < 1 (else 1)
    lambda    weight_decay_norm, or annealed geometrically from weight_decay_norm_init with kl_coeff
Logged besides: bpd (the true negative ELBO, kl_coeff 1, no balancing, in bits/dim =
nats / (C H W ln 2), C H W of the likelihood's pixels: 28 x 28 for cropped MNIST).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ... import distributed as dist
from ...config import AT_LEAST_0, AT_LEAST_1, POSITIVE, UNIT
from ...errors import UserError
from ...task import StepContext
from ...task import Task as BaseTask
from .model import AutoEncoder, kl_balancer_alpha


@dataclass
class ModelConfig:
    family: str = "nvae"
    num_channels_enc: int = 32
    num_channels_dec: int = 32
    num_preprocess_blocks: int = 2
    num_preprocess_cells: int = 3
    num_postprocess_blocks: int = 2
    num_postprocess_cells: int = 3
    num_latent_scales: int = 2
    num_groups_per_scale: int = 10
    ada_groups: bool = True  # halve the groups per coarser scale, down to min_groups_per_scale
    min_groups_per_scale: int = 1
    num_latent_per_group: int = 20
    num_cell_per_cond_enc: int = 2
    num_cell_per_cond_dec: int = 2
    num_nf: int = 0  # IAF cell pairs per latent group (0: no flows)
    use_se: bool = True
    res_dist: bool = True  # residual Normal posterior
    likelihood: str = "dmol"  # dmol (discretized logistic mixture) | bernoulli (binarised data)
    num_mixture_dec: int = 10
    crop_output: int = 0  # pixels left out of the likelihood on each side (MNIST padded to 32: 2)
    kl_anneal_portion: float = 0.3
    kl_const_portion: float = 0.0001
    kl_const_coeff: float = 0.0001
    kl_balance: bool = True
    weight_decay_norm: float = 0.0  # lambda of the spectral and BN regularisers
    weight_decay_norm_init: float = 10.0
    weight_decay_norm_anneal: bool = False
    channels_last: bool = True  # activations in NHWC memory order (faster convolutions)
    # how a sampling temperature t < 1 acts on the mixture's logistic scale: scale (x t, sharper),
    # reference (/ t, as NVlabs/NVAE's DiscMixLogistic.sample), none (t only for the latents)
    output_temperature: str = "scale"


RANGES = {
    **{k: AT_LEAST_1 for k in ("num_channels_enc", "num_channels_dec", "num_latent_scales", "num_groups_per_scale",
                               "min_groups_per_scale", "num_latent_per_group", "num_cell_per_cond_enc",
                               "num_cell_per_cond_dec", "num_mixture_dec")},
    **{k: AT_LEAST_0 for k in ("num_preprocess_blocks", "num_preprocess_cells", "num_postprocess_blocks",
                               "num_postprocess_cells", "num_nf", "crop_output", "weight_decay_norm")},
    "kl_anneal_portion": UNIT, "kl_const_portion": UNIT, "kl_const_coeff": UNIT,
    "weight_decay_norm_init": POSITIVE,
}


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    return nats / (dims * math.log(2.0))


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))


class Task(BaseTask):
    zero_stages = (0, 1, 2)
    zero_stages_why = "its spectral regulariser reads every convolution's whole weight, which ZeRO-3 partitions"

    def __init__(self, recipe, env):
        super().__init__(recipe, env)
        m, d = recipe.model, recipe.data
        if m.likelihood not in ("dmol", "bernoulli"):
            raise UserError(f"key 'model.likelihood' is {m.likelihood!r}; expected dmol or bernoulli")
        if m.output_temperature not in ("scale", "reference", "none"):
            raise UserError(f"key 'model.output_temperature' is {m.output_temperature!r}; expected scale, "
                            f"reference or none")
        if m.likelihood == "dmol" and d.channels != 3:
            raise UserError("key 'model.likelihood': dmol models RGB images; set data.channels=3 "
                            "or model.likelihood=bernoulli")
        self.m = m
        self.model = AutoEncoder(m, d.channels, d.resolution, d.num_bits, recipe.engine.activation_checkpointing)
        side = d.resolution - 2 * m.crop_output
        self.dims = d.channels * side * side
        self.alpha = kl_balancer_alpha(self.model.groups)
        self.total_steps = recipe.train.steps

    def modules(self):
        return {"nvae": self.model}

    # -- schedules ------------------------------------------------------------------------------
    def kl_coeff(self, step: int) -> float:
        m, n = self.m, self.total_steps
        return max(min((step - m.kl_const_portion * n) / max(m.kl_anneal_portion * n, 1e-12), 1.0), m.kl_const_coeff)

    def wdn_coeff(self, kl_coeff: float) -> float:
        m = self.m
        if m.weight_decay_norm_anneal:
            return math.exp((1 - kl_coeff) * math.log(m.weight_decay_norm_init) + kl_coeff * math.log(m.weight_decay_norm))
        return m.weight_decay_norm

    # -- pieces ---------------------------------------------------------------------------------
    def _noise(self, ctx: StepContext, batch: int) -> list[torch.Tensor]:
        return [ctx.randn(*shape) for shape in self.model.latent_shapes]

    def _input(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.m.likelihood != "bernoulli":
            return x
        u = normal_cdf(ctx.randn(*x.shape[1:]).float())  # dynamic binarisation
        return torch.where(u < (x.float() + 1) / 2, 1.0, -1.0).to(x.dtype)

    def _recon(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) in nats per image (B,)."""
        lp = self.model.output_dist(params).log_prob(x)
        c = self.m.crop_output
        if c:
            lp = lp[..., c:-c, c:-c]
        return -lp.flatten(1).sum(1)

    def _balanced_kl(self, kl_all: torch.Tensor, coeff: float) -> torch.Tensor:
        """The reference's KL balancing (kl_all: (B, groups)); the per-group |KL| means cover the
        global batch (all-reduced), so the weights do not depend on the world size."""
        if not (self.m.kl_balance and coeff < 1.0):
            return coeff * kl_all.sum(1)
        with torch.no_grad():
            k = kl_all.detach().double()
            stats = torch.cat([k.abs().sum(0), k.new_full((1,), float(k.shape[0]))])
            stats = dist.all_reduce_sum(stats)  # on the device (nccl on CUDA, gloo on the CPU)
            mean_abs = (stats[:-1] / stats[-1]).float() + 0.01
            w = mean_abs / self.alpha.to(kl_all.device) * mean_abs.sum()
            w = w / w.mean()
        return coeff * (kl_all * w).sum(1)

    def _terms(self, x: torch.Tensor, ctx: StepContext, net):
        xb = self._input(x, ctx)
        params, groups = net(xb, self._noise(ctx, x.shape[0]))
        recon = self._recon(params, xb)
        kl_all = torch.stack([kl.flatten(1).sum(1) for _, _, kl in groups], dim=1)  # (B, groups)
        log_q = sum(lq.flatten(1).sum(1) for lq, _, _ in groups)
        log_p = sum(lp.flatten(1).sum(1) for _, lp, _ in groups)
        return recon, kl_all, log_q, log_p

    # -- the interface ----------------------------------------------------------------------------
    def loss(self, name, x, ctx):
        recon, kl_all, _, _ = self._terms(x, ctx, ctx.model("nvae"))
        coeff = self.kl_coeff(ctx.step)
        nelbo_obj = (recon + self._balanced_kl(kl_all, coeff)).mean()
        lam = self.wdn_coeff(coeff)
        metrics = {"bpd": bits_per_dim(recon + kl_all.sum(1), self.dims).mean(),
                   "recon_bpd": bits_per_dim(recon, self.dims).mean(),
                   "kl_bpd": bits_per_dim(kl_all.sum(1), self.dims).mean()}
        loss = nelbo_obj
        if lam > 0:
            module = ctx.module("nvae")
            norm_loss = module.spectral_loss(advance=ctx.micro == 0)
            bn_loss = module.batchnorm_loss()
            loss = loss + lam * (norm_loss + bn_loss)
            metrics.update(norm_loss=norm_loss.detach(), bn_loss=bn_loss.detach())
        metrics.update(kl_coeff=torch.tensor(coeff, device=ctx.device), wdn_coeff=torch.tensor(lam, device=ctx.device))
        return loss, metrics

    def evaluate(self, x, ctx):
        recon, kl_all, _, _ = self._terms(x, ctx, ctx.model("nvae").module)
        return {"bpd": bits_per_dim(recon + kl_all.sum(1), self.dims), "recon_bpd": bits_per_dim(recon, self.dims),
                "kl_bpd": bits_per_dim(kl_all.sum(1), self.dims)}

    def example_forward(self, name, module, batch, device):
        d = self.recipe.data
        x = torch.zeros(batch, d.channels, d.resolution, d.resolution, device=device)
        eps = [torch.zeros(batch, *s, device=device) for s in module.latent_shapes]
        params, groups = module(x, eps)
        return params

    def summary(self):
        net = self.model
        return {"latent groups per scale (encoder order, finest first)": net.groups,
                "latent groups": sum(net.groups),
                "latent dims per image": net.latent_dims,
                "BatchNorm layers": len(net.bns),
                "convolutions under spectral regularisation": len(net.convs),
                "likelihood": f"{self.m.likelihood} over {self.dims} dims"}

    # -- after training (framework/eval) ---------------------------------------------------------
    def bn_layers(self, module) -> list:
        return list(module.bns)

    def prior_noise(self, module, n: int, generator: torch.Generator, device) -> list[torch.Tensor]:
        return [torch.randn((n, *shape), generator=generator, device=generator.device).to(device)
                for shape in module.latent_shapes]

    def prior_params(self, module, n, temperature, generator, device):
        """Output parameters of n prior samples (what BN recalibration runs)."""
        return module.sample(n, temperature, self.prior_noise(module, n, generator, device))

    def fast_sampler(self, module):
        """The folded inference copy of the sampling path (framework/models/nvae/fast.py)."""
        from .fast import fold

        return fold(module)

    def images(self, module, params, temperature, generator):
        """Output parameters -> images in [0, 1]: the Bernoulli mean, or a draw from the mixture."""
        out = module.output_dist(params)
        x = out.mean() if self.m.likelihood == "bernoulli" else out.sample(temperature, generator,
                                                                            self.m.output_temperature)
        return (x + 1) / 2

    def eval_input(self, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """The pixels the likelihood scores: binarised once per image (its own generator) for
        Bernoulli, unchanged for the mixture."""
        if self.m.likelihood != "bernoulli":
            return x
        u = torch.stack([torch.rand(x.shape[1:], generator=g, device=g.device).to(x.device) for g in generators])
        return torch.where(u < (x.float() + 1) / 2, 1.0, -1.0).to(x.dtype)

    def log_weights(self, module, x: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
        """log p(x | z) + log p(z) - log q(z | x) per row of x (nats), z drawn with `eps`."""
        params, groups = module(x, eps)
        log_q = sum(lq.flatten(1).sum(1) for lq, _, _ in groups)
        log_p = sum(lp.flatten(1).sum(1) for _, lp, _ in groups)
        return -self._recon(params, x) + log_p - log_q

    def sample(self, n, temperature, generator, ctx):
        net = ctx.module("nvae")
        params = self.prior_params(net, n, temperature, generator, ctx.device)
        return self.images(net, params, temperature, generator)
