"""Image helpers for grids and sample files: [-1, 1] tensors → uint8 arrays → PNG."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] → (N, H, W, 3) uint8, rounded as ADM/DiT save their samples."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, ncols: int, pad: int = 2, background: int = 0,
              column_labels: list[str] | None = None, min_cell: int = 0) -> Image.Image:
    """(N, H, W, 3) uint8 → one PIL image, `ncols` per row, `pad` pixels between cells. Cells smaller than
    `min_cell` are enlarged by an integer factor (nearest, so pixels stay visible); `column_labels` are written in a
    header row above their columns."""
    n, h, w, _ = images.shape
    k = max(1, -(-min_cell // max(h, w))) if min_cell else 1
    if k > 1:
        images = images.repeat(k, axis=1).repeat(k, axis=2)
        h, w = h * k, w * k
    top = 14 if column_labels else 0
    nrows = -(-n // ncols)
    grid = np.full((top + nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), background, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        y, x = top + pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = img
    out = Image.fromarray(grid)
    if column_labels:
        draw = ImageDraw.Draw(out)
        for c, label in enumerate(column_labels[:ncols]):
            draw.text((pad + c * (w + pad) + 1, 1), label[: max(1, (w + pad) // 6)], fill=(255, 255, 255))
    return out
