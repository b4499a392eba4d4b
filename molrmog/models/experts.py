"""Learnable score models.

- `MoGExpert`: a mixture of n low-rank Gaussians in a d-dim latent; its score at (z, t) is the
  closed-form mixture score of its current parameters (`molrmog.core.mixture`, the same code as
  the analytic distributions); optional variance floors (isotropic, per coordinate, or per mode and
  coordinate) complete its low-rank modes to full-rank ones.
- `GaussianExpert`: one zero-mean low-rank Gaussian (MoLRG): a linear score.
- `MoEScore`: K experts on learnable orthonormal subspaces A_k (A_k = Q of a QR factorisation,
  so A_k^T A_k = I exactly), gated by the closed-form responsibilities; optionally full covariances in the
  subspaces (packed Cholesky factors) and an isotropic floor off them (the latent `molr` kind).
- `MLPScore`: an unstructured MLP with a time embedding (baseline).

Every model is called as `model(x, t) -> score` with t a scalar or (B,) tensor, has
`denoise(x, t)`, and is a diffusers model (`molrmog.core.artefacts.Model`): the constructor arguments
are its config, `save_pretrained` / `from_pretrained` (or the checked `save` / `load`) write and
read `config.json` + `diffusion_pytorch_model.safetensors`.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from molrmog.core import mixture as mx
from molrmog.core.artefacts import Model, register_to_config
from molrmog.core.errors import MolrmogError
from molrmog.core.schedules import get_schedule

__all__ = ["ScoreModel", "PackedTril", "MoGExpert", "GaussianExpert", "MoEScore", "MLPScore", "UNetScore",
           "load_model", "k_subspaces", "precondition_eps"]


class ScoreModel(Model):
    """Base class of every score model: schedule handling and the Tweedie denoiser.

    A subclass decorates its `__init__` with `@register_to_config` and calls `self._set_schedule`;
    it is then a diffusers model: `save_pretrained` / `from_pretrained`, or the checked
    `save` / `load` (`molrmog.core.artefacts`).
    """

    def _set_schedule(self, schedule) -> None:
        self.schedule = get_schedule(schedule)
        self.register_to_config(schedule=self.schedule.config())  # a JSON dict, whatever was passed

    def st(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """(s_t, gamma_t) in x's dtype and device, shape () or (B,) (`Schedule.s_gamma`)."""
        return self.schedule.s_gamma(torch.as_tensor(t, dtype=torch.float64), x)

    def score(self, x: Tensor, t) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, t) -> Tensor:
        return self.score(x, t)

    def denoise(self, x: Tensor, t) -> Tensor:
        """Tweedie: (x + gamma^2 score) / s."""
        s, g = self.st(x, t)
        s, g = (s, g) if s.ndim == 0 else (s[:, None], g[:, None])
        return (x + g**2 * self.score(x, t)) / s


class PackedTril(nn.Module):
    """Parametrisation of square factors (..., q, q) as lower-triangular Cholesky factors stored packed
    (..., q (q + 1) / 2): a full covariance U U^T at its q (q + 1) / 2 free numbers. Assigning a square factor W
    stores a lower-triangular L with L L^T = W W^T (the same covariance; from a QR factorisation of W^T)."""

    def __init__(self, q: int):
        super().__init__()
        self.q = int(q)
        i, j = torch.tril_indices(self.q, self.q)
        self.register_buffer("i", i, persistent=False)
        self.register_buffer("j", j, persistent=False)

    def forward(self, packed: Tensor) -> Tensor:
        U = packed.new_zeros(*packed.shape[:-1], self.q, self.q)
        U[..., self.i, self.j] = packed
        return U

    def right_inverse(self, W: Tensor) -> Tensor:
        # W^T = Q R gives W W^T = R^T R: L = R^T is a lower-triangular factor of the same covariance, defined
        # for a singular W too (no Cholesky of W W^T); flipping columns to a non-negative diagonal keeps L L^T
        R = torch.linalg.qr(W.transpose(-1, -2), mode="r")[1]
        sign = torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(R.dtype)
        return (R.transpose(-1, -2) * sign[..., None, :])[..., self.i, self.j]


def _check_expert_dims(d: int, n: int, r: int) -> None:
    if int(d) < 1:
        raise MolrmogError(f"latent dimension d must be >= 1, got {d}")
    if int(n) < 1:
        raise MolrmogError(f"number of modes n_k must be >= 1, got {n}")
    if not 1 <= int(r) <= int(d):
        raise MolrmogError(f"rank r must satisfy 1 <= r <= d = {d}, got r = {r}; lower --r or raise --d")


DIAG_FLOORS = ("none", "shared", "mode")  # per-coordinate floors: none, one shared by the modes, one per mode


class _FloorMixin:
    """A variance floor c on a closed-form mixture law (`self.mixture()`): every mode becomes N(m, S + C), with
    C = c I (isotropic: config `floor`, or trained as `log_floor`) or a per-coordinate floor C = diag(c_1..c_D),
    shared by the modes (`diag_floor="shared"`) or one per mode (`diag_floor="mode"`: C_l = diag(c_l1..c_lD)), in
    the buffer `floor_diag` ((D,) or (L, D)). Shared by the MoG / Gaussian experts and `MoEScore`.

    The isotropic floor folds into the noise (`_st_floored`) and keeps the low-rank closed form; a diagonal one
    does not, so a model with it scores through the law written with the floor in its factor (`mixture_for`: the
    same closed form with rank r + D, exact; (r + D)^3 per mode and call -- cheap for the latents here, and used
    only once the floor is set), or, for a shared floor at one t, whitens by it (`_MixtureExpert.score`)."""

    @staticmethod
    def _ambient(m: mx.Mixture) -> mx.Mixture:
        """m with every mode written in the ambient space: one subspace (A = I) whose modes are all (k, l), means
        A_k mu_kl (1, K L, D), factors A_k U_kl (1, K L, D, r), log-weights log w_k + log pi_kl."""
        mu, F = m.mu, m.U
        if m.A is not None:
            mu, F = torch.einsum("kDd,kld->klD", m.A, mu), torch.einsum("kDd,kldr->klDr", m.A, F)
        D = mu.shape[-1]
        return mx.Mixture(torch.zeros(1, dtype=mu.dtype, device=mu.device), None, m.log_weights.reshape(1, -1),
                          mu.reshape(1, -1, D), F.reshape(1, -1, D, F.shape[-1]))

    def _st_floored(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """(s_t, gamma') with the floor folded into the noise: a mode N(m, S + c I) noised to t is
        N(s m, s^2 S + (gamma^2 + s^2 c) I), the floorless mode at gamma' = sqrt(gamma^2 + s^2 c).
        (`denoise` keeps the schedule's own gamma: Tweedie's formula uses the noise actually added.)"""
        s, g = self.st(x, t)
        c = self.floor_variance()
        return (s, g) if c is None else (s, torch.sqrt(g**2 + s**2 * c))

    def floor_variance(self) -> Tensor | float | None:
        """The isotropic floor in use: the trained exp(log_floor), the fixed `floor`, or None (no floor)."""
        if hasattr(self, "log_floor"):
            return self.log_floor.exp()
        return self.floor if self.floor > 0 else None

    def diagonal_floor(self) -> Tensor | None:
        """The per-coordinate floor in use, (D,) shared or (L, D) per mode, or None (no `floor_diag`, or all
        zeros: not set yet)."""
        c = getattr(self, "floor_diag", None)
        return c if c is not None and bool((c > 0).any()) else None

    def floor_value(self) -> float:
        """The floor in use as a number (0 without one)."""
        c = self.floor_variance()
        return 0.0 if c is None else c if isinstance(c, float) else float(c.detach())

    def mixture_for(self, x: Tensor) -> mx.Mixture:
        """The model's law (a MoLR-MoG) in x's dtype and device: what the exact sampler steps with. With a
        floor every mode is written in the ambient space (A = I) with the factor [A U, diag(sqrt(floor))] of its
        covariance A U U^T A^T + diag(floor) (floor: the isotropic one in every coordinate, plus the
        per-coordinate one)."""
        m = self.mixture().to(dtype=x.dtype, device=x.device)
        c, c_diag = self.floor_variance(), self.diagonal_floor()
        if c is None and c_diag is None:
            return m
        a = self._ambient(m)
        F = a.U[0]
        floor = torch.zeros(F.shape[:2], dtype=x.dtype, device=x.device)  # (modes, D)
        if c is not None:
            floor = floor + torch.as_tensor(c, dtype=x.dtype, device=x.device)
        if c_diag is not None:
            floor = floor + c_diag.to(dtype=x.dtype, device=x.device)
        # the factor [F, diag(sqrt(floor))] (rank r + D): F F^T + diag(floor) with no factorisation, exact even
        # where the floor is 0 in some coordinates (zero columns are padding for the closed form)
        return replace(a, U=torch.cat([F, torch.diag_embed(floor.sqrt())], -1)[None])

    def coordinate_variance(self, diagonal: bool = True) -> Tensor:
        """The law's variance in each coordinate (D,): sum over modes of weight x ((A U)_i row's squared norm +
        (mean_i - overall mean_i)^2), plus the floors (the per-coordinate ones only with `diagonal`); in float64."""
        with torch.no_grad():
            a = self._ambient(self.mixture().to(dtype=torch.float64))
            w, mu, F = a.log_weights.exp()[0], a.mu[0], a.U[0]  # (modes,), (modes, D), (modes, D, r); padding weighs 0
            mean = (w[:, None] * mu).sum(0)
            var = (w[:, None] * (F.pow(2).sum(-1) + (mu - mean).pow(2))).sum(0) + self.floor_value()
            c_diag = self.diagonal_floor() if diagonal else None
            if c_diag is None:
                return var
            return var + (c_diag if c_diag.ndim == 1 else (w[:, None] * c_diag).sum(0)).to(var.dtype)

    def variance_gap(self, diagonal: bool = True) -> float:
        """1 - the law's mean variance per coordinate (`coordinate_variance`, floors included; the per-coordinate
        ones only with `diagonal`): what an isotropic floor must add for the law's total variance to match
        standardised data's (unit variance in every coordinate)."""
        return 1.0 - float(self.coordinate_variance(diagonal).mean())

    def match_variance(self) -> float:
        """Set the floor that fills the law's variance up to the data's (`variance_gap`; none where the
        mixture already has it) and record it in the config; returns the floor."""
        if hasattr(self, "log_floor"):
            raise MolrmogError("this expert trains its floor (learn_floor=True); it is not set by matching")
        self.floor = max(0.0, self.floor + self.variance_gap())
        self.register_to_config(floor=self.floor)
        return self.floor

    @torch.no_grad()
    def match_residual_variance(self, u: Tensor) -> float:
        """Set the isotropic floor from the data u (N, D) and record it in the config; returns it: the shared
        per-coordinate floor of `match_coordinate_variance` averaged over the coordinates (what the modes' factors
        leave of their second moments, per coordinate and overall). Unlike `match_variance` it does not fall to
        0 when the trained law has more total variance than the data but too little about each mode."""
        if hasattr(self, "log_floor"):
            raise MolrmogError("this expert trains its floor (learn_floor=True); it is not set by matching")
        self.floor = 0.0
        c, w = self.mode_residuals(u)
        self.floor = float((w[:, None] * c).sum(0).mean())
        self.register_to_config(floor=self.floor)
        return self.floor

    @torch.no_grad()
    def mode_residuals(self, u: Tensor, floor: float = 1e-3) -> tuple[Tensor, Tensor]:
        """Every mode's per-coordinate second moment about its mean that its factor leaves out, from the data u
        (N, D) it is responsible for, and the modes' shares of the data: (c (L, D), w (L,)), with
        c_li = max(0, sum_n R_nl (u_ni - mu_li)^2 / sum_n R_nl - ||(A U_l)_i||^2 - isotropic floor) and
        w_l = sum_n R_nl / N -- a mixture of factor analysers' noise step with the factors and means held. The
        responsibilities R are those of the law with the isotropic floor that matches the data's total variance
        (at least `floor`, so that every mode has a density; a law with more variance than the data, as DSM
        leaves it, gets `floor`): not of the current per-coordinate floors, so the result does not move with them."""
        law = self._ambient(self.mixture())
        mu, F = law.mu[0], law.U[0]
        u = torch.as_tensor(u).to(dtype=mu.dtype, device=mu.device).flatten(1)
        iso = max(floor, self.variance_gap(diagonal=False) + self.floor_value())
        R = mx.responsibilities(law, u, 1.0, math.sqrt(iso)).reshape(u.shape[0], -1)
        mass = R.sum(0)
        second = torch.einsum("nl,nld->ld", R, (u[:, None] - mu[None]).pow(2)) / mass.clamp_min(1e-12)[:, None]
        return (second - F.pow(2).sum(-1) - self.floor_value()).clamp_min(0), mass / mass.sum()

    @torch.no_grad()
    def match_coordinate_variance(self, u: Tensor) -> Tensor:
        """Set the per-coordinate floor shared by the modes from the data u (N, D), and return it (D,): the
        modes' floors of `mode_residuals` averaged with the modes' shares of the data, c = sum_l w_l c_l (the
        noise of a mixture of factor analysers with one noise covariance, Ghahramani and Hinton 1996, with the
        factors and means held). Needs a model built with `diag_floor="shared"`.

        (A first version filled the law's variance up to the data's in every coordinate. DSM leaves a law with
        more total variance than the data and too little about each mode -- the modes' means spread out, their
        rank-r planes thin -- so that floor came out too small: FID 12.67 against 10.49 with this one, on the
        README's Fashion-MNIST (8, 4) run's trained experts, five sets of exact draws.)"""
        c = getattr(self, "floor_diag", None)
        if c is None or c.ndim != 1:
            raise MolrmogError("this expert has no shared per-coordinate floor; build it with diag_floor='shared'")
        per_mode, w = self.mode_residuals(u)
        c.copy_((w[:, None] * per_mode).sum(0).to(c.dtype))
        return c.detach().clone()

    @torch.no_grad()
    def match_mode_variance(self, u: Tensor, floor: float = 1e-3) -> Tensor:
        """Set every mode's per-coordinate floor from the data u (N, D) it is responsible for, and return it
        (L, D): the per-mode floors of `mode_residuals` (matching again changes nothing). Needs
        `diag_floor="mode"`."""
        c = getattr(self, "floor_diag", None)
        if c is None or c.ndim != 2:
            raise MolrmogError("this expert has no per-mode floor; build it with diag_floor='mode'")
        c.copy_(self.mode_residuals(u, floor)[0].to(c.dtype))
        return c.detach().clone()


class _MixtureExpert(_FloorMixin, ScoreModel):
    """A mixture of n low-rank Gaussians in a d-dim latent (shared by `MoGExpert` and `GaussianExpert`):
    means mu (n, d), factors U (n, d, r), mode logits (n,); its score is `mixture.score`."""

    def _setup(self, d: int, n: int, r: int | None, schedule, init_scale: float, learn_means: bool,
               learn_weights: bool, seed: int, floor: float = 0.0, learn_floor: bool = False,
               diag_floor: str = "none") -> None:
        self._set_schedule(schedule)
        r = d if r is None else r
        _check_expert_dims(d, n, r)
        if not (math.isfinite(floor) and floor >= 0):
            raise MolrmogError(f"floor must be a finite variance >= 0, got {floor}")
        self.d, self.n, self.r = int(d), int(n), int(r)
        self.floor = float(floor)
        if learn_floor:  # a trained floor: exp(log_floor), started at `floor` (or the EM fit's, `init_from_data`)
            self.log_floor = nn.Parameter(torch.tensor(math.log(max(self.floor, 1e-4))))
        if isinstance(diag_floor, bool):  # (a first version of the option stored True / False)
            diag_floor = "shared" if diag_floor else "none"
        if diag_floor not in DIAG_FLOORS:
            raise MolrmogError(f"diag_floor must be one of {', '.join(DIAG_FLOORS)}, got {diag_floor!r}")
        if diag_floor != "none":  # a per-coordinate floor, zero (off) until matched (`match_coordinate_variance`,
            if learn_floor:      # `match_mode_variance`)
                raise MolrmogError("a trained floor (learn_floor) and a per-coordinate floor (diag_floor) exclude "
                                   "each other")
            self.register_buffer("floor_diag", torch.zeros(d) if diag_floor == "shared" else torch.zeros(n, d))
        g = torch.Generator().manual_seed(seed)
        mu = init_scale * torch.randn(n, d, generator=g) if learn_means else torch.zeros(n, d)
        U = init_scale * torch.randn(n, d, r, generator=g) / math.sqrt(d)
        self.U = nn.Parameter(U)
        if learn_means:
            self.mu = nn.Parameter(mu)
        else:
            self.register_buffer("mu", mu)
        if learn_weights:
            self.logit_pi = nn.Parameter(torch.zeros(n))
        else:
            self.register_buffer("logit_pi", torch.zeros(n))

    @property
    def pi(self) -> Tensor:
        return torch.softmax(self.logit_pi, 0)

    def mixture(self) -> mx.Mixture:
        """The expert's low-rank part as a one-subspace `Mixture` (A = I) of its current parameters (without
        the floor: `mixture_for` is the whole law)."""
        log_pi = torch.log_softmax(self.logit_pi, 0)[None]
        return mx.Mixture(torch.zeros(1, dtype=self.U.dtype, device=self.U.device), None, log_pi,
                          self.mu[None], self.U[None])

    def num_parameters(self, *args, **kwargs) -> int:
        """Trained parameters plus the per-coordinate floor's numbers (D, or n D; set from the data, so counted)."""
        extra = self.floor_diag.numel() if getattr(self, "floor_diag", None) is not None else 0
        return super().num_parameters(*args, **kwargs) + extra

    def score(self, z: Tensor, t) -> Tensor:
        c_diag = self.diagonal_floor()
        if c_diag is not None:  # no fold into the noise
            s, g = self.st(z, t)
            if s.ndim or c_diag.ndim == 2:  # a t per row, or a floor per mode: the closed form of the law with
                # the floor in its factor (rank r + D)
                return mx.score(self.mixture_for(z), z, s, g)
            # one t: whiten by the noised floor, D_t = gamma^2 + s^2 (c_iso + c): in w = z / sqrt(D_t) every mode is
            # N(s mu_l / sqrt(D_t), s^2 U'_l U'_l^T + I) with U'_l = U_l / sqrt(D_t), the low-rank closed form at
            # unit noise; the score in z is the score in w divided by sqrt(D_t)
            root = torch.sqrt(g**2 + s**2 * (c_diag.to(z.dtype) + self.floor_value()))
            m = self.mixture().to(dtype=z.dtype, device=z.device)
            w = mx.Mixture(m.log_w, None, m.log_pi, m.mu / root, m.U / root[:, None])
            return mx.score(w, z / root, s, torch.ones_like(g)) / root
        if mx.use_fused(z) and not torch.is_grad_enabled() and torch.as_tensor(t).ndim == 0:
            # inference at one t (sampling): the whole evaluation -- schedule, the expert's mixture, the
            # closed form -- as one compiled graph (`molrmog.core.mixture.FUSED`)
            s, g = self._st_floored(z, t)
            return mx.compile_once(_mixture_expert_score)(self.logit_pi, self.mu, self.U, z, s, g)
        return mx.score(self.mixture(), z, *self._st_floored(z, t))

    @torch.no_grad()
    def init_from_data(self, z: Tensor, seed: int = 0, max_iter: int = 100) -> _MixtureExpert:
        """The closed-form start: EM for a mixture of PPCA (`molrmog.core.em`) -- means, rank-r factors W_l, weights;
        U_l = W_l. The fit's floors s_l^2, log-likelihood and iterations are kept in `em_info`."""
        from molrmog.core.em import fit_mppca

        z = torch.as_tensor(z)
        if z.ndim != 2 or z.shape[1] != self.d or z.shape[0] < 2:
            raise MolrmogError(f"init data must have shape (N >= 2, d = {self.d}), got {tuple(z.shape)}")
        learn_means = isinstance(self.mu, nn.Parameter)
        fit = fit_mppca(z, self.n, self.r, zero_mean=not learn_means, seed=seed, max_iter=max_iter)
        self.mu.copy_(fit.mu.to(self.mu.dtype))
        if isinstance(self.U, nn.Parameter):
            self.U.copy_(fit.W.to(self.U.dtype))
        elif parametrize.is_parametrized(self, "U"):  # a packed Cholesky factor (`PackedTril`): U U^T = W W^T
            self.U = fit.W.to(self.U.dtype)
        if isinstance(self.logit_pi, nn.Parameter):
            self.logit_pi.copy_(torch.log(fit.pi).to(self.logit_pi.dtype))
        if hasattr(self, "log_floor"):  # the fit's floors s_l^2, weighted by the modes' weights
            self.log_floor.copy_(torch.log((fit.pi * fit.s2).sum().clamp_min(1e-4)).to(self.log_floor.dtype))
        self.em_info = {"loglik": fit.loglik, "iterations": fit.iterations, "floor_s2": fit.s2.tolist(),
                        "floor_s2_median": float(fit.s2.median())}
        return self


def _mixture_expert_score(logit_pi: Tensor, mu: Tensor, U: Tensor, z: Tensor, s: Tensor, g: Tensor) -> Tensor:
    """`_MixtureExpert.score` at one (s, gamma) as one function of tensors (what the fused path compiles)."""
    log_w = torch.zeros(1, dtype=U.dtype, device=U.device)
    log_p, R, m, ok = mx.scalar_terms_fused(log_w[:, None] + torch.log_softmax(logit_pi, 0)[None], None, mu[None],
                                            U[None], z, s, g)
    return (m - z) / g**2


class MoGExpert(_MixtureExpert):
    """Learnable MoG score in a d-dim latent: means mu (n, d), factors U (n, d, r), mode logits (n,). Optional
    floors, set from the data after training (or trained: `learn_floor`): an isotropic one (config `floor`),
    N(mu_l, U_l U_l^T + floor I), a mixture of probabilistic PCA (`match_residual_variance` sets it from the data,
    `match_variance` so that the law has the data's total variance); or, with `diag_floor`, a per-coordinate one,
    one per mode, N(mu_l, U_l U_l^T + diag(c_l)) as in a mixture of factor analysers ("mode":
    `match_mode_variance` sets it from the data each mode is responsible for), or one noise covariance shared by
    the modes ("shared": `match_coordinate_variance`, those floors averaged with the modes' shares of the data)."""

    @register_to_config
    def __init__(self, d: int, n: int = 4, r: int | None = None, schedule="vp", init_scale: float = 1.0,
                 learn_means: bool = True, learn_weights: bool = True, seed: int = 0, floor: float = 0.0,
                 learn_floor: bool = False, diag_floor: str = "none"):
        super().__init__()
        self._setup(d, n, r, schedule, init_scale, learn_means, learn_weights, seed, floor, learn_floor,
                    diag_floor)


class GaussianExpert(_MixtureExpert):
    """MoLRG expert: one zero-mean Gaussian N(0, U U^T) in the latent; its score is linear in z."""

    @register_to_config
    def __init__(self, d: int, r: int | None = None, schedule="vp", init_scale: float = 1.0, seed: int = 0,
                 learn_factors: bool = True):
        super().__init__()
        self._setup(d, 1, r, schedule, init_scale, learn_means=False, learn_weights=False, seed=seed)
        if not learn_factors:  # the MoLRG parameterisation of the theory: U = I_d, only A_k is learnt
            if self.r != self.d:
                raise MolrmogError(f"learn_factors=False fixes U = I and needs r = d, got r = {self.r}")
            del self.U
            self.register_buffer("U", torch.eye(self.d)[None])


class MoEScore(_FloorMixin, ScoreModel):
    """Mixture-of-experts score in R^D: K MoG experts (or, with gaussian=True, one zero-mean Gaussian each:
    MoLRG) on orthonormal subspaces A_k -- the MoLR-MoG law as a learnable model.

    A_k = Q(W_k) from a QR factorisation (sign-fixed), so A_k^T A_k = I holds exactly; the
    subspace weights w_k are learnable logits. The score is `mixture.score` of the stacked
    parameters: gating by closed-form responsibilities. full_cov=True gives every mode a full covariance in
    its subspace (r = d, a packed Cholesky factor: d (d + 1) / 2 numbers, `PackedTril`); `floor` (a variance)
    adds floor * I in R^D to every mode (folded into the noise, as for the MoG expert), so the law has
    density off the subspaces (`match_variance` sets it to the data's total variance).
    """

    @register_to_config
    def __init__(self, D: int, K: int, d: int, n: int = 2, r: int | None = None, schedule="vp",
                 gaussian: bool = False, init_scale: float = 1.0, seed: int = 0, learn_factors: bool = True,
                 full_cov: bool = False, floor: float = 0.0):
        super().__init__()
        self._set_schedule(schedule)
        r = d if r is None else r
        if int(K) < 1:
            raise MolrmogError(f"K (number of experts) must be >= 1, got {K}")
        if int(d) > int(D):
            raise MolrmogError(f"latent d = {d} must not exceed the ambient D = {D}")
        _check_expert_dims(d, n, r)
        if full_cov and int(r) != int(d):
            raise MolrmogError(f"full_cov gives every mode a full covariance in its subspace: it needs r = d = {d}, "
                               f"got r = {r}")
        if not (math.isfinite(floor) and floor >= 0):
            raise MolrmogError(f"floor must be a finite variance >= 0, got {floor}")
        self.D, self.K, self.d = int(D), int(K), int(d)
        self.floor = float(floor)
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(K, D, d, generator=g))
        self.logit_w = nn.Parameter(torch.zeros(K))
        make = (lambda k: MoGExpert(d, n, r, schedule, init_scale, seed=seed + 1 + k)) if not gaussian \
            else (lambda k: GaussianExpert(d, r, schedule, init_scale, seed=seed + 1 + k,
                                           learn_factors=learn_factors))
        self.experts = nn.ModuleList([make(k) for k in range(K)])
        if full_cov:
            for e in self.experts:
                parametrize.register_parametrization(e, "U", PackedTril(d))

    @property
    def A(self) -> Tensor:
        """(K, D, d) orthonormal bases."""
        Q, R = torch.linalg.qr(self.W)
        sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return Q * sign[:, None, :]

    def mixture(self) -> mx.Mixture:
        """The law without the floor (`mixture_for` is the whole law)."""
        e = self.experts
        return mx.Mixture(
            torch.log_softmax(self.logit_w, 0), self.A,
            torch.stack([torch.log_softmax(x.logit_pi, 0) for x in e]),
            torch.stack([x.mu for x in e]), torch.stack([x.U for x in e]))

    def score(self, x: Tensor, t) -> Tensor:
        return mx.score(self.mixture(), x, *self._st_floored(x, t))

    @torch.no_grad()
    def init_from_data(self, x: Tensor, seed: int = 0, restarts: int = 5, basis_scale: float = 1.0) -> MoEScore:
        """Data-driven start: K-subspaces clustering for A_k, then each expert's own data-driven init.
        W_k = basis_scale x the found orthonormal basis: A_k is the same for any scale (QR), but the scale sets
        how far one optimiser step turns it (sqrt(D) gives W's entries the size of the random start's)."""
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.D or x.shape[0] < 1:
            raise MolrmogError(f"init data must have shape (N >= 1, D = {self.D}), got {tuple(x.shape)}")
        bases, labels = k_subspaces(x, self.K, self.d, seed=seed, restarts=restarts)
        self.W.copy_((basis_scale * bases).to(self.W.dtype))
        counts = torch.bincount(labels, minlength=self.K).double()
        self.logit_w.copy_(torch.log((counts + 1) / (counts.sum() + self.K)).to(self.logit_w.dtype))
        A = self.A
        off = 0.0
        for k, e in enumerate(self.experts):
            xk = x[labels == k]
            if xk.shape[0] == 0:
                xk = x
            xk = xk.to(A.dtype)
            e.init_from_data((xk @ A[k]), seed=seed + k)
            off += float((xk - (xk @ A[k]) @ A[k].T).pow(2).sum()) / (x.shape[0] * self.D)
        s2 = [v for e in self.experts for v in e.em_info["floor_s2"]]
        # the fits' in-subspace floors, and the data's variance per coordinate off the subspaces
        self.em_info = {"floor_s2": s2, "floor_s2_median": float(torch.tensor(s2).median()),
                        "off_subspace_variance": off}
        return self


def _aligned_neighbour_labels(x: Tensor, K: int, d: int, g: torch.Generator) -> Tensor:
    """Start for K-subspaces: per seed point, PCA of its most aligned (|cos|) neighbours; each new
    seed is drawn among the points the bases found so far explain worst."""
    N, D = x.shape
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unexplained = torch.ones(N, dtype=x.dtype)
    bases = []
    for _ in range(K):
        pool = unexplained.topk(max(1, N // (2 * K))).indices
        i = pool[torch.randint(0, pool.numel(), (1,), generator=g)].item()
        nb = (xn @ xn[i]).abs().topk(min(N, 4 * d + 4, max(d + 1, N // (2 * K)))).indices
        V = torch.linalg.svd(x[nb], full_matrices=False)[2][:d].T  # (D, <= d)
        bases.append(V)
        unexplained = torch.minimum(unexplained, 1 - ((xn @ V) ** 2).sum(1))
    resid = torch.stack([1 - ((xn @ V) ** 2).sum(1) for V in bases], 1)
    return resid.argmin(1)


def k_subspaces(x: Tensor, K: int, d: int, seed: int = 0, restarts: int = 5, iters: int = 50):
    """K-subspaces clustering (alternate: assign to the subspace with the smallest residual,
    refit each basis by PCA through the origin). Returns bases (K, D, d) and labels (N,)."""
    x = torch.as_tensor(x).double()
    N, D = x.shape
    g = torch.Generator().manual_seed(seed)
    best, best_cost = None, math.inf
    for _ in range(max(1, restarts)):
        labels = _aligned_neighbour_labels(x, K, d, g)
        bases = torch.zeros(K, D, d, dtype=torch.float64)
        for _ in range(iters):
            for k in range(K):
                xk = x[labels == k]
                if xk.shape[0] < 1:
                    xk = x[torch.randint(0, N, (d + 1,), generator=g)]
                _, _, Vt = torch.linalg.svd(xk, full_matrices=True)
                V = Vt[: min(d, Vt.shape[0])].T
                if V.shape[1] < d:  # fewer points than d: complete with random orthogonal directions
                    extra = torch.randn(D, d - V.shape[1], generator=g, dtype=torch.float64)
                    V = torch.linalg.qr(torch.cat([V, extra], 1))[0]
                bases[k] = V
            resid = (x * x).sum(1)[:, None] - ((x @ bases.permute(1, 0, 2).reshape(D, K * d))
                                                .view(N, K, d) ** 2).sum(-1)
            new = resid.argmin(1)
            if torch.equal(new, labels):
                break
            labels = new
        cost = resid.min(1).values.sum().item()
        if cost < best_cost:
            best, best_cost = (bases.clone(), labels.clone()), cost
    return best


def precondition_eps(x_in: Tensor, out: Tensor, s: Tensor, g: Tensor, data_std: float) -> Tensor:
    """EDM-style eps (Karras et al. 2022, Table 1, in eps form): eps = c_skip x_in + c_out F with n^2 = s^2
    data_std^2 + gamma^2, x_in = x / n, c_skip = gamma / n (the exact E[eps | x] for N(0, data_std^2) data)
    and c_out = s data_std / n (its posterior std): at large t the network's error is scaled away, so
    Tweedie's x0 = (x - gamma eps) / s does not blow it up by gamma / s."""
    n = torch.sqrt((s * data_std) ** 2 + g**2)[:, None]
    return (g[:, None] / n) * x_in + (s[:, None] * data_std / n) * out


class MLPScore(ScoreModel):
    """Unstructured baseline: an MLP eps-predictor with a Fourier time embedding; score = -eps / gamma.
    precondition=True wraps it as `precondition_eps` (as the U-Net expert)."""

    @register_to_config
    def __init__(self, D: int, hidden: int = 256, depth: int = 3, emb: int = 32, schedule="vp",
                 data_std: float = 1.0, seed: int = 0, precondition: bool = False):
        super().__init__()
        self._set_schedule(schedule)
        if int(D) < 1 or int(hidden) < 1 or int(depth) < 1:
            raise MolrmogError(f"D, hidden and depth must be >= 1, got {D}, {hidden}, {depth}")
        self.D, self.data_std, self.precondition = int(D), float(data_std), bool(precondition)
        self.register_buffer("freqs", torch.randn(emb // 2, generator=torch.Generator().manual_seed(seed)))
        with torch.random.fork_rng():  # seeded weights without touching the global RNG
            torch.manual_seed(seed)
            layers, width = [], D + 2 * (emb // 2)
            for _ in range(depth):
                layers += [nn.Linear(width, hidden), nn.SiLU()]
                width = hidden
            layers.append(nn.Linear(width, D))
            self.net = nn.Sequential(*layers)

    def score(self, x: Tensor, t) -> Tensor:
        s, g = self.st(x, t)
        s, g = s.expand(x.shape[0]), g.expand(x.shape[0])
        c_noise = torch.log(g / s)[:, None] / 4  # log sigma, EDM-style
        ang = 2 * math.pi * c_noise * self.freqs
        c_in = 1 / torch.sqrt((s * self.data_std) ** 2 + g**2)[:, None]  # unit-variance input
        eps = self.net(torch.cat([x * c_in, torch.sin(ang), torch.cos(ang)], 1))
        if self.precondition:
            eps = precondition_eps(x * c_in, eps, s, g, self.data_std)
        return -eps / g[:, None]


class UNetScore(ScoreModel):
    """Latent U-Net baseline: diffusers' `UNet2DModel` (small) predicting eps on a (c, h, w) latent,
    padded to an even size; score = -eps / gamma. Inputs and outputs are flat (B, c h w).

    precondition=True (what the pipeline trains) writes eps = c_skip x_in + c_out F(x_in) with
    x_in = u / sqrt(s^2 + gamma^2), c_skip = gamma / sqrt(s^2 + gamma^2) (the exact E[eps | x] for
    standardised N(0, I) data) and c_out = s / sqrt(s^2 + gamma^2) (its posterior std), as in EDM:
    at large t the network's error is scaled away, so the long VP horizon does not amplify it.
    Without it (old runs) the raw network output is eps."""

    @register_to_config
    def __init__(self, latent=(2, 4, 4), width: int = 32, schedule="vp", seed: int = 0,
                 precondition: bool = True):
        super().__init__()
        self._set_schedule(schedule)
        from diffusers import UNet2DModel

        self.precondition = bool(precondition)
        self.latent = tuple(int(v) for v in latent)
        c, h, w = self.latent
        self.pad = (-h) % 2
        groups = min(8, width)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.unet = UNet2DModel(
                sample_size=h + self.pad, in_channels=c, out_channels=c, layers_per_block=1,
                block_out_channels=(width, 2 * width), down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=groups)

    def score(self, u: Tensor, t) -> Tensor:
        s, g = self.st(u, t)
        B = u.shape[0]
        s, g = s.expand(B), g.expand(B)
        c, h, w = self.latent
        x = (u / torch.sqrt(s**2 + g**2)[:, None]).view(B, c, h, w)  # unit-variance input (u standardised)
        x = F.pad(x, (0, self.pad, 0, self.pad))
        timestep = self.schedule.timestep(torch.as_tensor(t, dtype=torch.float64), u, B)
        out = self.unet(x, timestep).sample[:, :, :h, :w].reshape(B, -1)
        if self.precondition:  # EDM-style: exact eps for N(0, I) data plus a correction scaled by its std
            norm = torch.sqrt(s**2 + g**2)[:, None]
            eps = (g[:, None] / norm) * x[:, :, :h, :w].reshape(B, -1) + (s[:, None] / norm) * out
        else:
            eps = out
        return -eps / g[:, None]


def load_model(directory: str | os.PathLike) -> ScoreModel:
    """Rebuild any score model saved with `save` / `save_pretrained` (checked; see `molrmog.core.artefacts`)."""
    return ScoreModel.load(directory, "score model")
