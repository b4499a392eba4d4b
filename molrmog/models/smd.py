"""Soft Mixture Denoising (SMD) score models.

Li, van Breugel and van der Schaar, "Soft Mixture Denoising: Beyond the Expressive Bottleneck of
Diffusion Models", ICLR 2024 (arXiv 2309.14068), section 4; official code vanderschaarlab/smd
(`src/smd/nn.py` class HyperNet and UNet, `src/smd/models.py` GaussianDiffusion.p_losses and
model_predictions). The claim: a Gaussian reverse step N(mu_theta(x_t), sigma_t^2 I) cannot be the
true reverse step of mixture data, which is itself a mixture; SMD makes the denoiser's parameters
depend on a continuous latent z_t, so the reverse step becomes a continuous ("soft") mixture of
Gaussians:

    eta ~ N(0, I) of x_t's shape,   z_t = g(eta, x_t, t)          (the identifier network)
    theta(z_t, t): per adapted layer j, W_j = p_j p_j^T + softplus(s_j) I with p_j = P_j z_t
                   (a rank-one plus scaled identity matrix; the hypernetwork)
    h <- h + out( W_J ... W_1 in(h) )                              (a residual adapter, applied after
                                                                    the first and before the last layer)

Training is the usual epsilon loss with one eta per example per step (p_losses); sampling draws a
fresh eta at every step (model_predictions). eta comes from the global RNG: `molrmog.training.train.fit`
seeds a forked copy of it (`global_seed`) and `molrmog.core.samplers.generate` seeds one from its
generator, so results are reproducible without touching the caller's RNG state.

Note what the loss implies: E ||eps - eps_theta(x_t, z)||^2 is minimised by eps_theta(x_t, z) =
E[eps | x_t] for every z, so at the optimum the latent carries nothing; any gain over a plain model
comes from optimisation and capacity, not from the objective. `molrmog experiment few-step` measures it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molrmog.core.artefacts import register_to_config
from molrmog.core.errors import MolrmogError
from molrmog.models.experts import ScoreModel, precondition_eps

__all__ = ["HyperNet", "SMDMLPScore", "SMDUNetScore"]


class HyperNet(nn.Module):
    """The SMD hypernetwork of one adapted layer stack: W_j(z) = p_j p_j^T + softplus(s_j) I, p_j = P_j z
    (j = 1..layers), applied to a hidden h (..., hidden) with a latent z (..., latent) as
    h + out(W_J ... W_1 in(h)). W_j y = p_j (p_j . y) + softplus(s_j) y: no latent x latent matrix is formed."""

    def __init__(self, layers: int, hidden: int, latent: int):
        super().__init__()
        if layers < 1:
            raise MolrmogError(f"the SMD hypernetwork needs >= 1 layer, got {layers}")
        self.param_projs = nn.ModuleList([nn.Linear(latent, latent) for _ in range(layers)])
        self.scales = nn.Parameter(torch.randn(layers))
        self.in_proj = nn.Linear(hidden, latent)
        self.out_proj = nn.Linear(latent, hidden)

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        y = self.in_proj(h)
        for P, s in zip(self.param_projs, F.softplus(self.scales), strict=True):
            p = P(z)
            y = p * (p * y).sum(-1, keepdim=True) + s * y
        return h + self.out_proj(y)


def _fourier(c_noise: Tensor, freqs: Tensor) -> Tensor:
    ang = 2 * math.pi * c_noise[:, None] * freqs
    return torch.cat([torch.sin(ang), torch.cos(ang)], 1)


class SMDMLPScore(ScoreModel):
    """An SMD epsilon-MLP for vectors (D,): the identifier MLP g([x_in, eta, emb]) -> z (latent); the eps-MLP
    with a hypernetwork adapter after its first and before its last layer. Input scaling, time feature and
    the EDM-style preconditioning as `MLPScore(precondition=True)`; score = -eps / gamma."""

    @register_to_config
    def __init__(self, D: int, hidden: int = 256, depth: int = 3, emb: int = 32, latent: int = 16,
                 hypernet_layers: int = 2, identifier_hidden: int = 128, schedule="vp", data_std: float = 1.0,
                 seed: int = 0):
        super().__init__()
        self._set_schedule(schedule)
        if min(int(D), int(hidden), int(depth), int(latent), int(identifier_hidden)) < 1 or depth < 2:
            raise MolrmogError(f"SMD MLP needs D, hidden, latent >= 1 and depth >= 2, got {D}, {hidden}, {latent}, "
                               f"{depth}")
        self.D, self.data_std = int(D), float(data_std)
        self.register_buffer("freqs", torch.randn(emb // 2, generator=torch.Generator().manual_seed(seed)))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            e = 2 * (emb // 2)
            self.identifier = nn.Sequential(nn.Linear(2 * D + e, identifier_hidden), nn.SiLU(),
                                            nn.Linear(identifier_hidden, identifier_hidden), nn.SiLU(),
                                            nn.Linear(identifier_hidden, latent))
            self.first = nn.Linear(D + e, hidden)
            self.middle = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth - 1)])
            self.last = nn.Linear(hidden, D)
            self.adapt_in = HyperNet(hypernet_layers, hidden, latent)
            self.adapt_out = HyperNet(hypernet_layers, hidden, latent)

    def eps(self, x: Tensor, t, eta: Tensor | None = None) -> Tensor:
        s, g = self.st(x, t)
        s, g = s.expand(x.shape[0]), g.expand(x.shape[0])
        emb = _fourier(torch.log(g / s) / 4, self.freqs)
        x_in = x / torch.sqrt((s * self.data_std) ** 2 + g**2)[:, None]
        eta = torch.randn_like(x_in) if eta is None else eta  # one latent draw per example and call
        z = self.identifier(torch.cat([x_in, eta, emb], 1))
        h = self.adapt_in(F.silu(self.first(torch.cat([x_in, emb], 1))), z)
        for i, layer in enumerate(self.middle):
            h = F.silu(layer(h))
            if i == len(self.middle) - 1:
                h = self.adapt_out(h, z)
        return precondition_eps(x_in, self.last(h), s, g, self.data_std)

    def score(self, x: Tensor, t) -> Tensor:
        _, g = self.st(x, t)
        g = g.expand(x.shape[0])
        return -self.eps(x, t) / g[:, None]


class SMDUNetScore(ScoreModel):
    """An SMD latent U-Net: diffusers' `UNet2DModel` with the EDM-style preconditioning of `UNetScore`, an
    identifier `UNet2DModel` on [x_in, eta] (half the width) giving a latent field z (latent, h, w), and
    hypernetwork adapters on every pixel after conv_in and before conv_out (forward hooks). Flat (B, c h w)
    inputs and outputs, like `UNetScore`."""

    @register_to_config
    def __init__(self, latent=(2, 4, 4), width: int = 32, latent_dim: int = 8, hypernet_layers: int = 2,
                 schedule="vp", seed: int = 0):
        super().__init__()
        from diffusers import UNet2DModel

        self._set_schedule(schedule)
        self.latent = tuple(int(v) for v in latent)
        c, h, w = self.latent
        if width < 4 or latent_dim < 1:
            raise MolrmogError(f"SMD U-Net needs width >= 4 and latent_dim >= 1, got {width}, {latent_dim}")
        self.pad = (-h) % 2
        size = h + self.pad

        def unet(cin, cout, wd):
            return UNet2DModel(sample_size=size, in_channels=cin, out_channels=cout, layers_per_block=1,
                               block_out_channels=(wd, 2 * wd), down_block_types=("DownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=min(8, wd))

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.unet = unet(c, c, width)
            self.identifier = unet(2 * c, latent_dim, max(4, width // 2))
            self.adapt_in = HyperNet(hypernet_layers, width, latent_dim)
            self.adapt_out = HyperNet(hypernet_layers, width, latent_dim)
        self._z: Tensor | None = None
        # bound methods (not lambdas): a deep copy (the EMA model) gets hooks that use its own latent
        self.unet.conv_in.register_forward_hook(self._after_first)
        self.unet.conv_out.register_forward_pre_hook(self._before_last)

    def _after_first(self, module, args, out: Tensor) -> Tensor:
        return self.adapt_in(out.permute(0, 2, 3, 1), self._z).permute(0, 3, 1, 2)  # per pixel

    def _before_last(self, module, args) -> tuple[Tensor]:
        return (self.adapt_out(args[0].permute(0, 2, 3, 1), self._z).permute(0, 3, 1, 2),)

    def score(self, u: Tensor, t) -> Tensor:
        s, g = self.st(u, t)
        B = u.shape[0]
        s, g = s.expand(B), g.expand(B)
        c, h, w = self.latent
        norm = torch.sqrt(s**2 + g**2)[:, None]
        x = F.pad((u / norm).view(B, c, h, w), (0, self.pad, 0, self.pad))
        timestep = self.schedule.timestep(torch.as_tensor(t, dtype=torch.float64), u, B)
        eta = torch.randn_like(x)  # a fresh latent draw per example and call
        self._z = self.identifier(torch.cat([x, eta], 1), timestep).sample.permute(0, 2, 3, 1)
        try:
            out = self.unet(x, timestep).sample[:, :, :h, :w].reshape(B, -1)
        finally:
            self._z = None
        eps = (g[:, None] / norm) * x[:, :, :h, :w].reshape(B, -1) + (s[:, None] / norm) * out
        return -eps / g[:, None]
