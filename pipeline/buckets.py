"""Aspect-ratio buckets: which sizes, and which bucket each image goes to.

`data.buckets` is `square` (every image centre-cropped to image_size², the default), `auto`, or a list of [w, h].
`auto` makes buckets of about image_size² pixels whose sides are multiples of the codec's downsample factor × the
model's patch size, with aspect ratios from 1:2 to 2:1: for each height h from image_size down (in steps of that
multiple), the width nearest image_size² / h, at most 2h; and each landscape bucket's portrait mirror. At 256 px with
an f8 codec and patch 2 (multiple 16) that is 256x256, 272x240, 288x224, 320x208, 336x192, 352x176 and their
mirrors (docs/codecs-and-buckets.md, "Aspect-ratio buckets").

An image goes to the bucket nearest its aspect ratio (in log ratio, ties to the earlier bucket), is resized to
cover it and centre-cropped (pipeline/sources.py). The fraction of its pixels kept is min(r, rb) / max(r, rb) for
aspect ratios r (image) and rb (bucket), against min(w, h)² / (w·h) for today's square centre crop. What a shard
folder's buckets are (sizes, latent shapes, the most common one) its manifest says: `pipeline/manifest.py`.
"""

from __future__ import annotations

import math

MIN_RATIO, MAX_RATIO = 0.5, 2.0  # auto buckets' aspect ratios (w / h)


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" → (w, h), both positive."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not all(int(p) > 0 for p in parts):
        raise ValueError("expected WIDTHxHEIGHT in pixels, e.g. 320x192")
    return int(parts[0]), int(parts[1])


def auto_buckets(image_size: int, multiple: int) -> list[tuple[int, int]]:
    """The `auto` bucket list (module docstring), sorted by aspect ratio, portrait first."""
    area, out = image_size * image_size, []
    h = image_size // multiple * multiple
    while h >= multiple:
        w = min(round(area / h / multiple) * multiple, (2 * h) // multiple * multiple)
        if w < h:
            break
        out.append((w, h))
        if w >= MAX_RATIO * h:
            break
        h -= multiple
    return sorted({*out, *((b, a) for a, b in out)}, key=lambda s: (s[0] / s[1], s[0]))


def resolve(spec, image_size: int, multiple: int) -> list[tuple[int, int]] | None:
    """The bucket sizes `data.buckets` names, None for `square`. Raises ValueError naming a size whose sides are
    not multiples of `multiple` (the codec factor × patch: a latent the patches must tile)."""
    if spec == "square":
        return None
    if spec == "auto":
        if image_size % multiple:
            raise ValueError(f"data.image_size {image_size} is not a multiple of {multiple} (the codec's downsample "
                             "× the model's patch), which auto buckets are made of")
        return auto_buckets(image_size, multiple)
    sizes = [tuple(int(x) for x in s) for s in spec]
    bad = [f"{w}x{h}" for w, h in sizes if w % multiple or h % multiple]
    if bad:
        raise ValueError(f"bucket(s) {', '.join(bad)} are not multiples of {multiple} (the codec's downsample × the "
                         "model's patch)")
    if len(set(sizes)) != len(sizes):
        raise ValueError("the bucket list names a size twice")
    return sizes


def nearest(w: int, h: int, sizes: list[tuple[int, int]]) -> int:
    """The index of the bucket nearest the aspect ratio w / h (log ratio; the first of equals)."""
    r = math.log(w / h)
    return min(range(len(sizes)), key=lambda i: (abs(math.log(sizes[i][0] / sizes[i][1]) - r), i))


def kept_fraction(w: int, h: int, size: tuple[int, int] | None) -> float:
    """The fraction of a w×h image's pixels a cover-and-centre-crop to `size` keeps (None: a square crop)."""
    r, rb = w / h, 1.0 if size is None else size[0] / size[1]
    return min(r, rb) / max(r, rb)
