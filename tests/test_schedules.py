import pytest
import torch

from molrmog.core.schedules import SCHEDULES, get_schedule, karras_grid, logsnr_grid, make_grid, uniform_grid

NAMES = list(SCHEDULES.names())  # every registered schedule is checked


def test_the_registry_holds_the_schedules_users_ask_for():
    assert {"vp", "ve", "cosine", "flow"} <= set(NAMES) and "edm" not in NAMES  # an alias, not a choice
    assert type(get_schedule("edm")) is type(get_schedule("ve"))
    with pytest.raises(ValueError, match="unknown schedule 'nope'; choose one of vp, ve, cosine, flow"):
        get_schedule("nope")


def test_flow_schedule_is_the_rectified_flow_interpolation():
    sched = get_schedule("flow")
    t = torch.tensor([0.001, 0.25, 0.5, 0.9, 0.999], dtype=torch.float64)
    assert torch.allclose(sched.s(t), 1 - t) and torch.allclose(sched.gamma(t), t)
    assert torch.allclose(sched.sigma(t), t / (1 - t))
    with pytest.raises(ValueError, match="t_max < 1"):
        get_schedule("flow", t_max=1.0)


def _times(sched):
    return torch.linspace(sched.t_min, sched.t_max * 0.9, 7, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_autograd(name):
    sched = get_schedule(name)
    for t0 in _times(sched):
        t = t0.clone().requires_grad_(True)
        for f, df in ((sched.s, sched.ds), (sched.sigma, sched.dsigma), (sched.gamma, sched.dgamma)):
            out = f(t)
            g = torch.autograd.grad(out, t)[0] if out.requires_grad else torch.zeros_like(t0)
            assert torch.allclose(g, df(t0), rtol=1e-8, atol=1e-10), (name, f.__name__, float(t0))


@pytest.mark.parametrize("name", NAMES)
def test_gamma_is_s_sigma_and_inverse(name):
    sched = get_schedule(name)
    t = _times(sched)
    assert torch.allclose(sched.gamma(t), sched.s(t) * sched.sigma(t), rtol=1e-10)
    assert torch.allclose(sched.t_of_sigma(sched.sigma(t)), t, rtol=1e-8, atol=1e-10)


def test_vp_closed_forms():
    sched = get_schedule("vp")
    t = torch.tensor([0.01, 0.5, 3.0], dtype=torch.float64)
    assert torch.allclose(sched.s(t), torch.exp(-t))
    assert torch.allclose(sched.gamma(t), torch.sqrt(1 - torch.exp(-2 * t)))
    # VP: s^2 + gamma^2 = 1; same for cosine
    cos = get_schedule("cosine")
    tc = torch.tensor([0.0, 0.3, 0.9], dtype=torch.float64)
    assert torch.allclose(cos.s(tc) ** 2 + cos.gamma(tc) ** 2, torch.ones(3, dtype=torch.float64))
    assert abs(cos.s(torch.tensor(0.0)).item() - 1) < 1e-12


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grid", [uniform_grid, logsnr_grid, karras_grid])
def test_grids_decrease_between_endpoints(name, grid):
    sched = get_schedule(name)
    ts = grid(sched, 12)
    assert ts.shape == (13,)
    assert (ts[1:] < ts[:-1]).all()
    assert ts[0].item() == pytest.approx(sched.t_max) and ts[-1].item() == pytest.approx(sched.t_min)


def test_logsnr_grid_is_uniform_in_log_sigma():
    sched = get_schedule("vp")
    ls = torch.log(sched.sigma(logsnr_grid(sched, 10)))
    steps = ls[1:] - ls[:-1]
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-6)


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="t_min"):
        get_schedule("vp", t_min=1.0, t_max=0.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("linear-ish")
    with pytest.raises(ValueError, match="range"):
        get_schedule("vp").check_t(100.0)
    with pytest.raises(ValueError, match="range"):
        get_schedule("vp").check_t(torch.tensor([0.5, -1.0]))
    with pytest.raises(ValueError, match="at least 1 step"):
        make_grid(get_schedule("ve"), 0)
    with pytest.raises(ValueError, match="unknown grid"):
        make_grid(get_schedule("ve"), 3, "weird")
