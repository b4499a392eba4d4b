"""Small convolutional VAEs: one per cluster (dedicated), one for all (unified), or one shared
backbone with a low-rank adapter per cluster (LoRA, through peft).

Images (B, C, H, W) in [0, 1] map to a latent (B, c, h, w) with H / h a power of two; the
latent code used by the experts is the encoder mean. Both classes are diffusers models
(`molrmog.core.artefacts.Model`).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molrmog.core.artefacts import Model, register_to_config
from molrmog.core.errors import MolrmogError

__all__ = ["ConvVAE", "LoRAVAE", "check_latent_shape", "vae_loss", "roundtrip_ratio", "MAX_LATENT_CHANNELS",
           "RECON_LOSSES"]

MAX_LATENT_CHANNELS = 256
# the reconstruction likelihood p(x | z) of a VAE, around the decoded image sigmoid(D(z)) in [0, 1]:
# bernoulli (cross-entropy); normal and laplace with a learned per-pixel scale (log_scale, one per pixel)
RECON_LOSSES = ("bernoulli", "normal", "laplace")
INITIAL_LOG_SCALE = math.log(0.1)  # about the pixel error of a VAE early in training: the scale has little to travel


def check_latent_shape(image_shape, latent) -> int:
    """Number of stride-2 stages from image (C, H, W) to latent (c, h, w); MolrmogError if it does not fit."""
    C, H, W = image_shape
    c, h, w = latent
    if min(c, h, w) < 1:
        raise MolrmogError(f"latent shape must be positive, got {tuple(latent)}")
    if c > MAX_LATENT_CHANNELS:
        raise MolrmogError(f"latent channels {c} exceed {MAX_LATENT_CHANNELS}; use a smaller --latent (e.g. 4,7,7)")
    if H != W or h != w:
        raise MolrmogError(f"square images and latents only, got image {H}x{W} and latent {h}x{w}")
    ratio = H / h
    n_down = round(math.log2(ratio)) if ratio >= 1 else -1
    if H % h != 0 or n_down < 0 or 2**n_down != ratio:
        raise MolrmogError(f"latent {c}x{h}x{w} does not fit {H}x{W} images: H / h must be a power of two "
                           f"(e.g. {H // 2 if H % 2 == 0 else H}x... for this size)")
    return n_down


class _Res(nn.Module):
    """A residual block at one resolution: x + conv(silu(conv(silu(x)))) (3x3, same channels)."""

    def __init__(self, ch: int):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.c2(F.silu(self.c1(F.silu(x))))


class _VAE(Model):
    """Encoder: conv, n_down x (stride-2 conv [+ residual blocks]), conv -> (mean, logvar); the decoder mirrors it.
    `blocks` residual blocks follow each of the two lowest-resolution stages (where they are cheap), in the
    encoder and the decoder."""

    def _build(self, image_shape, latent, width: int, beta: float, seed: int, blocks: int = 0,
               recon: str = "bernoulli") -> None:
        self.image_shape, self.latent = tuple(int(v) for v in image_shape), tuple(int(v) for v in latent)
        if not (beta >= 0 and math.isfinite(beta)):
            raise MolrmogError(f"the VAE's KL weight beta must be a finite number >= 0, got {beta}")
        if recon not in RECON_LOSSES:
            raise MolrmogError(f"the VAE's reconstruction loss must be one of {', '.join(RECON_LOSSES)}, got {recon!r}")
        self.recon = recon
        if recon != "bernoulli":  # a learned per-pixel scale (no random numbers: the weights below do not change)
            self.log_scale = nn.Parameter(torch.full(self.image_shape, INITIAL_LOG_SCALE))
        if not 1 <= int(width) <= 1024:
            raise MolrmogError(f"the VAE width must lie in [1, 1024], got {width}")
        self.beta = float(beta)
        n_down = check_latent_shape(self.image_shape, self.latent)
        C, c = self.image_shape[0], self.latent[0]
        if not 0 <= int(blocks) <= 16:
            raise MolrmogError(f"the VAE's residual blocks per stage must lie in [0, 16], got {blocks}")
        with torch.random.fork_rng():  # seeded weights without touching the caller's global RNG
            torch.manual_seed(seed)
            enc = [nn.Conv2d(C, width, 3, padding=1), nn.SiLU()]
            ch = width
            for i in range(n_down):
                enc += [nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), nn.SiLU()]
                ch *= 2
                if i >= n_down - 2:
                    enc += [_Res(ch) for _ in range(blocks)]
            enc += [nn.Conv2d(ch, 2 * c, 3, padding=1)]
            self.encoder = nn.Sequential(*enc)
            dec = [nn.Conv2d(c, ch, 3, padding=1), nn.SiLU()]
            for i in range(n_down):
                if i < 2:
                    dec += [_Res(ch) for _ in range(blocks)]
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


class ConvVAE(_VAE):
    """A small convolutional VAE (one per cluster, or one for all clusters)."""

    @register_to_config
    def __init__(self, image_shape=(1, 8, 8), latent=(2, 4, 4), width: int = 32, beta: float = 1.0, seed: int = 0,
                 blocks: int = 0, recon: str = "bernoulli"):
        super().__init__()
        self._build(image_shape, latent, width, beta, seed, blocks, recon)


def recon_nll(vae: _VAE, logits: Tensor, x: Tensor) -> Tensor:
    """-log p(x | z) summed over pixels, averaged over images, for the VAE's likelihood (`RECON_LOSSES`) around
    sigmoid(logits); the normal and Laplace scales are the VAE's learned per-pixel `log_scale`."""
    if vae.recon == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
    err, log_s = x - torch.sigmoid(logits), vae.log_scale
    if vae.recon == "normal":
        nll = 0.5 * (err * torch.exp(-log_s)).pow(2) + log_s + 0.5 * math.log(2 * math.pi)
    else:
        nll = err.abs() * torch.exp(-log_s) + log_s + math.log(2)
    return nll.sum() / x.shape[0]


def vae_loss(vae: _VAE, x: Tensor, gen: torch.Generator | None = None, cycle: float = 0.0) -> Tensor:
    """Negative ELBO per image: reconstruction (`recon_nll`: Bernoulli, or normal / Laplace with a learned
    per-pixel scale) + beta KL(q(z|x) || N(0, I)).

    With `cycle` > 0, plus cycle * ||E(D(m)) - m||^2 per image for the encoder mean m (the latent the experts
    learn from; the target m is held fixed): the VAE must give back the latents it is asked to decode, and the
    latents an expert generates lie near them (`molrmog.evaluation.evaluate.roundtrip`). The cycle is taken at the mean,
    not at the posterior draw: on draws it makes the decoder spell out the posterior noise of unused latent
    dimensions, and reconstructions degrade (README: the latent-space study)."""
    mean, logvar = vae.encode(x)
    eps = torch.randn(mean.shape, generator=gen, dtype=mean.dtype, device=gen.device if gen else None).to(mean.device)
    z = mean + torch.exp(0.5 * logvar) * eps
    rec = recon_nll(vae, vae.decode(z), x)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / x.shape[0]
    loss = rec + vae.beta * kl
    if cycle:
        back = vae.encode(torch.sigmoid(vae.decode(mean)))[0]
        loss = loss + cycle * (back - mean.detach()).pow(2).sum() / x.shape[0]
    return loss


@torch.no_grad()
def roundtrip_ratio(vae: _VAE, z: Tensor, center: Tensor) -> Tensor:
    """Per latent: ||E(D(z)) - z|| / ||z - center|| (E = encoder mean of the decoded image, D = decoder +
    sigmoid); how far a decode-encode round trip moves z, against z's distance from `center` (e.g. the
    cluster's mean latent)."""
    flat = z.flatten(1)
    back = vae.encode(torch.sigmoid(vae.decode(z)))[0].flatten(1)
    return (back - flat).norm(dim=1) / (flat - center.flatten()).norm(dim=1).clamp_min(1e-12)


class LoRAVAE(_VAE):
    """One VAE backbone shared by all clusters plus one peft LoRA adapter per cluster (named
    `cluster_<k>`) on every Conv2d layer (peft's LoRA has no ConvTranspose2d layer, so the decoder's
    upsampling convolutions are shared). `set_cluster(k)` activates cluster k's adapter."""

    @register_to_config
    def __init__(self, image_shape=(1, 8, 8), latent=(2, 4, 4), width: int = 32, beta: float = 1.0, seed: int = 0,
                 clusters: int = 10, rank: int = 4, blocks: int = 0, recon: str = "bernoulli"):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        self._build(image_shape, latent, width, beta, seed, blocks, recon)
        if not 1 <= int(clusters) <= 10_000 or not 1 <= int(rank) <= 1024:
            raise MolrmogError(f"LoRA VAE needs 1 <= clusters <= 10000 and 1 <= rank <= 1024, got {clusters}, {rank}")
        self.clusters, self.rank = int(clusters), int(rank)
        targets = [name for name, m in self.named_modules() if type(m) is nn.Conv2d]
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # peft: "multiple adapters in the model" -- one per cluster
            torch.manual_seed(seed + 1)
            for k in range(self.clusters):  # B = 0: every adapter starts as the backbone
                inject_adapter_in_model(LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=targets),
                                        self, adapter_name=self.adapter(k))
        self.cluster = None
        self.set_cluster(0)

    @staticmethod
    def adapter(k: int) -> str:
        return f"cluster_{k}"

    def set_cluster(self, k: int) -> LoRAVAE:
        """Activate cluster k's adapter (only its parameters require grad afterwards)."""
        if not 0 <= k < self.clusters:
            raise MolrmogError(f"cluster {k} outside 0..{self.clusters - 1}")
        if k != self.cluster:
            from peft.tuners.tuners_utils import BaseTunerLayer

            for m in self.modules():
                if isinstance(m, BaseTunerLayer):
                    m.set_adapter(self.adapter(k))
            self.cluster = k
        return self

    def adapter_parameters(self, k: int) -> list[nn.Parameter]:
        tag = f".{self.adapter(k)}."
        return [p for name, p in self.named_parameters() if tag in name]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if ".lora_" not in name]
