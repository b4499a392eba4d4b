"""How the package is built: no import cycles, one artefact format (diffusers models), typed errors."""

import ast
import json
from pathlib import Path

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin

from molrmog.core.artefacts import FORMAT_VERSION, WEIGHTS, Model
from molrmog.core.errors import ArtefactError, MolrmogError
from molrmog.evaluation.featurizer import Featurizer
from molrmog.models.experts import GaussianExpert, MLPScore, MoEScore, MoGExpert, UNetScore, load_model
from molrmog.models.kinds import LatentExpert, get_kind, model_config
from molrmog.models.smd import SMDMLPScore, SMDUNetScore
from molrmog.models.vae import ConvVAE, LoRAVAE

ROOT = Path(__file__).resolve().parents[1] / "molrmog"


def _imports(path: Path, module: str) -> set[str]:
    """molrmog modules imported anywhere in a file (function-level imports included)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("molrmog")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("molrmog"):
                continue
            for a in node.names:  # `from . import mixture` imports a module, `from .x import f` the module x
                sub = f"{target}.{a.name}"
                out.add(sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).is_file() else target)
    return out


def _graph() -> dict[str, set[str]]:
    """molrmog module -> the molrmog modules it imports (function-level imports included)."""
    graph = {}
    for p in ROOT.rglob("*.py"):
        mod = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        mod = mod.removesuffix(".__init__")
        graph[mod] = {m for m in _imports(p, mod) if m != mod}
    return graph


def test_no_import_cycles_in_the_package():
    graph = _graph()
    assert "molrmog.pipeline.stages" in graph and "molrmog.core.mixture" in graph["molrmog.models.experts"]
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
    # core maths imports nothing of the pipeline, plotting or CLI
    for core in ("mixture", "schedules", "errors", "artefacts", "registry"):
        core = f"molrmog.core.{core}"
        assert not graph[core] - {"molrmog.core.errors", "molrmog.core.registry"}, (core, graph[core])


LAYERS = ("core", "training", "models", "pipeline", "evaluation", "applications", "experiments", "cli", "__main__")


def test_each_subpackage_imports_only_the_layers_below_it():
    """The folder shows the layers: a module of molrmog/<layer>/ imports modules of its own layer or lower ones."""
    def layer(m: str) -> int:
        part = m.split(".")[1] if m.count(".") else ""
        return LAYERS.index(part)

    graph = _graph()
    assert {m.split(".")[1] for m in graph if m.count(".")} == set(LAYERS)  # no module outside the layers
    up = [f"{m} -> {d}" for m, deps in graph.items() if m.count(".") for d in deps
          if d.count(".") and layer(d) > layer(m)]
    assert not up, "imports pointing up a layer:\n" + "\n".join(up)


def test_the_old_flat_module_names_still_import_the_same_modules():
    import importlib

    import molrmog
    from molrmog.core.distributions import MoLRMoG
    from molrmog.models import kinds

    for old, new in molrmog.MOVED.items():
        assert importlib.import_module(f"molrmog.{old}") is importlib.import_module(f"molrmog.{new}"), old
    from molrmog.distributions import MoLRMoG as Old  # the README of molrmog 0.2
    from molrmog.kinds import register
    from molrmog.samplers import generate

    from molrmog.pipeline import train_run

    assert Old is MoLRMoG and register is kinds.register and callable(generate) and callable(train_run)


def _models():
    lat = (2, 4, 4)
    return [MoGExpert(5, 3, 2, seed=1), GaussianExpert(6, 3), MoEScore(12, 2, 3, 2), MLPScore(7, hidden=16, depth=2),
            UNetScore(lat, width=8), ConvVAE((1, 8, 8), lat, 8, 0.1, seed=2), LoRAVAE((1, 8, 8), lat, 8, 0.1, 0, 3, 2),
            Featurizer((1, 8, 8), 10, 16, 8), SMDMLPScore(6, hidden=16, depth=2, latent=4),
            SMDUNetScore(lat, width=8, latent_dim=3),
            LatentExpert.wrap("mog", lat, get_kind("mog").build(lat, get_kind("mog").options(), {"name": "vp"}, 3))]


@pytest.mark.parametrize("model", _models(), ids=lambda m: type(m).__name__)
def test_every_model_is_a_diffusers_model_that_round_trips_bit_for_bit(model, tmp_path):
    assert isinstance(model, ModelMixin) and isinstance(model, ConfigMixin)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initial values
        for b in model.buffers():
            if b.is_floating_point():
                b.nan_to_num_(0.5)  # (the featurizer's test accuracy starts as NaN; NaN != NaN)
    model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["_class_name"] == type(model).__name__ and cfg["_molrmog_format"] == FORMAT_VERSION
    back = type(model).from_pretrained(tmp_path / "a")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    double = model.double()  # float64 survives the checked loader (and from_pretrained with torch_dtype)
    double.save(tmp_path / "b")
    for loaded in (type(model).load(tmp_path / "b"), type(model).from_pretrained(tmp_path / "b",
                                                                                  torch_dtype=torch.float64)):
        for v, v2 in zip(double.state_dict().values(), loaded.state_dict().values(), strict=True):
            assert v2.dtype == v.dtype and torch.equal(v, v2)


def test_score_models_load_by_class_name_and_refuse_unknown_classes_and_versions(tmp_path):
    m = MoGExpert(4, 2, 2)
    m.save(tmp_path / "m")
    assert isinstance(load_model(tmp_path / "m"), MoGExpert)
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for change, message in (({"_class_name": "Transformer"}, "unknown score model class 'Transformer'"),
                            ({"_molrmog_format": 99}, "artefact format 99"),
                            ({"extra": 1}, r"unknown key\(s\) \['extra'\]"),
                            ({"d": "four"}, "does not describe a valid model")):
        cfg_path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ArtefactError, match=message) as e:
            load_model(tmp_path / "m")
        assert str(cfg_path) in str(e.value) and "\n" not in str(e.value)
    cfg_path.write_text(json.dumps({"class": "MoGExpert", "config": {}}))  # molrmog 0.1's layout
    with pytest.raises(ArtefactError, match="written by molrmog 0.1"):
        load_model(tmp_path / "m")
    cfg_path.write_text(json.dumps(cfg))
    ConvVAE().save(tmp_path / "v")
    with pytest.raises(ArtefactError, match="expected ScoreModel"):
        load_model(tmp_path / "v")  # a VAE is not a score model
    state = {"U": torch.zeros(3, 3, 3)}
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "m" / WEIGHTS))
    with pytest.raises(ArtefactError, match="does not match its config.json"):
        load_model(tmp_path / "m")


def test_latent_expert_keeps_its_net_config():
    e = LatentExpert.wrap("gaussian", (2, 4, 4), GaussianExpert(32, 3, seed=5))
    assert model_config(e.net)["r"] == 3 and isinstance(e.net, GaussianExpert)
    assert e.config["net_config"]["_class_name"] == "GaussianExpert"
    with pytest.raises(MolrmogError, match="unknown expert kind"):
        LatentExpert("transformer", (2, 4, 4), model_config(e.net))


def test_model_subclasses_are_known_by_name():
    assert {"MoGExpert", "LatentExpert", "ConvVAE", "LoRAVAE", "Featurizer"} <= set(Model._classes)


def test_errors_are_typed():
    assert issubclass(ArtefactError, MolrmogError) and issubclass(MolrmogError, ValueError)


# --- the layers, as the code has them ---------------------------------------------------------------------


def _levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer: 0 for modules importing nothing of molrmog, else 1 + the highest layer it imports
    (so every import points down a layer or more; well defined because there are no cycles)."""
    level: dict[str, int] = {}

    def of(m: str) -> int:
        if m not in level:
            deps = [d for d in graph.get(m, ()) if d in graph and d != "molrmog"]
            level[m] = 1 + max(map(of, deps)) if deps else 0
        return level[m]

    for m in graph:
        of(m)
    return level


def layer_drawing() -> str:
    """The README's drawing of the layers, generated from the imports."""
    graph = _graph()
    level = _levels(graph)
    rows = []
    for lv in range(max(level.values()) + 1):
        mods = sorted(m.removeprefix("molrmog.") for m, v in level.items() if v == lv and m != "molrmog"
                      and not (ROOT.parent / m.replace(".", "/") / "__init__.py").is_file())  # modules, not packages
        rows.append(f"    {lv:2d}  " + ", ".join(mods))
    return "\n".join(rows) + "\n"


def test_the_readme_layer_drawing_is_the_code_s():
    """Every import points down (a module's layer is above everything it imports), and the README shows the
    layers the imports make. After a change of imports: MOLRMOG_WRITE_README=1 pytest -k layer_drawing."""
    import os
    import re

    graph, level = _graph(), _levels(_graph())
    for m, deps in graph.items():
        for d in deps:
            if d in level and d != "molrmog":
                assert level[d] < level[m], (m, d)
    readme = ROOT.parent / "README.md"
    text = readme.read_text()
    pattern = re.compile(r"(<!-- layers: tests/test_structure.py -->\n```text\n)(.*?)(```)", re.S)
    found = pattern.search(text)
    assert found, "README.md lacks the generated layer drawing block"
    drawing = layer_drawing()
    if os.environ.get("MOLRMOG_WRITE_README") and found.group(2) != drawing:
        readme.write_text(text[:found.start(2)] + drawing + text[found.end(2):])
        return
    assert found.group(2) == drawing, "the README's layer drawing is stale; regenerate it:\n" + drawing


def _functions():
    for p in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield p, node


def test_no_function_is_longer_than_80_lines():
    long = [f"{p.relative_to(ROOT.parent)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p, n in _functions() if n.end_lineno - n.lineno + 1 > 80]
    assert not long, "functions longer than 80 lines:\n" + "\n".join(long)


def test_no_private_name_crosses_a_module():
    """`from molrmog.x import _y` and `x._y` (x a molrmog module) are private names used outside their module."""
    bad = []
    for p in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(p.read_text())
        modules = set()  # names bound to molrmog modules in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("molrmog")):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{p.name}: from {node.module} import {a.name}")
                    modules.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                modules |= {a.asname or a.name for a in node.names if a.name.startswith("molrmog")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and any(ROOT.rglob(f"{node.value.id}.py"))):
                bad.append(f"{p.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_command_line_is_declared_once():
    """Flags come from declared options (no hand-written add_argument but --version), commands from one table,
    and the parser is a short walk over it; every command's --help works."""
    import contextlib
    import io

    from molrmog.cli import build_parser, commands, main

    src = (ROOT / "cli.py").read_text()
    assert src.count(".add_argument(") == 1 and '"--version"' in src
    node = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == "build_parser")
    assert node.end_lineno - node.lineno + 1 < 60
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for cmd in commands():
        argv = [cmd.group, cmd.name] if cmd.group else [cmd.name]
        assert (cmd.group or cmd.name) in sub.choices
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main([*argv, "--help"]) == 0
        assert "usage: molrmog " + " ".join(argv) in out.getvalue()
