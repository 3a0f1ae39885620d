"""Prompt sets for evaluating caption models: one generated image per prompt, scored against the matching images.

- COCO `captions_<split>.json` (e.g. annotations/captions_val2017.json): images in id order, the first caption of
  every image, then every image's second, and so on (so `--num` up to the image count uses each image once; more
  reuses them with other captions, e.g. COCO-30K's `--num 30000`). The matching reference is the images those
  captions describe, found in `<root>/<split>/` beside `annotations/`.
- A ditpipe shard folder with captions: each sample's first caption, in order; for pixel-codec shards the
  matching reference is those samples' own images.
- A text file: one prompt a line (blank lines skipped); no matching images, so `--reference` is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from ditpipe.pipeline.errors import DataError


class PromptSet(NamedTuple):
    prompts: list[str]  # one per sample
    reference: object | None  # the matching images as pipeline.fid.reference_stats takes them, or None
    description: str


def load_prompts(spec: str | Path, num: int | None) -> PromptSet:
    path = Path(spec).expanduser()
    if (path / "manifest.json").is_file():
        return _shard_prompts(path, num)
    if not path.is_file():
        raise DataError(f"--prompts '{path}' does not exist; pass COCO's captions_val2017.json, a text file of one "
                        "prompt a line, or a shard folder encoded with --captions")
    if path.suffix.lower() == ".json":
        return _coco_prompts(path, num)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise DataError(f"--prompts '{path}' holds no prompts (one a line)")
    n = num or len(lines)
    return PromptSet([lines[i % len(lines)] for i in range(n)], None, f"{path} ({len(lines):,} prompts)")


def _coco_prompts(path: Path, num: int | None) -> PromptSet:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        captions: dict[int, list[str]] = {}
        for ann in sorted(data["annotations"], key=lambda a: int(a["id"])):
            captions.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"--prompts '{path}' is not a COCO captions file ({type(e).__name__}: {e})") from None
    order = [i for i in sorted(images) if captions.get(i)]
    if not order:
        raise DataError(f"--prompts '{path}' has no image with a caption")
    pairs = [(images[i], captions[i][r]) for r in range(max(len(c) for c in captions.values()))
             for i in order if r < len(captions[i])]
    n = num or len(order)
    chosen = [pairs[i % len(pairs)] for i in range(n)]
    for name, _ in chosen:
        if Path(name).name != name:
            raise DataError(f"--prompts '{path}': file_name {name!r} is not a plain file name")
    split = path.stem.removeprefix("captions_")  # captions_val2017 → val2017
    folder = path.parent.parent / split
    reference = None
    if folder.is_dir():
        from ditpipe.pipeline.fid import ImageList

        reference = ImageList(folder, sorted({name for name, _ in chosen}))
    return PromptSet([c for _, c in chosen], reference,
                     f"{path} ({len(order):,} images, {len(pairs):,} captions)")


def _shard_prompts(folder: Path, num: int | None) -> PromptSet:
    from ditpipe.pipeline import shards
    from ditpipe.pipeline.manifest import load_manifest

    manifest = load_manifest(folder)
    prompts = []
    for sample in shards.iter_samples(folder):
        caption = (sample.meta.get("captions") or [None])[0]
        if not caption:
            raise DataError(f"--prompts '{folder}': sample {sample.key} has no caption; pass shards encoded with "
                            "--captions")
        prompts.append(caption)
        if num is not None and len(prompts) == num:
            break
    if num is not None and len(prompts) < num:
        raise DataError(f"--prompts '{folder}' has {len(prompts)} captioned samples, fewer than --num {num}")
    reference = None
    if manifest.codec.get("kind") == "pixel":
        from ditpipe.pipeline.fid import ShardImages

        reference = ShardImages(folder, len(prompts))
    return PromptSet(prompts, reference, f"{folder} (the first caption of {len(prompts):,} samples)")
