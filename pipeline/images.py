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
    chars = max(1, (w + pad) // 6)  # PIL's default bitmap font is 6 px a character
    lines = [_wrap(label, chars) for label in (column_labels or [])[:ncols]]
    top = 12 * max(map(len, lines)) + 2 if lines else 0
    nrows = -(-n // ncols)
    grid = np.full((top + nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), background, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        y, x = top + pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = img
    out = Image.fromarray(grid)
    if column_labels:
        draw = ImageDraw.Draw(out)
        for c, label_lines in enumerate(lines):
            for j, line in enumerate(label_lines):
                draw.text((pad + c * (w + pad) + 1, 1 + 12 * j), line, fill=(255, 255, 255))
    return out


def _wrap(label: str, chars: int, max_lines: int = 2) -> list[str]:
    """A column label in lines of at most `chars` characters, broken at "_" or spaces ("red_square" → red / square)."""
    lines: list[str] = []
    for word in label.replace("_", " ").split():
        if lines and len(lines[-1]) + 1 + len(word) <= chars:
            lines[-1] += " " + word
        else:
            lines.append(word[:chars])
    return lines[:max_lines] or [""]
