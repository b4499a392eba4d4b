"""Samplers with the exact analytic score reproduce the target; deterministic ones agree with diffusers."""

import numpy as np
import pytest
import torch

from molrmog.core.distributions import MoLRMoG
from molrmog.core.metrics import energy_distance
from molrmog.core.samplers import SAMPLERS, generate, sample_ddim, sample_dpmpp_2m
from molrmog.core.schedules import Schedule, make_grid

STEPS = {"euler": 200, "heun": 40, "ddim": 100, "dpmpp_2m": 40, "euler_maruyama": 400, "ddpm": 200, "exact": 3}


@pytest.fixture(scope="module")
def target():
    return MoLRMoG.random(8, 2, 3, 2, separation=5.0, seed=4)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_with_exact_score_matches_target(name, target):
    n = 1500
    gen = torch.Generator().manual_seed(0)
    data, _ = target.sample(n, gen)
    ref, _ = target.sample(n, gen)
    ts = make_grid(target.schedule, STEPS[name], "karras")
    x = generate(target.score, n, target.D, target.schedule, ts, name, generator=gen)
    floor = energy_distance(ref, data)
    ed = energy_distance(x, data)
    assert ed < 3 * floor + 0.01, f"{name}: energy distance {ed:.4f} vs true-vs-true {floor:.4f}"
    # mode weights of the generated points within 3 standard errors
    lab = target.responsibilities(x, target.schedule.t_min).flatten(1).argmax(1)
    w = target.mode_weights.flatten()
    freq = torch.bincount(lab, minlength=w.numel()).double() / n
    se = torch.sqrt(w * (1 - w) / n)
    mask = w > 0
    assert ((freq - w).abs()[mask] / se[mask]).max() < 3


class DiscreteVP(Schedule):
    """A schedule read off diffusers' alphas_cumprod at integer timesteps; t = -1 is the clean end."""

    name = "discrete"

    def __init__(self, alphas_cumprod):
        super().__init__(-1.0, float(len(alphas_cumprod) - 1))
        self.ac = torch.as_tensor(np.concatenate([[1.0], np.asarray(alphas_cumprod, dtype=np.float64)]))

    def _a(self, t):
        return self.ac[torch.as_tensor(t).round().long() + 1]

    def s(self, t):
        return torch.sqrt(self._a(t))

    def sigma(self, t):
        a = self._a(t)
        return torch.sqrt((1 - a) / a)


def _eps_model(x, t):
    """An arbitrary smooth eps-prediction shared by both implementations."""
    W = torch.linspace(-1, 1, x.shape[1] ** 2, dtype=x.dtype).view(x.shape[1], x.shape[1])
    return torch.tanh(x @ W) * (0.3 + float(t) / 1000) + 0.1 * x


def _score_from_eps(sched):
    def score(x, t):
        return -_eps_model(x, t) / sched.gamma(t).item()
    return score


def test_ddim_agrees_with_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ds = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                 set_alpha_to_one=True, prediction_type="epsilon")
    ds.set_timesteps(25)
    x0 = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x0.clone()
    for t in ds.timesteps:
        x = ds.step(_eps_model(x, t), t, x, eta=0.0).prev_sample
    sched = DiscreteVP(ds.alphas_cumprod.double().numpy())
    ts = torch.cat([ds.timesteps.double(), torch.tensor([-1.0], dtype=torch.float64)])
    ours = sample_ddim(_score_from_eps(sched), x0.clone(), ts, sched)
    assert torch.allclose(ours, x.double(), atol=1e-4, rtol=1e-4), (ours - x).abs().max()


def test_dpmpp_2m_agrees_with_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ds = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", prediction_type="epsilon")
    ds.set_timesteps(20)
    x0 = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x0.clone()
    for t in ds.timesteps:
        x = ds.step(_eps_model(x, t), t, x).prev_sample
    sched = DiscreteVP(ds.alphas_cumprod.double().numpy())
    ts = torch.cat([ds.timesteps.double(), torch.tensor([-1.0], dtype=torch.float64)])
    ours = sample_dpmpp_2m(_score_from_eps(sched), x0.clone(), ts, sched)
    assert torch.allclose(ours, x.double(), atol=1e-4, rtol=1e-4), (ours - x).abs().max()


def test_flow_schedule_euler_agrees_with_diffusers_flow_match_euler():
    """The flow schedule's PF-ODE drift is the velocity E[eps - x0 | x_t]: our Euler steps with any velocity model
    (turned into a score) are diffusers' FlowMatchEulerDiscreteScheduler steps on the same sigmas (t = sigma)."""
    diffusers = pytest.importorskip("diffusers")
    from molrmog.core.samplers import sample_euler
    from molrmog.core.schedules import get_schedule

    ds = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ds.set_timesteps(sigmas=np.linspace(0.999, 0.02, 20).tolist())  # shifted by diffusers, then 0 appended

    def velocity(x, t):
        return _eps_model(x, 1000 * float(t)) - 0.5 * x

    x0 = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = x0.float()
    for t, sig in zip(ds.timesteps, ds.sigmas[:-1], strict=True):
        x = ds.step(velocity(x.double(), sig).float(), t, x).prev_sample
    sched = get_schedule("flow")

    def score(x, t):  # v = -(x + t score) / (1 - t)  <=>  score = -((1 - t) v + x) / t
        t = float(t)
        return -((1 - t) * velocity(x, t) + x) / t

    ours = sample_euler(score, x0.clone(), ds.sigmas.double(), sched)
    assert ds.sigmas[0] < 0.9999 and ds.sigmas[-1] == 0
    assert torch.allclose(ours, x.double(), atol=2e-4, rtol=1e-4), (ours - x).abs().max()


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "exact"])
def test_flow_schedule_samples_the_target_with_its_exact_score(name):
    target = MoLRMoG.random(8, 2, 3, 2, separation=5.0, seed=4, schedule="flow")
    n, gen = 1500, torch.Generator().manual_seed(0)
    data, _ = target.sample(n, gen)
    ref, _ = target.sample(n, gen)
    ts = make_grid(target.schedule, STEPS[name], "karras")
    x = generate(target.score, n, target.D, target.schedule, ts, name, generator=gen)
    assert energy_distance(x, data) < 3 * energy_distance(ref, data) + 0.01


def test_samplers_reject_bad_grids(target):
    x = torch.zeros(2, target.D, dtype=torch.float64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_ddim(target.score, x, torch.tensor([0.1, 0.5], dtype=torch.float64), target.schedule)
    with pytest.raises(ValueError, match="at least 2 times"):
        sample_ddim(target.score, x, torch.tensor([0.5], dtype=torch.float64), target.schedule)
