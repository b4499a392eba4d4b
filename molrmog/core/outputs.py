"""Result files a user reads or looks at: CSV tables, JSON, matplotlib figures, image grids.

Every writer here is atomic (a temporary file renamed over the target), so an interrupted command
never leaves half a PNG or CSV, and a result that existed before stays intact until its
replacement is complete. Core modules import these helpers; nothing here imports molrmog models.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from molrmog.core.artefacts import atomic_write, write_json, write_text

__all__ = ["pyplot", "save_figure", "write_csv", "write_json", "write_text", "save_grid", "out_dir"]


def out_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return atomic_write(path, lambda p: Path(p).write_bytes(buf.getvalue()))


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Rows of dicts as CSV (header from the union of keys, in first-seen order)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return write_text(path, buf.getvalue())


def save_grid(path: str | os.PathLike, images: torch.Tensor, per_row: int, scale: int = 4) -> Path:
    """Write images (N, C, H, W) in [0, 1] as one PNG grid (atomically)."""
    from PIL import Image

    N, C, H, W = images.shape
    per_row = max(1, min(per_row, N))
    rows = math.ceil(N / per_row)
    grid = np.ones((rows * (H + 1) + 1, per_row * (W + 1) + 1, C), dtype=np.float32)
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(N):
        r, c = divmod(i, per_row)
        grid[1 + r * (H + 1): 1 + r * (H + 1) + H, 1 + c * (W + 1): 1 + c * (W + 1) + W] = arr[i]
    arr8 = (grid * 255).round().astype(np.uint8)
    img = Image.fromarray(arr8[..., 0] if C == 1 else arr8)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write(path, lambda p: Path(p).write_bytes(buf.getvalue()))
