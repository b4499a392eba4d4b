"""A watermark the decoder carries (Stable Signature; issue 18, point 3).

Stable Signature (Fernandez, Couairon, Jegou, Douze, Furon, ICCV 2023; code facebookresearch/stable_signature):
instead of a key written into the latent -- the ring and null keys of `watermark`, whose unimitable part is
smaller than what every attack puts into the image (README: a bound on any detector under attack) -- the latent
decoder itself is fine-tuned so that every image it decodes carries a k-bit message that a fixed extractor
network reads back, whatever latent the expert hands it.

1. `train_extractor`: the extractor W (image -> k bit logits) is trained once per run, HiDDeN-style (Zhu, Kaplan,
   Johnson, Fei-Fei 2018), jointly with an embedder H(x, m) that adds a message m to an image x, on the run's
   training images with random messages, each step under one attack drawn from `attacks.ATTACKS` with a random
   strength around the evaluated one (`train_attack`: JPEG straight-through, the VAE round trip through the
   image's own cluster VAE, differentiated). H exists only to train W.
2. `mark_decoder`: per cluster, a copy of the VAE whose decoder is fine-tuned on latents z of the cluster
   (`mark_latents`: its training latents and as many drawn from the expert): BCE(W(attack(D_m(z))), m) +
   lam visibility(sigmoid D_m(z) - sigmoid D(z)) / mse(psnr), the image loss (`visibility`: the MSE, optionally
   weighted by luminance masking, Weber's law, and charged more for fine detail), with lam a Lagrange multiplier
   (dual ascent on log lam) that holds the marked images at the PSNR `psnr` against the clean decoder; a last
   bisection back towards the clean parameters guarantees it on z.
3. `scores`: the mean agreement of W's logits with the key's message, sum_i (2 m_i - 1) W(x)_i / k (larger for
   marked images; the threshold is the clean images' 99th percentile, as for the latent keys).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molrmog.applications.attacks import ATTACKS, blur, frozen, jpeg, key_seed, psnr_mse
from molrmog.core.artefacts import Model, register_to_config
from molrmog.core.errors import MolrmogError
from molrmog.training.train import CHECKPOINT, fit

__all__ = ["Extractor", "key_bits", "train_attack", "train_extractor", "mark_decoder", "scores", "bit_accuracy",
           "extractor_for", "extractor_dir", "prepare", "mark_latents", "visibility", "BITS", "EXTRACTOR_STEPS",
           "MARK_STEPS", "PSNR", "WEBER", "SMOOTH"]

BITS = 16  # message length (Stable Signature: 48 bits on 256x256 images; these have 64-784 pixels; README)
EXTRACTOR_STEPS = 4000  # Adam steps of the HiDDeN pre-training of the extractor (2000 lost JPEG on digits: README)
MARK_STEPS = 800  # Adam steps of each cluster's decoder fine-tune (400 until the tenth session: README)
PSNR = 36.0  # dB, the marked decoder against the clean one (the goal: >= 35)
WEBER = 0.0  # L0 of the luminance masking of the image loss (0: plain MSE; 0.1 lost on Fashion-MNIST: README)
SMOOTH = 0.0  # weight of the image loss's extra charge on a change's fine detail (0: none; README)
CHECKPOINT_EVERY = 250  # extractor steps between checkpoints (a stopped training resumes from the last one)


class Extractor(Model):
    """W: image (B, C, H, W) in [0, 1] -> (B, bits) logits; HiDDeN's decoder in small: convolutions, one
    stride-2, average pooling to 4 x 4 (HiDDeN pools to 1 x 1; on 8 x 8 to 28 x 28 images the positions carry the
    bits), a linear map. `steps`, `psnr`, `weber` and `smooth` record how it was trained."""

    @register_to_config
    def __init__(self, image_shape=(1, 8, 8), bits: int = BITS, width: int = 32, seed: int = 0,
                 steps: int = EXTRACTOR_STEPS, psnr: float = PSNR, weber: float = 0.0, smooth: float = 0.0):
        super().__init__()
        if not 1 <= int(bits) <= 256 or not 1 <= int(width) <= 512:
            raise MolrmogError(f"the extractor needs 1..256 bits and a width in 1..512, got {bits} and {width}")
        C, w = int(image_shape[0]), int(width)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Conv2d(C, w, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
                                     nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU())
            self.head = nn.Linear(2 * w * 16, int(bits))
        self.bits = int(bits)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.net(2 * x - 1), 4).flatten(1))


class _Embedder(nn.Module):
    """H: (image, message) -> an additive change; HiDDeN's encoder in small (used only to train W)."""

    def __init__(self, image_shape, bits: int, width: int = 32, maps: int = 8):
        super().__init__()
        C, H, W = (int(v) for v in image_shape)
        self.maps, self.size = maps, (H, W)
        self.message = nn.Linear(bits, maps * H * W)  # the message as spatial maps (HiDDeN broadcasts it)
        self.features = nn.Sequential(nn.Conv2d(C, width, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
        self.mix = nn.Sequential(nn.Conv2d(width + maps + C, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, C, 1))

    def forward(self, x: Tensor, m: Tensor) -> Tensor:
        msg = self.message(2 * m - 1).view(-1, self.maps, *self.size)
        return self.mix(torch.cat([self.features(2 * x - 1), msg, x], 1))


def key_bits(key, bits: int = BITS) -> Tensor:
    """The key's message: `bits` bits (float 0 / 1) drawn from the key (any integer or string)."""
    g = torch.Generator().manual_seed(key_seed(f"signature:{key}"))
    return torch.randint(0, 2, (int(bits),), generator=g).float()


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def train_attack(x: Tensor, vae, g: torch.Generator, names=None) -> Tensor:
    """One of `names` (default: every one of `attacks.ATTACKS`; drawn with g), made differentiable in x, at a
    random strength around the evaluated one: noise std 0.01-0.05 (evaluated: 0.03), blur sigma 0.4-0.9 (0.6),
    JPEG quality 50-90 (75; straight-through: the forward pass is the real JPEG, the gradient the identity),
    brightness x 0.85-1.25 (1.15), the VAE round trip through `vae` (the clean one: an attacker's), or none."""
    names = list(names or ATTACKS)
    name = names[int(torch.randint(len(names), (), generator=g))]
    if name == "gaussian_noise":
        return (x + _uniform(g, 0.01, 0.05) * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if name == "blur":
        return blur(x, _uniform(g, 0.4, 0.9))
    if name == "jpeg":
        return x + (jpeg(x.detach(), int(_uniform(g, 50, 90))) - x).detach()
    if name == "brightness":
        return (x * _uniform(g, 0.85, 1.25)).clamp(0, 1)
    if name == "vae_reencode":
        return torch.sigmoid(vae.decode(vae.encode(x)[0]))
    if name != "none":
        raise MolrmogError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}", param="attacks")
    return x


def visibility(change: Tensor, clean: Tensor, weber: float = WEBER, smooth: float = SMOOTH) -> Tensor:
    """The image loss of a change to clean images (both (B, C, H, W)): with weber = L0 > 0, Weber's law of
    luminance masking -- a change is as visible as its ratio to the local brightness L (the clean image blurred,
    sigma 1) plus L0 -- so squared changes are weighted by 1 / (L0 + L)^2, the weights normalised to mean 1 per
    image; weber = 0: the plain MSE (the default). With plain MSE the Fashion-MNIST marks sit on the black
    background; with L0 = 0.1 they move onto the garment, but the FID change stays and detection under attack
    falls (README: a decoder that carries the key). smooth = s > 0 charges the change's fine detail (what a blur
    of sigma 1 removes) s times more: squared change + s x squared (change - blur(change)), weighted as above."""
    cost = change.pow(2)
    if smooth > 0:
        cost = cost + smooth * (change - blur(change, 1.0)).pow(2)
    if weber <= 0:
        return cost.mean()
    w = (weber + blur(clean.detach(), 1.0)).pow(-2)
    w = w / w.mean(dim=(1, 2, 3), keepdim=True)
    return (w * cost).mean()


class _Lagrange(nn.Module):
    """lam for loss = task + lam * cost / target: dual ascent on log lam towards mse = target (10^(-psnr / 10)),
    log lam += rate * log(mse / target) clipped to +-2 per step, from a small lam (the task is learnt first: a
    large lam at the start drives the change to zero before the extractor can read anything, and it never
    recovers). log lam is a buffer (float64), so a checkpoint of a module holding this one carries it."""

    def __init__(self, psnr: float, rate: float = 0.01, start: float = 1e-3):
        super().__init__()
        self.target, self.rate = psnr_mse(psnr), rate
        self.register_buffer("log_lam", torch.tensor(math.log(start), dtype=torch.float64))

    def loss(self, task: Tensor, mse: Tensor, cost: Tensor | None = None) -> Tensor:
        """task + lam * cost / target (cost: the image loss, default the MSE); lam then steps on the MSE."""
        log_lam = float(self.log_lam)
        out = task + math.exp(log_lam) * (mse if cost is None else cost) / self.target
        step = min(2.0, max(-2.0, math.log(max(float(mse.detach()), 1e-20) / self.target)))
        self.log_lam.fill_(min(20.0, max(-20.0, log_lam + self.rate * step)))
        return out


class _Training(nn.Module):
    """What `train_extractor` trains, as one module for the training loop's checkpoints: the extractor W, the
    embedder H and the Lagrange multiplier that holds H's change at the PSNR."""

    def __init__(self, W: Extractor, H: nn.Module, lag: _Lagrange):
        super().__init__()
        self.W, self.H, self.lag = W, H, lag


def train_extractor(images_of, vaes, weights: Tensor, *, image_shape, bits: int = BITS, steps: int = EXTRACTOR_STEPS,
                    psnr: float = PSNR, batch: int = 64, lr: float = 1e-3, seed: int = 0, progress: bool = False,
                    attacks=None, weber: float = WEBER, smooth: float = SMOOTH, checkpoint_dir=None,
                    checkpoint_every: int = CHECKPOINT_EVERY):
    """The extractor W, trained with an embedder H on random messages under `train_attack` (see the module). Each
    step draws a cluster k by `weights`, a batch of its images (`images_of(k)`), messages, one attack through
    `vaes[k]`; H's change, its image loss `visibility`, is held near the PSNR `psnr` by a Lagrange multiplier.
    The loop is the project's one training loop (`training.train.fit`): with `checkpoint_dir` a checkpoint (W, H,
    the multiplier, Adam, the generator) is written there every `checkpoint_every` steps and a stopped training
    resumes from it bit for bit. Returns (W, facts: the last tenth's bit accuracy and PSNR of the steps this call
    ran, and the final lambda)."""
    if steps < 1 or batch < 1:
        raise MolrmogError(f"the extractor needs steps >= 1 and batch >= 1, got {steps} and {batch}")
    W = Extractor(tuple(image_shape), bits, seed=seed, steps=steps, psnr=psnr, weber=weber, smooth=smooth)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        H = _Embedder(image_shape, bits)
    both, log = _Training(W, H, _Lagrange(psnr)), ([], [])

    def loss_fn(model: _Training, g: torch.Generator) -> Tensor:
        k = int(torch.multinomial(weights, 1, generator=g))
        pool = images_of(k)
        x = pool[torch.randint(len(pool), (batch,), generator=g)]
        m = torch.randint(0, 2, (batch, bits), generator=g).float()
        x_w = (x + model.H(x, m)).clamp(0, 1)
        logits = model.W(train_attack(x_w, vaes[k], g, attacks))
        mse = (x_w - x).pow(2).mean()
        _record(logits > 0, m, mse, log)
        return model.lag.loss(F.binary_cross_entropy_with_logits(logits, m), mse, visibility(x_w - x, x, weber, smooth))

    with frozen(*vaes), torch.enable_grad():
        fit(both, loss_fn, steps=steps, lr=lr, seed=seed, lr_schedule="cosine", progress=progress, desc="extractor",
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    return W.eval(), {**_tail_facts(*log), "lambda": math.exp(float(both.lag.log_lam))}


def _record(bits: Tensor, m: Tensor, mse: Tensor, log: tuple[list, list]) -> None:
    """The record of a step's bit accuracy and MSE in `log`."""
    log[0].append(float((bits.float() == m).float().mean()))
    log[1].append(float(mse.detach()))


def _step(opt, sched, loss: Tensor, bits: Tensor, m: Tensor, mse: Tensor, log: tuple[list, list]) -> None:
    """One optimiser and schedule step on `loss`, and the record of its bit accuracy and MSE in `log`."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    _record(bits, m, mse, log)


def _tail_facts(acc: list, mse: list) -> dict:
    """The last tenth's mean bit accuracy and its PSNR (of the mean MSE)."""
    if not acc:  # (a resumed training that had nothing left to do)
        return {}
    n = max(1, len(acc) // 10)
    return {"bit_accuracy_last_tenth": sum(acc[-n:]) / n,
            "psnr_last_tenth": -10 * math.log10(max(1e-12, sum(mse[-n:]) / n))}


def extractor_dir(out, bits: int, steps: int, psnr: float, seed: int, weber: float = WEBER,
                  smooth: float = SMOOTH) -> Path:
    """Where `extractor_for` keeps an extractor: OUT/extractor-<bits>b-<steps>s-<psnr>dB-weber<weber>[-smooth<smooth>
    when not 0]-seed<seed>."""
    fine = f"-smooth{smooth:g}" if smooth else ""
    return Path(out) / f"extractor-{bits}b-{steps}s-{psnr:g}dB-weber{weber:g}{fine}-seed{seed}"


def extractor_for(run, out, *, bits: int = BITS, steps: int = EXTRACTOR_STEPS, psnr: float = PSNR, seed: int = 0,
                  progress: bool = False, weber: float = WEBER, smooth: float = SMOOTH) -> Extractor:
    """The run's extractor, trained once and kept in `extractor_dir(out, ...)` (read back when there; while it
    trains, its checkpoint is kept there, and a stopped training resumes from it)."""
    from molrmog.pipeline.run import Run

    r = Run.coerce(run)
    d = extractor_dir(out, bits, steps, psnr, seed, weber, smooth)
    if (d / "config.json").is_file():
        return Extractor.load(d, "watermark extractor").eval()
    W, _ = train_extractor(r.cluster_images, r.vaes(), r.weights, image_shape=r.image_shape, bits=bits,
                           steps=steps, psnr=psnr, seed=seed, progress=progress, weber=weber, smooth=smooth,
                           checkpoint_dir=d)
    W.save(d)
    (d / CHECKPOINT).unlink(missing_ok=True)  # the finished extractor replaces its training's checkpoint
    return W


def mark_decoder(extractor: Extractor, key, vae, z: Tensor, *, steps: int = MARK_STEPS, psnr: float = PSNR,
                 batch: int = 32, lr: float = 1e-3, seed: int = 0, attacks=None,
                 weber: float = WEBER, smooth: float = SMOOTH) -> tuple[nn.Module, dict]:
    """A copy of `vae` whose decoder writes the key's message into every image it decodes (see the module): Adam
    on the copy's parameters over latents z (N, d) of its cluster, BCE of the extractor's logits on an attacked
    decode against the message, plus the Lagrange-held pixel MSE to the clean decoder's image. The extractor and
    the clean VAE stay as they are. Returns (the marked VAE, facts: the last tenth's bit accuracy and MSE)."""
    if steps < 1 or z.shape[0] < 1:
        raise MolrmogError(f"marking a decoder needs steps >= 1 and latents, got {steps} steps, {z.shape[0]} latents")
    marked = copy.deepcopy(vae).train()
    params = [p for p in marked.parameters()]
    for p in params:
        p.requires_grad_(True)
    m = key_bits(key, extractor.bits)
    g, lag = torch.Generator().manual_seed(seed), _Lagrange(psnr, rate=0.03, start=0.1)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # lam oscillates; a decaying rate settles it
    log = ([], [])
    with frozen(vae, extractor), torch.enable_grad():
        for _ in range(steps):
            zb = z[torch.randint(len(z), (batch,), generator=g)]
            with torch.no_grad():
                clean = torch.sigmoid(vae.decode(zb))
            x = torch.sigmoid(marked.decode(zb))
            logits = extractor(train_attack(x, vae, g, attacks))
            mse = (x - clean).pow(2).mean()
            loss = lag.loss(F.binary_cross_entropy_with_logits(logits, m.expand_as(logits)), mse,
                            visibility(x - clean, clean, weber, smooth))
            _step(opt, sched, loss, logits > 0, m, mse, log)
    for p in params:
        p.requires_grad_(False)
    facts = {**_tail_facts(*log), **_hold_psnr(marked, vae, z, psnr)}
    return marked.eval(), facts


@torch.no_grad()
def _hold_psnr(marked, vae, z: Tensor, psnr: float, iters: int = 20) -> dict:
    """If the marked decoder's PSNR against the clean one over z falls short of `psnr`, move its parameters back
    towards the clean ones, theta_0 + a (theta_m - theta_0), with the largest a in [0, 1] (bisection) that meets it.
    Returns the a used and the PSNR reached."""
    clean = torch.sigmoid(vae.decode(z))

    def psnr_at() -> float:
        return -10 * math.log10(max(1e-12, float((torch.sigmoid(marked.decode(z)) - clean).pow(2).mean())))

    reached = psnr_at()
    if reached >= psnr:
        return {"interpolation": 1.0, "psnr_latents": reached}
    theta0 = [p.detach().clone() for p in vae.parameters()]
    theta_m = [p.detach().clone() for p in marked.parameters()]

    def set_to(a: float) -> None:
        for p, p0, pm in zip(marked.parameters(), theta0, theta_m, strict=True):
            p.copy_(p0 + a * (pm - p0))

    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        set_to(mid)
        lo, hi = (mid, hi) if psnr_at() >= psnr else (lo, mid)
    set_to(lo)
    return {"interpolation": lo, "psnr_latents": psnr_at()}


def prepare(run, kind: str, key, out, *, bits: int = BITS, extractor_steps: int = EXTRACTOR_STEPS,
            mark_steps: int = MARK_STEPS, psnr: float = PSNR, seed: int = 0, clusters=None,
            progress: bool = False, weber: float = WEBER, smooth: float = SMOOTH) -> dict:
    """The run's extractor (`extractor_for`, kept in OUT) and, for each of `clusters` (default all), its VAE with
    the decoder marked with the key (`mark_decoder` on `mark_latents` of the `kind` expert). Returns {"extractor",
    "vaes": {k: marked VAE}, "facts": {"extractor": its folder, "clusters": {k: mark facts}, ...}}."""
    from tqdm.auto import tqdm

    from molrmog.pipeline.run import Run, cluster_seed

    r = Run.coerce(run)
    W = extractor_for(r, out, bits=bits, steps=extractor_steps, psnr=psnr, seed=seed, progress=progress, weber=weber,
                      smooth=smooth)
    vaes, facts = {}, {}
    for k in tqdm(list(range(r.K) if clusters is None else clusters), desc="marking decoders",
                  disable=not progress, leave=False):
        z = mark_latents(r.expert(kind, k), r.latents(k), seed=cluster_seed(seed, k))
        vaes[k], facts[k] = mark_decoder(W, key, r.vae(k), z, steps=mark_steps, psnr=psnr,
                                         seed=cluster_seed(seed, k), weber=weber, smooth=smooth)
    return {"extractor": W, "vaes": vaes,
            "facts": {"extractor": extractor_dir(out, bits, extractor_steps, psnr, seed, weber, smooth).name,
                      "bits": bits, "extractor_steps": extractor_steps, "mark_steps": mark_steps, "psnr_target": psnr,
                      "weber": weber, "smooth": smooth,
                      "clusters": facts}}


@torch.no_grad()
def mark_latents(expert, z_train: Tensor, n: int = 1024, seed: int = 0, steps: int = 40) -> Tensor:
    """Latents to mark a cluster's decoder on: its training latents z_train (N, d) and as many (at most n) drawn
    from the expert the way `watermark.embed` draws them (probability-flow ODE from t_max, `steps`), so that the
    marked decoder is trained, and held to its PSNR, on the latents it will decode as well as on the data's."""
    from molrmog.applications.editing import ode

    sched = expert.schedule
    n = min(int(n), len(z_train))
    g = torch.Generator().manual_seed(seed)
    u_T = float(sched.gamma(torch.tensor(sched.t_max))) * torch.randn(n, expert.shift.numel(), generator=g)
    u0 = ode(expert, u_T, sched.t_max, sched.t_min, sched, steps)
    keep = torch.randperm(len(z_train), generator=g)[:n]
    return torch.cat([z_train.flatten(1)[keep], expert.unstandardise(u0).to(z_train.dtype)])


@torch.no_grad()
def scores(extractor: Extractor, key, images: Tensor, batch: int = 512) -> Tensor:
    """The detection statistic per image (N,): the mean agreement sum_i (2 m_i - 1) W(x)_i / k of the extractor's
    logits with the key's message."""
    sign = 2 * key_bits(key, extractor.bits) - 1
    return torch.cat([(extractor(b) * sign).mean(1) for b in images.split(batch)])


@torch.no_grad()
def bit_accuracy(extractor: Extractor, key, images: Tensor) -> Tensor:
    """The fraction of the key's bits the extractor reads correctly from each image (N,)."""
    m = key_bits(key, extractor.bits)
    return ((extractor(images) > 0).float() == m).float().mean(1)
