"""The exact reverse step of a MoLR-MoG: 1- and 2-step samples pass the same tests as `dist.sample`; one
step at an intermediate time reproduces the forward marginal; experts sample their own law exactly."""

import math

import pytest
import torch

from molrmog.core import mixture as mx
from molrmog.core.distributions import GaussianMixture
from molrmog.core.metrics import energy_distance
from molrmog.core.samplers import generate, sample_exact
from molrmog.core.schedules import make_grid
from molrmog.models.experts import MoGExpert
from molrmog.models.kinds import LatentExpert, get_kind
from tests.conftest import ragged_molrmog


def _check_like_dist_sample(dist, x):
    """The checks `dist.sample` passes (tests/test_mixture.py), on samples whose labels are unknown: a point
    is assigned to the component whose subspace holds it and that explains it best (responsibilities at a
    tiny t)."""
    N = x.shape[0]
    lab = dist.responsibilities(x, dist.schedule.t_min).flatten(1).argmax(1)
    L = dist.mixture.L
    wts = dist.mode_weights.flatten()
    freq = torch.bincount(lab, minlength=wts.numel()).double() / N
    se = torch.sqrt(wts * (1 - wts) / N).clamp_min(1e-12)
    assert ((freq - wts).abs() / se).max() < 4.5
    mean, cov = dist.component_moments()
    for k in range(dist.K):
        for l in range(dist.n[k]):
            xs = x[lab == k * L + l]
            nc, C = xs.shape[0], cov[k, l]
            z = (xs.mean(0) - mean[k, l]).abs() / torch.sqrt(torch.diagonal(C) / nc).clamp_min(1e-12)
            assert z.max() < 5, (k, l, z.max())
            emp = torch.cov(xs.T)
            var = (C**2 + torch.outer(torch.diagonal(C), torch.diagonal(C))) / nc
            assert torch.linalg.norm(emp - C) < 5 * var.sum().sqrt() + 1e-10
            A = dist.mixture.A[k, :, : dist.d[k]]  # an exact x_0 lies in its subspace
            assert torch.allclose(xs - xs @ A @ A.T, torch.zeros_like(xs), atol=1e-8)


@pytest.mark.parametrize("steps", [1, 2])
def test_one_and_two_exact_steps_sample_the_distribution(steps):
    dist = ragged_molrmog(3)
    N = 40_000
    g = torch.Generator().manual_seed(steps)
    ts = make_grid(dist.schedule, steps, "karras")
    x = generate(dist.score, N, dist.D, dist.schedule, ts, "exact", generator=g)
    _check_like_dist_sample(dist, x)
    truth, _ = dist.sample(2000, g)
    ref, _ = dist.sample(2000, g)
    floor = energy_distance(truth, ref)
    assert energy_distance(x[:2000], truth) < 3 * floor + 1e-3


def test_one_exact_step_between_two_times_gives_the_forward_marginal():
    dist = ragged_molrmog(5)
    g = torch.Generator().manual_seed(0)
    N = 200_000
    x0, _ = dist.sample(N, g)
    sched = dist.schedule
    t, s = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    xt = dist.noise(x0, t, g)
    xs = mx.reverse_step(dist.mixture, xt, sched.s(t).item(), sched.gamma(t).item(), sched.s(s).item(),
                         sched.gamma(s).item(), g)
    direct = dist.noise(dist.sample(N, g)[0], s, g)  # the forward marginal at s
    scale = torch.diagonal(torch.cov(direct.T)).mean().sqrt()
    assert (xs.mean(0) - direct.mean(0)).abs().max() < 0.02 * scale
    assert (torch.cov(xs.T) - torch.cov(direct.T)).abs().max() < 0.03 * scale**2


@pytest.mark.parametrize("schedule", ["vp", "ve", "cosine"])
def test_the_bridge_composes_with_the_forward_process(schedule):
    """x_t = s_t x_0 + g_t eps and x_s = a x_t + b x_0 + sqrt(v) xi give x_s | x_0 ~ N(s_s x_0, g_s^2):
    a s_t + b = s_s and a^2 g_t^2 + v = g_s^2; at s = 0 the step is the posterior itself (a = v = 0, b = 1)."""
    from molrmog.core.schedules import get_schedule

    sch = get_schedule(schedule)
    for t, s in ((0.9, 0.3), (0.5, 0.49), (0.2, 0.01)):
        t, s = t * sch.t_max, s * sch.t_max
        st, gt, ss, gs = (float(v) for v in (sch.s(t), sch.gamma(t), sch.s(s), sch.gamma(s)))
        a, b, v = mx.bridge(st, gt, ss, gs)
        assert a * st + b == pytest.approx(ss, rel=1e-12)
        assert a**2 * gt**2 + v == pytest.approx(gs**2, rel=1e-12)
    assert mx.bridge(0.4, 0.9, 1.0, 0.0) == (0.0, pytest.approx(1.0), 0.0)


def test_an_expert_samples_its_own_law_exactly():
    e = MoGExpert(6, n=3, r=2, seed=2).double()
    with torch.no_grad():
        e.mu.mul_(3)
    law = GaussianMixture(e.mu.detach(), e.U.detach(), pi=e.pi.detach())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = generate(e, 4000, 6, e.schedule, make_grid(e.schedule, 2, "karras"), "exact", generator=g)
    truth, _ = law.sample(4000, g)
    ref, _ = law.sample(4000, g)
    assert energy_distance(x, truth) < 3 * energy_distance(ref, truth) + 1e-3
    lat = (2, 4, 4)
    unet = LatentExpert.wrap("unet", lat, get_kind("unet").build(lat, get_kind("unet").options(), {"name": "vp"}, 0))
    with pytest.raises(ValueError, match="needs a closed-form mixture"):
        sample_exact(unet, torch.zeros(2, 32), make_grid(unet.schedule, 2, "karras"), unet.schedule)
    assert math.isfinite(float(x.abs().max()))


def test_few_step_experiment_writes_its_table_and_exact_is_at_the_noise_floor(tmp_path):
    from molrmog.experiments.few_step import METHODS, run_few_step

    res = run_few_step(tmp_path, "quick", progress=False, train_n=1000, train_steps=60, eval_n=600, steps=[1, 2, 8])
    assert {r["method"] for r in res["rows"]} == set(METHODS) == {"exact", "gaussian_exact_mean", "ode_exact",
                                                                   "vanilla", "smd"}
    assert {"method", "steps", "energy_distance", "sliced_w2", "mode_weight_error"} <= set(res["rows"][0])
    for f in ("few_step.csv", "few_step.json", "few_step.png"):
        assert (tmp_path / f).is_file()
    ed = {(r["method"], r["steps"]): r["energy_distance"] for r in res["rows"]}
    floor = res["true_vs_true"]
    for steps in (1, 2, 8):
        assert ed["exact", steps] < 3 * floor + 1e-3, (steps, ed["exact", steps], floor)
    assert ed["gaussian_exact_mean", 1] > 20 * ed["exact", 1]  # the Gaussian step's own error, at the exact mean
