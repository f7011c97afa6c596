"""NVAE's autoencoder (NVlabs/NVAE `model.py`, re-written for the framework).

    x (B, C, R, R) in [-1, 1]
    stem -> pre-process cells (each block ends in a down cell) -> encoder tower: per latent
    scale (finest first) `groups` x (cells, combiner), a down cell between scales
    -> enc0 -> top group q(z_1 | x), prior N(0, 1)
    decoder tower (coarsest first): per group the prior p(z_i | z_<i) from the decoder state,
    the residual posterior q = N(mu_p + dmu, exp(log sig_p + dlog sig)) from the encoder feature
    combined with the decoder state, optional IAF cells, then combiner(state, z); up cells
    between scales -> post-process cells (each block starts with an up cell) -> output
    parameters (Bernoulli logits or a discretized logistic mixture).

`latent_shapes` lists each group's (C, H, W) in decoder order: the noise a forward pass takes.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from ...activation_checkpoint import maybe_checkpoint
from .distributions import Bernoulli, DiscMixLogistic, Normal
from .flows import PairedCellAR
from .ops import CHANNEL_MULT, Cell, Conv2D, DecCombiner, EncCombiner, SyncBatchNorm


def groups_per_scale(num_scales: int, num_groups: int, adaptive: bool, minimum: int = 1) -> list[int]:
    """Groups of each latent scale, finest first; `adaptive` halves them per coarser scale."""
    out, n = [], num_groups
    for _ in range(num_scales):
        out.append(n)
        if adaptive:
            n = max(minimum, n // 2)
    return out


def kl_balancer_alpha(gps: list[int]) -> torch.Tensor:
    """The reference's 'square' scheme in decoder order (coarsest first): (2^i)^2 / groups_i,
    normalised so the smallest is 1."""
    s = len(gps)
    a = torch.cat([torch.full((gps[s - i - 1],), (2.0**i) ** 2 / gps[s - i - 1]) for i in range(s)])
    return a / a.min()


class AutoEncoder(nn.Module):
    def __init__(self, m, channels: int, resolution: int, num_bits: int, checkpointing: str = "none"):
        super().__init__()
        self.cfg = m
        self.channels, self.resolution, self.num_bits = channels, resolution, num_bits
        self.likelihood = m.likelihood
        self.num_mix = m.num_mixture_dec
        self.res_dist = m.res_dist
        self.num_flows = m.num_nf
        self.num_latent = m.num_latent_per_group
        self.num_scales = m.num_latent_scales
        self.channels_last = m.channels_last
        self.groups = groups_per_scale(m.num_latent_scales, m.num_groups_per_scale, m.ada_groups,
                                       m.min_groups_per_scale)
        ck = lambda mod: maybe_checkpoint(mod, checkpointing)  # noqa: E731
        ce, cd, se = m.num_channels_enc, m.num_channels_dec, m.use_se
        down = m.num_preprocess_blocks + m.num_latent_scales - 1
        top = resolution // 2**down
        if top < 1 or resolution % 2**down:
            raise ValueError(f"resolution {resolution} cannot be halved {down} times")
        self.prior_ftr0 = nn.Parameter(torch.rand(CHANNEL_MULT**down * cd, top, top))

        self.stem = Conv2D(channels, ce, 3, padding=1, bias=True)
        mult = 1
        pre = []
        for _ in range(m.num_preprocess_blocks):
            for c in range(m.num_preprocess_cells):
                if c == m.num_preprocess_cells - 1:
                    pre.append(ck(Cell(ce * mult, CHANNEL_MULT * ce * mult, "down_pre", se)))
                    mult *= CHANNEL_MULT
                else:
                    pre.append(ck(Cell(ce * mult, ce * mult, "normal_pre", se)))
        self.pre_process = nn.ModuleList(pre)

        enc, self.enc_kinds = [], []
        for s in range(self.num_scales):
            for g in range(self.groups[s]):
                for _ in range(m.num_cell_per_cond_enc):
                    enc.append(ck(Cell(ce * mult, ce * mult, "normal_enc", se)))
                    self.enc_kinds.append("cell")
                if not (s == self.num_scales - 1 and g == self.groups[s] - 1):
                    enc.append(ck(EncCombiner(ce * mult, cd * mult)))
                    self.enc_kinds.append("combiner")
            if s < self.num_scales - 1:
                enc.append(ck(Cell(ce * mult, CHANNEL_MULT * ce * mult, "down_enc", se)))
                self.enc_kinds.append("cell")
                mult *= CHANNEL_MULT
        self.enc_tower = nn.ModuleList(enc)
        self.enc0 = nn.Sequential(nn.ELU(), Conv2D(ce * mult, ce * mult, 1, bias=True), nn.ELU())

        enc_s, dec_s, nf = [], [], []
        self.latent_shapes = []
        mult_s, size = mult, top
        for s in range(self.num_scales):
            for g in range(self.groups[self.num_scales - s - 1]):
                enc_s.append(Conv2D(ce * mult_s, 2 * self.num_latent, 3, padding=1, bias=True))
                nf += [ck(PairedCellAR(self.num_latent)) for _ in range(self.num_flows)]
                if not (s == 0 and g == 0):
                    dec_s.append(nn.Sequential(nn.ELU(), Conv2D(cd * mult_s, 2 * self.num_latent, 1, bias=True)))
                self.latent_shapes.append((self.num_latent, size, size))
            mult_s //= CHANNEL_MULT
            size *= 2
        self.enc_sampler, self.dec_sampler, self.nf_cells = nn.ModuleList(enc_s), nn.ModuleList(dec_s), nn.ModuleList(nf)

        dec, self.dec_kinds = [], []
        for s in range(self.num_scales):
            for g in range(self.groups[self.num_scales - s - 1]):
                if not (s == 0 and g == 0):
                    for _ in range(m.num_cell_per_cond_dec):
                        dec.append(ck(Cell(cd * mult, cd * mult, "normal_dec", se)))
                        self.dec_kinds.append("cell")
                dec.append(ck(DecCombiner(cd * mult, self.num_latent)))
                self.dec_kinds.append("combiner")
            if s < self.num_scales - 1:
                dec.append(ck(Cell(cd * mult, cd * mult // CHANNEL_MULT, "up_dec", se)))
                self.dec_kinds.append("cell")
                mult //= CHANNEL_MULT
        self.dec_tower = nn.ModuleList(dec)

        post = []
        for _ in range(m.num_postprocess_blocks):
            for c in range(m.num_postprocess_cells):
                if c == 0:
                    post.append(ck(Cell(cd * mult, cd * mult // CHANNEL_MULT, "up_post", se)))
                    mult //= CHANNEL_MULT
                else:
                    post.append(ck(Cell(cd * mult, cd * mult, "normal_post", se)))
        self.post_process = nn.ModuleList(post)
        c_out = channels if self.likelihood == "bernoulli" else 10 * self.num_mix
        self.image_conditional = nn.Sequential(nn.ELU(), Conv2D(cd * mult, c_out, 3, padding=1, bias=True))

        self.convs = [mod for mod in self.modules() if isinstance(mod, Conv2D)]
        for conv in self.convs:
            conv.keep_weight = checkpointing == "none"
        self.bns = [mod for mod in self.modules() if isinstance(mod, SyncBatchNorm)]

    # -- numbers a user compares -----------------------------------------------------------
    @property
    def latent_dims(self) -> int:
        return sum(c * h * w for c, h, w in self.latent_shapes)

    # -- the passes ----------------------------------------------------------------------------
    def output_dist(self, params: torch.Tensor):
        if self.likelihood == "bernoulli":
            return Bernoulli(params)
        return DiscMixLogistic(params, self.num_mix, self.num_bits)

    def _top(self, batch: int) -> torch.Tensor:
        return self._fmt(self.prior_ftr0.unsqueeze(0).expand(batch, -1, -1, -1))

    def _fmt(self, t: torch.Tensor) -> torch.Tensor:
        """channels-last activations: oneDNN's convolutions run a third faster on them (measured
        on the mnist architecture, 2 CPU cores); `model.channels_last: false` keeps NCHW."""
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def forward(self, x: torch.Tensor, eps: list[torch.Tensor]):
        """-> (output parameters, [(log q, log p, KL) per group, each (B, C, H, W) float])."""
        s = self._fmt(self.stem(x))  # (a 1-channel x is the same in both orders: convert after the stem)
        for cell in self.pre_process:
            s = cell(s)
        enc_comb, enc_s = [], []
        for cell, kind in zip(self.enc_tower, self.enc_kinds):
            if kind == "combiner":
                enc_comb.append(cell)
                enc_s.append(s)
            else:
                s = cell(s)
        enc_comb.reverse()
        enc_s.reverse()

        ftr = self.enc0(s)
        mu_q, log_sig_q = self.enc_sampler[0](ftr).float().chunk(2, dim=1)
        q = Normal(mu_q, log_sig_q)
        z = q.sample(self._fmt(eps[0].float()))
        log_q = q.log_p(z)
        for n in range(self.num_flows):
            z = self.nf_cells[n](z)
        p = Normal(torch.zeros_like(z), torch.zeros_like(z))
        groups = [(log_q, p.log_p(z), q, p)]

        z0, nf_offset = z, self.num_flows

        def posterior_group(i: int, s: torch.Tensor) -> torch.Tensor:
            nonlocal nf_offset
            if i == 0:
                return z0
            mu_p, log_sig_p = self.dec_sampler[i - 1](s).float().chunk(2, dim=1)
            ftr = enc_comb[i - 1](enc_s[i - 1], s)
            mu_q, log_sig_q = self.enc_sampler[i](ftr).float().chunk(2, dim=1)
            q = Normal(mu_p + mu_q, log_sig_p + log_sig_q) if self.res_dist else Normal(mu_q, log_sig_q)
            z = q.sample(self._fmt(eps[i].float()))
            log_q = q.log_p(z)
            for n in range(self.num_flows):
                z = self.nf_cells[nf_offset + n](z)
            nf_offset += self.num_flows
            p = Normal(mu_p, log_sig_p)
            groups.append((log_q, p.log_p(z), q, p))
            return z

        params = self._decode(x.shape[0], posterior_group)
        out = []
        for log_q, log_p, q, p in groups:
            kl = log_q - log_p if self.num_flows > 0 else q.kl(p)  # one-sample KL with flows
            out.append((log_q, log_p, kl))
        return params, out

    @torch.no_grad()
    def sample(self, n: int, temperature: float, eps: list[torch.Tensor]) -> torch.Tensor:
        """Output parameters of n samples from the prior, every group's sigma times `temperature`."""
        dev = self.prior_ftr0.device
        e0 = self._fmt(eps[0].to(dev).float())
        z0 = Normal(torch.zeros_like(e0), torch.zeros_like(e0), temperature).sample(e0)

        def prior_group(i: int, s: torch.Tensor) -> torch.Tensor:
            if i == 0:
                return z0
            mu, log_sig = self.dec_sampler[i - 1](s).float().chunk(2, dim=1)
            return Normal(mu, log_sig, temperature).sample(self._fmt(eps[i].to(dev).float()))

        return self._decode(n, prior_group)

    def _decode(self, batch: int, group_z) -> torch.Tensor:
        """The top-down pass shared by training and sampling: from the learned top feature through
        the decoder tower, taking group i's z from `group_z(i, state)` at its combiner, then the
        post-processing cells; -> output parameters."""
        s = self._top(batch)
        i = 0
        for cell, kind in zip(self.dec_tower, self.dec_kinds):
            if kind == "combiner":
                s = cell(s, group_z(i, s).to(s.dtype))
                i += 1
            else:
                s = cell(s)
        for cell in self.post_process:
            s = cell(s)
        return self.image_conditional(s)

    # -- regularisers -------------------------------------------------------------------------
    def spectral_loss(self, advance: bool = True, iters: int = 4, first_iters: int = 40) -> torch.Tensor:
        """Sum over every convolution of the largest singular value of its effective weight
        (C_out, C_in k k), by power iteration batched over convolutions of the same shape; the
        vectors live in each conv's buffers. `advance=False` reuses them without iterating."""
        by_shape = defaultdict(list)
        for conv in self.convs:
            by_shape[(conv.out_channels, conv.sr_v.numel())].append(conv)
        total = self.prior_ftr0.new_zeros((), dtype=torch.float32)
        for (rows, cols), convs in by_shape.items():
            # the weights of this step's forward when there was one (no second weight-norm pass)
            w = torch.stack([(c.last_weight if c.last_weight is not None else c.effective_weight()).reshape(rows, cols)
                             for c in convs]).float()  # (N, r, c)
            with torch.no_grad():
                u = torch.stack([c.sr_u for c in convs]).float()
                v = torch.stack([c.sr_v for c in convs]).float()
                fresh = not bool(torch.stack([c.sr_ready for c in convs]).all())
                n_iter = first_iters if fresh else iters
                if fresh:  # the same start on every rank
                    g = torch.Generator().manual_seed(rows * 100003 + cols)
                    u = F.normalize(torch.randn(len(convs), rows, generator=g), dim=1, eps=1e-3).to(w.device)
                    v = F.normalize(torch.randn(len(convs), cols, generator=g), dim=1, eps=1e-3).to(w.device)
                if advance or fresh:
                    for _ in range(n_iter):
                        v = F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), dim=1, eps=1e-3)
                        u = F.normalize(torch.bmm(w, v.unsqueeze(2)).squeeze(2), dim=1, eps=1e-3)
                    for k, c in enumerate(convs):
                        c.sr_u.copy_(u[k])
                        c.sr_v.copy_(v[k])
                        c.sr_ready.fill_(True)
            sigma = torch.bmm(u.unsqueeze(1), torch.bmm(w, v.unsqueeze(2)))
            total = total + sigma.sum()
        for c in self.convs:
            c.__dict__["last_weight"] = None
        return total

    def batchnorm_loss(self) -> torch.Tensor:
        """Sum over BatchNorm layers of max |gamma|."""
        return torch.stack([bn.weight.abs().max().float() for bn in self.bns if bn.affine]).sum()
