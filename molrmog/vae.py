"""Small convolutional VAEs: one per cluster (dedicated), one for all (unified), or one shared
backbone with a low-rank adapter per cluster (LoRA).

Images (B, C, H, W) in [0, 1] map to a latent (B, c, h, w) with H / h a power of two; the
latent code used by the experts is the encoder mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .io import Configurable

__all__ = ["ConvVAE", "LoRAVAE", "check_latent_shape", "vae_loss"]


def check_latent_shape(image_shape, latent) -> int:
    """Number of stride-2 stages from image (C, H, W) to latent (c, h, w); ValueError if it does not fit."""
    C, H, W = image_shape
    c, h, w = latent
    if min(c, h, w) < 1:
        raise ValueError(f"latent shape must be positive, got {tuple(latent)}")
    if H != W or h != w:
        raise ValueError(f"square images and latents only, got image {H}x{W} and latent {h}x{w}")
    ratio = H / h
    n_down = round(math.log2(ratio)) if ratio >= 1 else -1
    if H % h != 0 or n_down < 0 or 2**n_down != ratio:
        raise ValueError(f"latent {c}x{h}x{w} does not fit {H}x{W} images: H / h must be a power of two "
                         f"(e.g. {H // 2 if H % 2 == 0 else H}x... for this size)")
    return n_down


class ConvVAE(Configurable):
    """Encoder: conv, n_down x (stride-2 conv), conv -> (mean, logvar); decoder mirrors it."""

    def __init__(self, image_shape=(1, 8, 8), latent=(2, 4, 4), width: int = 32, beta: float = 1.0,
                 seed: int = 0):
        super().__init__()
        self.image_shape, self.latent = tuple(image_shape), tuple(latent)
        self.beta = float(beta)
        n_down = check_latent_shape(self.image_shape, self.latent)
        C, c = self.image_shape[0], self.latent[0]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            enc = [nn.Conv2d(C, width, 3, padding=1), nn.SiLU()]
            ch = width
            for _ in range(n_down):
                enc += [nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), nn.SiLU()]
                ch *= 2
            enc += [nn.Conv2d(ch, 2 * c, 3, padding=1)]
            self.encoder = nn.Sequential(*enc)
            dec = [nn.Conv2d(c, ch, 3, padding=1), nn.SiLU()]
            for _ in range(n_down):
                dec += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1), nn.SiLU()]
                ch //= 2
            dec += [nn.Conv2d(ch, C, 3, padding=1)]
            self.decoder = nn.Sequential(*dec)

    @property
    def latent_dim(self) -> int:
        return math.prod(self.latent)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar), each (B, c, h, w)."""
        h = self.encoder(x)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-12, 8)

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, c, h, w) or flat (B, d) -> image logits (B, C, H, W)."""
        return self.decoder(z.view(z.shape[0], *self.latent))

    def reconstruct(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.decode(self.encode(x)[0]))


def vae_loss(vae: ConvVAE, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """Negative ELBO per image: Bernoulli reconstruction + beta KL(q(z|x) || N(0, I))."""
    mean, logvar = vae.encode(x)
    eps = torch.randn(mean.shape, generator=gen, dtype=mean.dtype).to(mean.device)
    z = mean + torch.exp(0.5 * logvar) * eps
    rec = F.binary_cross_entropy_with_logits(vae.decode(z), x, reduction="sum") / x.shape[0]
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / x.shape[0]
    return rec + vae.beta * kl


class _LoRA(nn.Module):
    """W + B A (rank r) on a conv layer's flattened weight, one (A, B) pair per cluster."""

    def __init__(self, base: nn.Module, clusters: int, rank: int):
        super().__init__()
        self.base = base
        w = base.weight
        fan = w[0].numel() if not isinstance(base, nn.ConvTranspose2d) else w[:, 0].numel()
        out = w.shape[0] if not isinstance(base, nn.ConvTranspose2d) else w.shape[1]
        self.A = nn.Parameter(torch.randn(clusters, rank, fan) / math.sqrt(fan))
        self.B = nn.Parameter(torch.zeros(clusters, out, rank))  # zero: adapters start at the backbone
        self.cluster = 0

    def forward(self, x: Tensor) -> Tensor:
        b = self.base
        delta = self.B[self.cluster] @ self.A[self.cluster]
        if isinstance(b, nn.ConvTranspose2d):  # weight (in, out, k, k); delta (out, in k k)
            cin, cout, *k = b.weight.shape
            w = b.weight + delta.view(cout, cin, *k).transpose(0, 1)
            return F.conv_transpose2d(x, w, b.bias, b.stride, b.padding)
        w = b.weight + delta.view(b.weight.shape)
        return F.conv2d(x, w, b.bias, b.stride, b.padding)


class LoRAVAE(ConvVAE):
    """Shared VAE backbone plus a per-cluster low-rank adapter on every conv layer (option B)."""

    def __init__(self, image_shape=(1, 8, 8), latent=(2, 4, 4), width: int = 32, beta: float = 1.0,
                 seed: int = 0, clusters: int = 10, rank: int = 4):
        super().__init__(image_shape, latent, width, beta, seed)
        self.clusters, self.rank = int(clusters), int(rank)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            for seq in (self.encoder, self.decoder):
                for i, m in enumerate(seq):
                    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                        seq[i] = _LoRA(m, self.clusters, self.rank)

    def adapters(self):
        return [m for seq in (self.encoder, self.decoder) for m in seq if isinstance(m, _LoRA)]

    def set_cluster(self, k: int) -> LoRAVAE:
        if not 0 <= k < self.clusters:
            raise ValueError(f"cluster {k} outside 0..{self.clusters - 1}")
        for m in self.adapters():
            m.cluster = k
        return self

    def adapter_parameters(self):
        return [p for m in self.adapters() for p in (m.A, m.B)]

    def backbone_parameters(self):
        ids = {id(p) for p in self.adapter_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]
