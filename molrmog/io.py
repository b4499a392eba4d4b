"""Artefact directories: a JSON config beside a safetensors file, written atomically."""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["atomic_write", "read_artifact", "Configurable", "load_module"]


def atomic_write(path: Path, write) -> None:
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


def read_artifact(directory: str | os.PathLike, weights: str, what: str) -> tuple[dict, dict]:
    """Read config.json and the named safetensors file; any problem is a ValueError naming the file."""
    directory = Path(directory)
    cfg_path, w_path = directory / "config.json", directory / weights
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ValueError(f"{p} is missing; a saved {what} has config.json and {weights}")
    try:
        return json.loads(cfg_path.read_text()), load_file(str(w_path))
    except Exception as e:  # noqa: BLE001 - report any corruption with the file name
        raise ValueError(f"cannot read the saved {what} in {directory}: {e}") from e


class Configurable(torch.nn.Module):
    """A module whose constructor arguments are its config (diffusers' register_to_config, in a few
    lines); `save_pretrained(dir)` writes config.json + model.safetensors, `load_module(dir)` rebuilds."""

    registry: dict[str, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Configurable.registry[cls.__name__] = cls
        init = cls.__init__

        def wrapped(self, *args, **kw):
            if not hasattr(self, "_config_owner"):  # the outermost constructor records the config
                bound = inspect.signature(init).bind(self, *args, **kw)
                bound.apply_defaults()
                cfg = {k: v for k, v in bound.arguments.items() if k != "self"}
                object.__setattr__(self, "_config_owner", cls)
                object.__setattr__(self, "config", self._normalise_config(cfg))
            init(self, *args, **kw)

        cls.__init__ = wrapped

    @staticmethod
    def _normalise_config(cfg: dict) -> dict:
        return cfg

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(directory / "model.safetensors", lambda p: save_file(state, p))
        cfg = {"class": type(self).__name__, "config": _jsonable(self.config)}
        atomic_write(directory / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
        return directory


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    return v


def load_module(directory: str | os.PathLike, what: str = "model") -> Configurable:
    """Rebuild any `Configurable` saved with `save_pretrained`."""
    from . import experts, featurizer, vae  # noqa: F401 - importing them registers their classes

    cfg, state = read_artifact(directory, "model.safetensors", what)
    cls = Configurable.registry.get(cfg.get("class"))
    if cls is None:
        raise ValueError(f"{directory}/config.json: unknown {what} class {cfg.get('class')!r}")
    module = cls(**cfg["config"])
    module.load_state_dict(state)
    return module
