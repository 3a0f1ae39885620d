"""Image sources: COCO 2017, a custom folder, or the built-in `shapes` → an index-addressable list of inputs.

A source lists its inputs up front (cheap: paths, labels, captions), in a deterministic order. Decoding happens
later, per input, in DataLoader workers (`Source.load`). Shards are cut from this list by input index, so the list
must be a pure function of the data on disk and the config.

Preprocessing is the ADM/DiT center crop; with aspect-ratio buckets (`data.buckets`, pipeline/buckets.py) each image
is resized to cover the bucket nearest its aspect ratio, then centre-cropped (the same halvings and bicubic resize),
and the input list is ordered by bucket so that a shard holds one bucket: `assign_buckets` reads every file's header
(its size, EXIF-rotated) for that. Odd images are converted, not dropped, and each conversion is noted:
  - EXIF orientation is applied;
  - CMYK, grayscale, palette → RGB; 16-bit → 8-bit by scaling (PIL would clip it to white), in float32 after
    the halvings of the crop, so a large 16-bit image never exists as floats at full size;
  - transparency (RGBA, LA, palette+transparency) is composited onto white;
  - images smaller than the target are upscaled (bicubic), as ADM's crop does; noted as "upscaled from WxH".
Inputs that cannot be used are skipped with a reason: unreadable, empty, not an image, corrupt or truncated, a
decompression bomb (PIL's guard stays on), an aspect ratio beyond MAX_ASPECT (its crop would be meaningless), or
beyond the budget: a file over `data.max_file_bytes` or an image over `data.max_pixels`, both refused before any
pixel is decoded (the size from the file system, the pixels from the header).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from ditpipe.pipeline import buckets as bucketing
from ditpipe.pipeline.atomic import sha256_file
from ditpipe.pipeline.config import DataConfig
from ditpipe.pipeline.download import download_coco, recorded_archives
from ditpipe.pipeline.errors import DataError

HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # scaled to 8-bit, never clipped
PIXEL_BUDGET_REASON, FILE_CAP_REASON = "over the pixel budget", "file over the size cap"  # skip reasons' prefixes
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_ASPECT = 50.0
SHAPES_COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES_KINDS = ("circle", "square")
SHAPES_CLASS_NAMES = [f"{c}_{k}" for c in SHAPES_COLORS for k in SHAPES_KINDS]  # class = 2·color + shape
# Every shapes image gets the plain caption first, then two of these paraphrases, picked by (seed, index).
SHAPES_PARAPHRASES = ("{c} {k}", "a {c} {k} on black", "a {c} {k} on a black background", "one {c} {k}",
                      "a filled {c} {k}", "a {k} in {c}", "a picture of a {c} {k}", "a single {c} {k}")


class BadImage(Exception):
    """This input is skipped; the message is the reason recorded in the manifest. `sha256`, `pixels` and `stat`
    carry what was learnt about the file before it failed (None where it failed first), as in `Loaded`."""

    def __init__(self, reason: str, sha256: str | None = None, pixels: int | None = None,
                 stat: tuple[int, int, int] | None = None):
        super().__init__(reason)
        self.sha256, self.pixels, self.stat = sha256, pixels, stat


@dataclass(frozen=True)
class InputItem:
    key: str  # stable and dot-free (webdataset splits keys at dots)
    file: str | None  # relative to the dataset root; None for generated inputs
    label: int | None = None
    captions: tuple[str, ...] = ()
    problem: str | None = None  # known before decoding (e.g. outside any class folder): skipped with this reason
    size: tuple[int, int] | None = None  # (w, h) of its aspect-ratio bucket; None: the square image_size crop



def stat_key(st: os.stat_result) -> tuple[int, ...]:
    """What the encode's stat cache (pipeline/reuse.py) keys a file by, as git keys its index: (size, mtime_ns,
    when it was taken (ns), ctime_ns, inode, device). ctime too, which no tool can set back (short of root or
    changing the clock): a file rewritten to the same size with its mtime restored (`cp -p`, an archive, a fixed-size
    format) still moved its ctime, and a file replaced by another one (a rename) has another inode."""
    return st.st_size, st.st_mtime_ns, time.time_ns(), st.st_ctime_ns, st.st_ino, st.st_dev


@dataclass
class Loaded:
    """One decoded, preprocessed input: RGB uint8 (h, w, 3) of its size, the source bytes' sha256, notes; for
    files also the header's pixel count and `stat`: its `stat_key`, taken just before the read."""

    pixels: np.ndarray | None
    sha256: str
    notes: list[str] = field(default_factory=list)
    source_pixels: int | None = None
    stat: tuple[int, int, int] | None = None


@dataclass
class Source:
    name: str  # coco | custom | shapes
    root: Path | None
    image_size: int
    items: list[InputItem]
    class_names: list[str] | None  # None: no labels (unconditional)
    params: dict  # what defines the input list; recorded in the manifest
    seed: int = 0
    max_pixels: int = DataConfig().max_pixels  # the budget `load` enforces before decoding (data.max_pixels)
    max_file_bytes: int = DataConfig().max_file_bytes
    bucket_sizes: list[tuple[int, int]] | None = None  # aspect-ratio buckets (w, h); None: square

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Loaded:
        item = self.items[index]
        if item.problem:
            raise BadImage(item.problem)
        if self.name == "shapes":
            return render_shape(self.seed, index, self.image_size)
        return load_image(self.root / item.file, item.size or self.image_size, self.max_pixels, self.max_file_bytes)

    def spans(self, per_shard: int) -> list[tuple[int, int, int | None]]:
        """(start, stop, bucket) of each shard: inputs [i·n, (i+1)·n); with buckets, cut within each bucket's run of
        the input list, so that a shard holds one bucket (bucket None: square)."""
        if self.bucket_sizes is None:
            n = len(self.items)
            return [(i * per_shard, min((i + 1) * per_shard, n), None) for i in range(max(1, math.ceil(n / per_shard)))]
        out, start = [], 0
        while start < len(self.items):
            size = self.items[start].size
            stop = start
            while stop < len(self.items) and stop - start < per_shard and self.items[stop].size == size:
                stop += 1
            out.append((start, stop, self.bucket_sizes.index(size)))
            start = stop
        return out or [(0, 0, 0)]

    def stat(self, index: int) -> tuple[int, ...] | None:
        """`stat_key` of input `index`'s file; None for generated or unreadable inputs."""
        item = self.items[index]
        if item.file is None:
            return None
        try:
            st = os.stat(self.root / item.file)
        except OSError:
            return None
        return stat_key(st)

    def file_sha256(self, index: int) -> str | None:
        """sha256 of input `index`'s bytes (what `load` records), or None when it cannot be read."""
        try:
            return sha256_file(self.root / self.items[index].file)
        except OSError:
            return None

    def sample_meta(self, index: int) -> dict:
        """The per-sample JSON fields that come from the source (the label, captions and the source file)."""
        item = self.items[index]
        meta = {"key": item.key, "index": index, "file": item.file or f"shapes:{self.seed}:{index}"}
        if self.class_names is not None and item.label is not None:  # None: an item skipped before decoding
            meta["label"] = item.label
            meta["class_name"] = self.class_names[item.label]
        if item.captions:
            meta["captions"] = list(item.captions)
        return meta


def missing_captions_note(source: Source) -> str | None:
    """What a COCO source without its captions file means, for encode to say (the images are encoded all the same):
    None for any other source, and for COCO with its captions."""
    if source.name != "coco" or source.params.get("captions_file", True):
        return None
    ann = source.root / "annotations" / f"captions_{source.params['split']}2017.json"
    return (f"COCO's captions file '{ann}' does not exist: these shards get no captions (a caption model or "
            "--captions needs them; --download fetches the annotations archive)")


def make_source(data: DataConfig, download_progress=None) -> Source:
    """The source `data` describes. `download_progress(name, done, total)` reports a COCO download's bytes."""
    if data.dataset_name == "coco":
        source = _coco(data, download_progress)
    else:
        source = _custom(data) if data.dataset_name == "custom" else _shapes(data)
    source.max_pixels, source.max_file_bytes = data.max_pixels, data.max_file_bytes
    return source


# ---------------------------------------------------------------------------------------------------- buckets


def assign_buckets(source: Source, sizes: list[tuple[int, int]], threads: int = 4) -> Source:
    """`source` with every input given the bucket nearest its aspect ratio (from its header, EXIF-rotated), its
    inputs ordered by bucket (in `sizes` order; listing order within one), so that shards hold one bucket each.
    An input whose header cannot be read goes to the most square bucket; its decode then says why it is skipped."""
    if source.name == "shapes":
        raise DataError("data.buckets: the shapes dataset is generated square; use data.buckets square, or a coco "
                        "or custom folder")
    files = [None if it.file is None or it.problem else source.root / it.file for it in source.items]
    with warnings.catch_warnings(), ThreadPoolExecutor(max(1, threads)) as pool:
        warnings.simplefilter("ignore")  # PIL's EXIF and bomb warnings; a bomb fails its decode later
        dims = list(pool.map(lambda f: None if f is None else header_size(f, source.max_file_bytes), files))
    square = bucketing.nearest(1, 1, sizes)
    bucket = [square if d is None else bucketing.nearest(*d, sizes) for d in dims]
    order = sorted(range(len(source.items)), key=lambda i: (bucket[i], i))
    items = [replace(source.items[i], key=f"{k:08d}", size=tuple(sizes[bucket[i]])) for k, i in enumerate(order)]
    params = {**source.params, "buckets": [list(b) for b in sizes],
              "crop": "resize to cover the bucket nearest the aspect ratio, centre crop (ADM's halvings, bicubic)"}
    return replace(source, items=items, params=params, bucket_sizes=[tuple(b) for b in sizes])


def header_size(path: Path, max_file_bytes: int) -> tuple[int, int] | None:
    """(w, h) as displayed (EXIF orientation 5-8 swaps them), from the header alone; None when unreadable."""
    try:
        if os.path.getsize(path) > max_file_bytes:
            return None
        with Image.open(path) as img:
            w, h = img.size
            orientation = _orientation(img)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# ---------------------------------------------------------------------------------------------------- decoding


def over_budget(nbytes: int | None, pixels: int | None, max_pixels: int, max_file_bytes: int) -> str | None:
    """The skip reason of an input beyond the budget (from its file size and header size alone), or None."""
    if nbytes is not None and nbytes > max_file_bytes:
        return f"{FILE_CAP_REASON}: {nbytes:,} bytes > {max_file_bytes:,} (data.max_file_bytes)"
    if pixels is not None and pixels > max_pixels:
        return f"{PIXEL_BUDGET_REASON}: {pixels:,} pixels > {max_pixels:,} (data.max_pixels)"
    return None


def load_image(path: Path, size: int | tuple[int, int], max_pixels: int = DataConfig().max_pixels,
               max_file_bytes: int = DataConfig().max_file_bytes) -> Loaded:
    """Decode and preprocess one file to `size` (a square side, or a bucket's (w, h)). Files over `max_file_bytes`
    and images over `max_pixels` (read from the header) are refused before any pixel is decoded."""
    target = (size, size) if isinstance(size, int) else tuple(size)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            nbytes, stat = st.st_size, stat_key(st)
            if nbytes <= max_file_bytes:
                data = f.read(nbytes + 1)  # read(n) allocates n bytes up front: the file's size, not the cap
                if len(data) > nbytes:  # it grew meanwhile: the rest, still capped
                    data += f.read(max_file_bytes + 1 - len(data))
                nbytes = len(data)
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None
    if reason := over_budget(nbytes, None, max_pixels, max_file_bytes):
        raise BadImage(reason, stat=stat)  # not even hashed: a fresh encode and an update record the same
    sha = hashlib.sha256(data).hexdigest()
    if nbytes == 0:
        raise BadImage("empty file (0 bytes)", sha, stat=stat)
    notes: list[str] = []
    pixels = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette warnings are noise here; bombs still raise
            img = Image.open(io.BytesIO(data))  # the header only; PIL's bomb guard runs here
            pixels = img.size[0] * img.size[1]
            if reason := over_budget(None, pixels, max_pixels, max_file_bytes):
                raise BadImage(reason, sha, pixels, stat)
            if img.format == "JPEG":
                # decode at a reduced DCT scale that still covers the target in either orientation (EXIF comes later)
                img.draft("RGB", (max(target), max(target)))
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                notes.append("first frame of an animation")
            orientation = _orientation(img)
            if orientation not in (None, 1):
                img = ImageOps.exif_transpose(img)
                notes.append(f"EXIF orientation {orientation} applied")
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb refused: {e}", sha, pixels, stat) from None
    except UnidentifiedImageError:
        raise BadImage("not an image PIL can identify", sha, pixels, stat) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"corrupt or truncated image: {e}", sha, pixels, stat) from None
    w, h = img.size
    if max(w, h) / max(1, min(w, h)) > MAX_ASPECT:
        raise BadImage(f"extreme aspect ratio {w}x{h} (more than {MAX_ASPECT:g}:1)", sha, pixels, stat)
    top = None
    if img.mode in HIGH_BIT_MODES:  # shrink in 16 bits first: scaling at full size costs 8 bytes a pixel
        top = full_scale(img)  # of the whole image: halving averages a lone bright pixel away
        img = _halve(img, target)
    return Loaded(cover_crop(to_rgb(img, notes, top), target, notes), sha, notes, pixels, stat)


def _halve(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """The BOX halvings of `cover_crop`, while both sides stay at least twice the target's, in the image's own mode
    (16-bit stays 2 bytes a pixel)."""
    while img.size[0] >= 2 * target[0] and img.size[1] >= 2 * target[1]:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    return img


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block is not worth skipping the image for
        return None


def full_scale(img: Image.Image) -> float:
    """The value that maps to 255 for a high-bit image: 65535 for 16-bit files and for values past 255, else 255."""
    return 65535.0 if img.mode.startswith("I;16") or img.getextrema()[1] > 255 else 255.0


def to_rgb(img: Image.Image, notes: list[str], top: float | None = None) -> Image.Image:
    """RGB, noting any conversion. `top`: a high-bit image's full scale (default: `full_scale(img)`)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in HIGH_BIT_MODES:  # float32, at the size it has by now (load_image halves it first)
        arr = np.asarray(img, dtype=np.float32)
        top = top or full_scale(img)
        notes.append(f"{mode} scaled to 8-bit")
        scaled = np.clip(np.rint(arr * np.float32(255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        notes.append(f"{mode} with transparency composited on white")
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    notes.append(f"{mode} converted to RGB")
    return img.convert("RGB")


def center_crop(img: Image.Image, size: int, notes: list[str]) -> np.ndarray:
    """ADM's center crop (guided-diffusion, used by DiT): halve with BOX while large, bicubic to the short side, crop."""
    return cover_crop(img, (size, size), notes)


def cover_crop(img: Image.Image, target: tuple[int, int], notes: list[str]) -> np.ndarray:
    """ADM's crop for any (w, h): halve with BOX while both sides are at least twice the target's, bicubic to the
    smallest size that covers it, centre crop. For a square target this is exactly `center_crop`."""
    tw, th = target
    if img.size[0] < tw or img.size[1] < th:
        notes.append(f"upscaled from {img.size[0]}x{img.size[1]}")
    img = _halve(img, target)
    scale = max(tw / img.size[0], th / img.size[1])
    img = img.resize(tuple(max(t, round(x * scale)) for x, t in zip(img.size, target)), resample=Image.BICUBIC)
    arr = np.asarray(img)  # (H, W, 3) uint8
    top, left = (arr.shape[0] - th) // 2, (arr.shape[1] - tw) // 2
    return np.ascontiguousarray(arr[top : top + th, left : left + tw])  # (th, tw, 3)


# ---------------------------------------------------------------------------------------------------- shapes


def shape_params(seed: int, index: int, size: int) -> tuple[int, int, float, float, float]:
    """(color, kind, extent, x0, y0) for input `index`: a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    color, kind = int(rng.integers(4)), int(rng.integers(2))
    extent = rng.uniform(size / 4, 3 * size / 4)  # diameter or side
    x0, y0 = rng.uniform(0, size - extent, size=2)  # fully inside the image
    return color, kind, float(extent), float(x0), float(y0)


def shape_captions(seed: int, index: int, size: int) -> tuple[str, ...]:
    """"a red circle" and two paraphrases: what the image shows, in words (a pure function of (seed, index))."""
    color, kind = shape_params(seed, index, size)[:2]
    c, k = list(SHAPES_COLORS)[color], SHAPES_KINDS[kind]
    pick = np.random.default_rng([seed, index, 1]).choice(len(SHAPES_PARAPHRASES), 2, replace=False)
    return (f"a {c} {k}", *(SHAPES_PARAPHRASES[i].format(c=c, k=k) for i in sorted(pick)))


def render_shape(seed: int, index: int, size: int) -> Loaded:
    color, kind, extent, x0, y0 = shape_params(seed, index, size)
    ss = 4  # draw 4× larger, then box-downsample: anti-aliased edges keep circles round at 16 px
    img = Image.new("RGB", (size * ss, size * ss), (0, 0, 0))
    box = [x0 * ss, y0 * ss, (x0 + extent) * ss - 1, (y0 + extent) * ss - 1]
    fill = list(SHAPES_COLORS.values())[color]
    (ImageDraw.Draw(img).ellipse if kind == 0 else ImageDraw.Draw(img).rectangle)(box, fill=fill)
    pixels = np.asarray(img.resize((size, size), resample=Image.BOX))
    return Loaded(np.ascontiguousarray(pixels), hashlib.sha256(pixels.tobytes()).hexdigest())


def classify_shape(pixels: np.ndarray) -> int:
    """The class (2·color + shape) a `shapes` image shows, judged from its pixels alone: the colour nearest to the
    mean of the bright pixels, and circle vs square from how much of their (soft) bounding box they fill: π/4 vs 1.
    Used to measure whether generated samples are recognisable; ~97 % right on real 16 px images."""
    rgb = pixels.astype(np.float32)  # (H, W, 3)
    fg = rgb.max(axis=2) > 96  # the shape: black background elsewhere
    if fg.sum() < 2:
        return -1
    mean = rgb[fg].mean(axis=0)
    color = int(np.argmin([np.linalg.norm(mean - np.array(c)) for c in SHAPES_COLORS.values()]))
    cover = np.clip((rgb.max(axis=2) / 255.0 - 0.2) / 0.8, 0, 1)  # (H, W) coverage; faint specks are not shape
    width, height = cover.max(axis=0).sum(), cover.max(axis=1).sum()  # soft extents: partial edge pixels count part
    fill = cover.sum() / max(width * height, 1e-6)
    return 2 * color + int(fill > 0.89)


def _shapes(data: DataConfig) -> Source:
    n = data.num_samples
    kinds = (shape_params(data.seed, i, data.image_size)[:2] for i in range(n))
    items = [InputItem(f"{i:08d}", None, 2 * color + kind, shape_captions(data.seed, i, data.image_size))
             for i, (color, kind) in enumerate(kinds)]
    params = {"dataset": "shapes", "num_samples": n, "seed": data.seed, "image_size": data.image_size,
              "crop": "generated at size"}
    return Source("shapes", None, data.image_size, items, list(SHAPES_CLASS_NAMES), params, data.seed)


# ---------------------------------------------------------------------------------------------------- files


def _subset(files: list, num_samples: int | None, seed: int) -> list:
    """A deterministic subset, spread over the whole set (not the first N in name order), kept in name order.
    Nested: the subset for N is contained in the subset for any larger N with the same seed."""
    if num_samples is None or num_samples >= len(files):
        return files
    pick = np.random.default_rng(seed).permutation(len(files))[:num_samples]
    return [files[i] for i in sorted(pick)]


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _under(root: Path, rel: str, what: str) -> str:
    """`rel` resolved under `root`, refused when it escapes (paths from metadata files are untrusted)."""
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise DataError(f"{what}: path '{rel}' escapes the dataset root {root}; refusing it")
    return target.relative_to(root.resolve()).as_posix()


def _file_params(data: DataConfig, root: Path, total: int) -> dict:
    return {"dataset": data.dataset_name, "path": str(root.resolve()), "num_samples": data.num_samples,
            "num_inputs_available": total, "seed": data.seed, "image_size": data.image_size,
            "crop": "ADM center crop (BOX halving, bicubic, center)", "upscale": "bicubic, noted per sample"}


def _custom(data: DataConfig) -> Source:
    root = Path(data.dataset_path)
    if not root.is_dir():
        raise DataError(f"custom dataset folder '{root}' does not exist; pass --data-path to a folder of images "
                        "(class subfolders for labels, or a flat folder for unconditional)")
    files = sorted((p for p in root.rglob("*") if p.is_file() and _is_image(p)
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under '{root}'")
    rels = [p.relative_to(root).as_posix() for p in files]
    class_dirs = sorted({r.split("/", 1)[0] for r in rels if "/" in r and not _not_utf8(r.split("/", 1)[0])})
    class_names = class_dirs or None
    captions, caption_problems = _custom_captions(root, rels)
    chosen = _subset(rels, data.num_samples, data.seed)
    items = []
    for i, rel in enumerate(chosen):
        if _not_utf8(rel):  # manifests and shards hold names as UTF-8 text: one that is not cannot be recorded
            items.append(InputItem(f"{i:08d}", _printable(rel), None, (), _NOT_UTF8_NAME))
            continue
        label, problem = None, caption_problems.get(rel)
        if class_names is not None and problem is None:
            if "/" in rel:
                label = class_names.index(rel.split("/", 1)[0])
            else:
                problem = "outside the class folders (labels come from first-level subfolders); move it into one"
        items.append(InputItem(f"{i:08d}", rel, label, tuple(captions.get(rel, ())), problem))
    return Source("custom", root, data.image_size, items, class_names, _file_params(data, root, len(rels)))


_NOT_UTF8_NAME = "its file name is not valid UTF-8 (shards record names as UTF-8 text); rename it"


def _not_utf8(text: str) -> bool:
    """Python reads bytes that are not UTF-8 (file names, surrogateescape'd text) as lone surrogates."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _printable(rel: str) -> str:
    """A name that is not UTF-8, as text that can be recorded: its odd bytes as \\xNN."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _caption_list(value, where: str) -> tuple[list[str], str | None]:
    """(captions, None) from a metadata value (a string, a list of strings, or null), or ([], why it is refused):
    anything else is a damaged line, never read as its keys or str()'d."""
    texts = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return [], f"{where}: its caption is {type(value).__name__} {json.dumps(value)[:40]}, not a string or a list " \
                   "of strings; fix that line"
    if any(_not_utf8(t) for t in texts):
        return [], f"{where}: its caption is not valid UTF-8; save the file as UTF-8"
    return texts, None


def _custom_captions(root: Path, rels: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Captions from `metadata.jsonl` at the root ({"file_name": ..., "text" | "caption" | "captions": ...}),
    or else from a sidecar `<stem>.txt` beside the image (one caption per non-empty line); and {file: why its
    captions are refused} for the inputs to skip (a caption that is not text, or not UTF-8)."""
    out: dict[str, list[str]] = {}
    problems: dict[str, str] = {}
    meta = root / "metadata.jsonl"
    if meta.is_file():
        # surrogateescape: a line that is not UTF-8 still parses, and only the input it names is skipped
        for n, line in enumerate(meta.read_bytes().decode("utf-8", "surrogateescape").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rel = _under(root, rec["file_name"], f"{meta}:{n}")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{meta}:{n}: expected a JSON object with 'file_name' and 'text' ({e})") from None
            texts, problem = _caption_list(rec.get("captions", rec.get("text", rec.get("caption"))),
                                           f"{meta.name}:{n}")
            out.setdefault(rel, []).extend(texts)
            if problem:
                problems.setdefault(rel, problem)
    for rel in rels:
        sidecar = (root / rel).with_suffix(".txt")
        if rel not in out and sidecar.is_file() and not _not_utf8(rel):
            lines = [ln.strip() for ln in sidecar.read_bytes().decode("utf-8", "surrogateescape").splitlines()]
            out[rel], problem = _caption_list([ln for ln in lines if ln], sidecar.name)
            if problem:
                problems[rel] = problem
    return out, problems


def _coco(data: DataConfig, download_progress=None) -> Source:
    root = Path(data.dataset_path)
    folder = root / f"{data.split}2017"
    ann = root / "annotations" / f"captions_{data.split}2017.json"
    if data.download and not (folder.is_dir() and ann.is_file()):
        download_coco(root, data.split, base_url=data.download_url, progress=download_progress)
    if not folder.is_dir():
        raise DataError(
            f"COCO images not found: '{folder}' does not exist. Put COCO 2017 at {root}/ "
            f"({data.split}2017/*.jpg and annotations/captions_{data.split}2017.json), point --data-path at "
            f"your copy, or pass --download to fetch the official archives")
    if data.captions and not ann.is_file():  # asked for captions: an encode without any would be a silent loss
        raise DataError(f"--captions (data.captions), but COCO's captions file '{ann}' does not exist; put "
                        f"captions_{data.split}2017.json there (from the official annotations_trainval2017.zip; "
                        "--download fetches it), or encode without --captions")
    captions: dict[str, list[str]] = {}
    problems: dict[str, str] = {}  # image → why its captions are refused: the image is skipped with it
    if ann.is_file():
        try:
            doc = json.loads(ann.read_text(encoding="utf-8"))
            by_id = {im["id"]: _under(folder, im["file_name"], str(ann)) for im in doc["images"]}
            for a in doc.get("annotations", []):
                if a.get("image_id") in by_id:
                    # the metadata.jsonl rule: a string, a list of strings or null; never str() of anything else
                    texts, problem = _caption_list(a["caption"], f"{ann.name}, annotation {a.get('id')}")
                    captions.setdefault(by_id[a["image_id"]], []).extend(t.strip() for t in texts)
                    if problem:
                        problems.setdefault(by_id[a["image_id"]], problem)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"'{ann}' is not a COCO captions file ({e}); replace it or remove it") from None
        names = sorted(by_id.values())
    else:
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and _is_image(p))
    if not names:
        raise DataError(f"no images in '{folder}'")
    chosen = _subset(names, data.num_samples, data.seed)
    prefix = f"{data.split}2017/"
    items = [InputItem(f"{i:08d}", prefix + name, None, () if name in problems else tuple(captions.get(name, ())),
                       problems.get(name)) for i, name in enumerate(chosen)]
    params = _file_params(data, root, len(names)) | {"split": data.split, "captions_file": ann.is_file(),
                                                      "archives_sha256": recorded_archives(root, data.split)}
    return Source("coco", root, data.image_size, items, None, params)
