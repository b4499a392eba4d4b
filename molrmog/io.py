"""Artefact directories: a JSON config beside a safetensors file, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file

__all__ = ["atomic_write", "read_artifact"]


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
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
