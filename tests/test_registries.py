"""Registries for every name list (issue 19): the README's "adding a schedule, a sampler, a dataset" blocks run as
written, and the new entry then works through the library and the command line, with nothing else touched."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from molrmog.cli import main
from molrmog.core.distributions import MoLRMoG
from molrmog.core.metrics import energy_distance
from molrmog.core.registry import Registry
from molrmog.core.samplers import SAMPLERS, generate
from molrmog.core.schedules import SCHEDULES, get_schedule, make_grid
from molrmog.pipeline.data import DATASETS, load_dataset
from tests.conftest import tiny


def _readme_block(heading: str, n: int) -> str:
    """The n-th (from 0) ```python block after `heading` in the README, as written there."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return text[text.index(heading):].split("```python\n")[n + 1].split("```")[0]


HEADING = "### Adding a schedule, a sampler, a dataset"


@pytest.fixture
def added(request):
    """Run the README block `request.param` = (index, registry, name); remove the entry afterwards."""
    index, registry, name = request.param
    assert name not in registry  # the example must add a new entry
    exec(compile(_readme_block(HEADING, index), "README.md", "exec"), {})
    assert name in registry
    yield registry.get(name)
    registry.unregister(name)


def test_a_registry_names_its_choices_and_refuses_clashes():
    r = Registry("colour")
    r.register("red", 1, aliases=("rouge",))

    @r.register("blue")
    def blue():
        return 2

    assert r.names() == ("red", "blue") and r["rouge"] == 1 and "rouge" in r and list(r) == ["red", "blue"]
    with pytest.raises(ValueError, match="unknown colour 'green'; choose one of red, blue"):
        r.get("green")
    with pytest.raises(ValueError, match="already registered"):
        r.register("red", 3)
    with pytest.raises(ValueError, match="already registered"):
        r.register("rouge", 3)
    with pytest.raises(ValueError, match="without ':'"):
        r.register("a:b", 3)
    r.register("red", 4, replace=True)
    assert r["red"] == 4
    r.unregister("blue")
    assert r.names() == ("red",)


@pytest.mark.parametrize("added", [(0, SCHEDULES, "subvp")], indirect=True)
def test_readme_schedule_block_adds_a_schedule_for_the_maths_and_the_command_line(added, digits_run, tmp_path):
    sched = get_schedule("subvp")
    for t0 in torch.linspace(0.01, 3.0, 5, dtype=torch.float64):  # its derivatives are those of its s and sigma
        t = t0.clone().requires_grad_(True)
        for f, df in ((sched.s, sched.ds), (sched.sigma, sched.dsigma), (sched.gamma, sched.dgamma)):
            assert torch.allclose(torch.autograd.grad(f(t), t)[0], df(t0), rtol=1e-8)
        assert torch.allclose(sched.t_of_sigma(sched.sigma(t0)), t0)
    target = MoLRMoG.random(8, 2, 3, 2, separation=5.0, seed=4, schedule="subvp")  # the closed forms use it
    gen = torch.Generator().manual_seed(0)
    data, _ = target.sample(1500, gen)
    ref, _ = target.sample(1500, gen)
    x = generate(target.score, 1500, target.D, target.schedule, make_grid(target.schedule, 40), "heun", generator=gen)
    assert energy_distance(x, data) < 3 * energy_distance(ref, data) + 0.01
    run = tmp_path / "run"  # and the command line offers it (experts only: the VAEs come from the digits run)
    assert main(["train", "--out", str(run), "--vae-from", str(digits_run), *tiny(("gaussian",), vae=False),
                 "--schedule", "subvp"]) == 0
    assert json.loads((run / "config.json").read_text())["schedule"] == "subvp"
    assert json.loads((run / "experts/gaussian/0/config.json").read_text())["net_config"]["schedule"]["name"] == "subvp"


def test_an_unknown_schedule_is_refused_by_the_command_line(capsys):
    assert main(["train", "--schedule", "subvp"]) == 2
    assert "invalid choice: 'subvp'" in capsys.readouterr().err


@pytest.mark.parametrize("added", [(1, SAMPLERS, "midpoint")], indirect=True)
def test_readme_sampler_block_adds_a_sampler(added, digits_run, tmp_path, capsys):
    target = MoLRMoG.random(8, 2, 3, 2, separation=5.0, seed=4)
    gen = torch.Generator().manual_seed(0)
    data, _ = target.sample(1500, gen)
    ref, _ = target.sample(1500, gen)
    x = generate(target.score, 1500, target.D, target.schedule, make_grid(target.schedule, 40), "midpoint",
                 generator=gen)
    assert energy_distance(x, data) < 3 * energy_distance(ref, data) + 0.01
    assert added.any_model and not added.ends_at_zero
    out = tmp_path / "s.png"
    assert main(["sample", str(digits_run), "--kind", "unet", "--sampler", "midpoint", "--steps", "3", "--n", "4",
                 "--npy", "--out", str(out), "--no-progress"]) == 0
    assert np.isfinite(np.load(tmp_path / "s.npy")).all()


@pytest.mark.parametrize("added", [(2, DATASETS, "stripes")], indirect=True)
def test_readme_dataset_block_adds_a_dataset(added, tmp_path):
    train, test = load_dataset("stripes"), load_dataset("stripes", split="test")
    assert train.images.shape == (160, 1, 16, 16) and test.images.shape == (40, 1, 16, 16)  # 20% held out
    assert main(["featurizer", "--dataset", "stripes", "--steps", "20", "--cache", str(tmp_path / "cache"),
                 "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--dataset", "stripes", "--out", str(run), *tiny(("mog",)), "--mog-modes", "2",
                 "--mog-rank", "2"]) == 0
    rep = json.loads((run / "report.json").read_text())
    assert rep["latent"] == [2, 4, 4] and rep["clusters"] == 2  # its declared default latent shape, its classes
    assert json.loads((run / "config.json").read_text())["vae_steps"] == 16  # a flag beats the dataset's default
