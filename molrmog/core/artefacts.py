"""Artefacts: every file molrmog writes, and the one way trained models are saved and loaded.

- Writing: `atomic_write(path, write)` writes into a temporary file beside `path` and renames it
  over `path`, so a reader never sees half a file and a killed writer leaves only a `.*.tmp` file,
  which `clean_stale_tmp` removes on resume. `write_json` / `write_text` build on it.
- Reading: `read_json` / `read_safetensors` turn any damage into one `ArtefactError` naming the file.
- Models: `Model` is diffusers' `ModelMixin` + `ConfigMixin` (the constructor is the config;
  `save_pretrained(dir)` writes `config.json` + `diffusion_pytorch_model.safetensors`,
  `from_pretrained(dir)` rebuilds), with two additions: `config.json` records the molrmog artefact
  format (`_molrmog_format`) beside diffusers' `_class_name` and `_diffusers_version`, and
  `save` / `load` are the checked, atomic versions the package itself uses -- `load` refuses an
  unknown class or format version, unknown or missing keys, wrong types and wrong shapes with
  one line that names the file, and keeps the saved dtype (bit-for-bit round trips).
- One format for everything trained or saved: analytic distributions (`molrmog.core.distributions`) are
  written the same way -- `config.json` starting with `header(obj)` (`_class_name`, `_molrmog_format`)
  beside `diffusion_pytorch_model.safetensors` -- and read through the same `check_header`.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors import SafetensorError
from safetensors.torch import load_file

from molrmog.core.errors import ArtefactError, MolrmogError

__all__ = ["FORMAT_VERSION", "WEIGHTS", "header", "check_header", "check_tensors", "atomic_write", "write_json",
           "write_text", "read_json", "read_safetensors", "clean_stale_tmp", "is_saved", "Model", "register_to_config",
           "inside"]

FORMAT_VERSION = 2  # 1: molrmog 0.1's own {"class", "config"} layout (no longer read)
WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name


# --- writing ----------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: Path(p).write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def clean_stale_tmp(directory: str | os.PathLike) -> list[Path]:
    """Remove what writers killed mid-write leave under `directory`: `.<name>.*.tmp` files (atomic
    writes) and `.save-*` folders (`Model.save`). Call it only while no other process writes there
    (the run lock)."""
    import shutil

    removed = []
    for p in Path(directory).rglob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    for p in list(Path(directory).rglob(".save-*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# --- reading ----------------------------------------------------------------------------------


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path} is missing (expected the {what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtefactError(f"{path} is not valid JSON ({e}); the {what} is damaged: restore or delete it") from e


def read_safetensors(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path} is missing (expected the {what})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ArtefactError(f"{path} cannot be read ({e}); the {what} is damaged: restore or delete it") from e


def inside(root: str | os.PathLike, name: str, what: str) -> Path:
    """root / name, refusing names that leave root (a kind or layout named '../../x' in a config file)."""
    root = Path(root).resolve()
    p = (root / str(name)).resolve()
    if not isinstance(name, str) or not name or p.parent != root:
        raise ArtefactError(f"{what} {name!r} is not a plain name inside {root}")
    return p


def is_saved(directory: str | os.PathLike) -> bool:
    """A finished model directory: config.json (written last) beside its weights."""
    d = Path(directory)
    return (d / "config.json").is_file() and (d / WEIGHTS).is_file()


# --- models -----------------------------------------------------------------------------------


class Model(ModelMixin, ConfigMixin):
    """Base of every trainable molrmog model (score models, latent experts, VAEs, featurizer).

    Subclasses decorate `__init__` with `@register_to_config` (arguments JSON-serialisable), and
    their constructors validate their arguments with `MolrmogError`.
    """

    config_name = "config.json"
    _classes: dict[str, type] = {}  # filled as subclasses are defined; used for nested configs

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Model._classes[cls.__name__] = cls

    def register_to_config(self, **kwargs):
        kwargs.setdefault("_molrmog_format", FORMAT_VERSION)
        super().register_to_config(**kwargs)

    def save(self, directory: str | os.PathLike) -> Path:
        """`save_pretrained` into a temporary folder, then move the files in (config.json last)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".save-") as tmp:
            self.save_pretrained(tmp, safe_serialization=True)
            for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
                os.replace(Path(tmp) / name, directory / name)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, what: str | None = None, device=None):
        """Checked load of a directory written by `save` / `save_pretrained` (see the module docstring)."""
        directory = Path(directory)
        what = what or cls.__name__
        cfg = read_json(directory / "config.json", f"{what} config")
        model = build_from_config(cfg, cls, directory / "config.json", what)
        state = read_safetensors(directory / WEIGHTS, f"{what} weights")
        load_state(model, state, directory / WEIGHTS)
        return model if device is None else model.to(device)


def header(obj) -> dict:
    """The keys every artefact's config.json starts with: its class and the artefact format."""
    return {"_class_name": type(obj).__name__, "_molrmog_format": FORMAT_VERSION}


def check_header(cfg: Any, source: str | os.PathLike, what: str, classes: dict[str, type], base: type) -> type:
    """The class an artefact's config.json names, after checking it is a JSON object of this format whose
    `_class_name` is one of `classes` and `base` or a subclass of it; else one ArtefactError naming the file."""
    if not isinstance(cfg, dict):
        raise ArtefactError(f"{source}: a {what} config must be a JSON object, got {type(cfg).__name__}")
    if "class" in cfg and "_class_name" not in cfg:
        raise ArtefactError(f"{source} was written by molrmog 0.1 (artefact format 1), which this version "
                            f"(format {FORMAT_VERSION}) does not read; train it again")
    name = cfg.get("_class_name")
    cls = classes.get(name) if isinstance(name, str) else None
    if cls is None or not issubclass(cls, base):
        raise ArtefactError(f"{source}: unknown {what} class {name!r} (expected {base.__name__} or a subclass)")
    version = cfg.get("_molrmog_format")
    if version != FORMAT_VERSION:
        raise ArtefactError(f"{source}: artefact format {version!r} is not the format this molrmog reads "
                            f"({FORMAT_VERSION}); train it again with this version")
    return cls


def build_from_config(cfg: Any, base: type, source: str | os.PathLike, what: str) -> Model:
    """Construct the model a config dict describes (its `_class_name` must be `base` or a subclass)."""
    cls = check_header(cfg, source, what, Model._classes, base)
    params = inspect.signature(cls.__init__).parameters
    known = set(params) - {"self"}
    keys = {k for k in cfg if not k.startswith("_")}
    unknown = sorted(keys - known)
    missing = sorted(k for k in known - keys if params[k].default is inspect.Parameter.empty)
    if unknown or missing:
        raise ArtefactError(f"{source}: {what} config has " + "; ".join(
            t for t in (f"unknown key(s) {unknown}" if unknown else "", f"missing key(s) {missing}" if missing else "")
            if t) + "; the file was edited or damaged: restore it or train again")
    try:
        return cls.from_config({k: cfg[k] for k in keys})
    except MolrmogError as e:
        raise ArtefactError(f"{source}: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ArtefactError(f"{source}: the {what} config does not describe a valid model ({type(e).__name__}: "
                            f"{e}); restore it or train again") from e


def check_tensors(state: dict[str, torch.Tensor], source: str | os.PathLike, what: str) -> None:
    """Tensors of an artefact: real, floating ones in float32 / float64 (the format's dtypes), every value finite."""
    odd = [f"{k} ({v.dtype})" for k, v in state.items()
           if v.is_complex() or (v.is_floating_point() and v.dtype not in (torch.float32, torch.float64))]
    if odd:
        raise ArtefactError(f"{source}: tensor(s) {', '.join(odd[:3])} are not float32 / float64, the dtypes molrmog "
                            f"{what} are saved in; the file was converted or damaged: restore it or train again")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ArtefactError(f"{source}: tensor(s) {bad[:3]} hold NaN or Inf; the {what} are damaged: restore the "
                            f"file or train again")


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load weights strictly, in the dtype they were saved in; mismatches, a dtype the format does not hold
    (float32 and float64 only) and NaN / Inf values are one ArtefactError naming the file."""
    check_tensors(state, source, "weights")
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(floats) == 1:
        torch.nn.Module.to(model, floats.pop())  # (ModelMixin.to warns about fp32 modules we do not have)
    own = model.state_dict()
    unknown, missing = sorted(set(state) - set(own)), sorted(set(own) - set(state))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})" for k in own
             if k in state and state[k].shape != own[k].shape]
    if unknown or missing or wrong:
        parts = [f"unexpected tensors {unknown[:5]}" if unknown else "", f"missing tensors {missing[:5]}" if missing
                 else "", f"wrong shapes {wrong[:3]}" if wrong else ""]
        raise ArtefactError(f"{source} does not match its config.json: " + "; ".join(p for p in parts if p)
                            + "; restore both files or train again")
    model.load_state_dict(state, strict=True)
