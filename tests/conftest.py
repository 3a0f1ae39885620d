"""Shared offline fixtures: a tiny VAE saved to disk, a COCO-layout folder, a corpus of bad images, a CLI runner.

Nothing here reaches a model hub: HF_HUB_OFFLINE is set for the whole test session.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# train() chooses its CPU threads from the machine's load when nothing sets them (pipeline/threads.py): the suite
# pins torch's own default instead, so a run's speed does not depend on what else the machine runs. The tests of
# that choice unset it.
if "OMP_NUM_THREADS" not in os.environ:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so the next `train()` in this process makes its own Accelerator."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread for the test: tiny in-process runs only lose to thread hand-offs on a busy machine (train()
    sets its threads from OMP_NUM_THREADS)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def pixel_shards(folder: Path, num_samples: int, **over) -> Path:
    """Pixel-codec shapes shards (16 px) encoded into `folder`; `over` adds dotted keys (e.g. samples_per_shard)."""
    from ditpipe.pipeline.config import load_config
    from ditpipe.stages.encode import encode

    encode(load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": num_samples,
                              "vae.name": "pixel", "data.num_workers": 0, "shards.path": str(folder), **over}))
    return folder


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state; `train()` makes its Accelerator first, so a run refused during its
    set-up (as many tests mean it to be) would otherwise leave the next test an Accelerator of another precision."""
    yield
    reset_accelerate()


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, with the reason, where torch sees no CUDA device."""
    if not any(item.get_closest_marker("cuda") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m cuda` or scripts/gpu_check.sh on one)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    """A random-init AutoencoderKL (f2, 4 latent channels), saved with save_pretrained so tests load it for real."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients + a disc), so crops and flips are visible in the numbers."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    r = (x / max(w - 1, 1) * 255).astype(np.uint8)
    g = (y / max(h - 1, 1) * 255).astype(np.uint8)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    b = (((x - cx) ** 2 + (y - cy) ** 2) < (min(w, h) / 4) ** 2).astype(np.uint8) * 200
    return Image.fromarray(np.stack([r, g, b], -1))


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def png_chunks(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# What each bad input must become: ("skip", reason fragment) or ("convert", note fragment).
BAD_CORPUS = {
    "corrupt.jpg": ("skip", "corrupt"),
    "truncated.jpg": ("skip", "corrupt or truncated"),
    "truncated.png": ("skip", "corrupt or truncated"),
    "empty.png": ("skip", "empty file"),
    "notes.jpg": ("skip", "not an image"),
    "bomb.png": ("skip", "decompression bomb"),
    "cmyk.jpg": ("convert", "CMYK"),
    "gray16.png": ("convert", "I;16 scaled to 8-bit"),
    "palette_alpha.png": ("convert", "transparency composited on white"),
    "la.png": ("convert", "LA with transparency"),
    "rotated.jpg": ("convert", "EXIF orientation 6"),
    "tiny.png": ("convert", "upscaled from 5x7"),
}


def write_bad_corpus(folder: Path) -> dict[str, tuple[str, str]]:
    """Every kind of bad input the encode issue names, plus one good image. Returns BAD_CORPUS + the good one."""
    folder.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(photo(48, 40, 1))
    (folder / "good.jpg").write_bytes(good)
    rng = np.random.default_rng(0)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(600))
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    png = io.BytesIO()
    photo(40, 40, 2).save(png, "PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("these are my notes, not a picture\n")
    # A 40000 x 40000 PNG header with a tiny body: PIL's guard must refuse it before allocating anything.
    (folder / "bomb.png").write_bytes(png_chunks(40000, 40000, 1, 0, b"\x00" * 64))
    (folder / "cmyk.jpg").write_bytes(jpeg_bytes(photo(40, 40, 3).convert("CMYK")))
    gray16 = (np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(">u2")
    (folder / "gray16.png").write_bytes(png_chunks(40, 40, 16, 0, b"".join(b"\x00" + r.tobytes() for r in gray16)))
    pal = photo(40, 40, 4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(folder / "palette_alpha.png", transparency=0)
    Image.fromarray(np.stack([np.full((40, 40), 90, np.uint8), np.tile(np.arange(40, dtype=np.uint8) * 6, (40, 1))],
                             -1), "LA").save(folder / "la.png")
    rotated = photo(60, 30, 5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    (folder / "rotated.jpg").write_bytes(jpeg_bytes(rotated, exif=exif.tobytes()))
    photo(5, 7, 6).save(folder / "tiny.png")
    return {"good.jpg": ("ok", ""), **BAD_CORPUS}


@pytest.fixture
def bad_corpus(tmp_path) -> tuple[Path, dict]:
    folder = tmp_path / "custom"
    return folder, write_bad_corpus(folder)


def write_coco(root: Path, split: str = "val", n: int = 6, captions_per_image: int = 5) -> list[str]:
    """A COCO-2017-layout folder: {split}2017/*.jpg and annotations/captions_{split}2017.json."""
    folder = root / f"{split}2017"
    folder.mkdir(parents=True)
    images, anns, names = [], [], []
    for i in range(n):
        name = f"{1000 + i:012d}.jpg"
        (folder / name).write_bytes(jpeg_bytes(photo(64 + 8 * i, 48, i)))
        images.append({"id": 1000 + i, "file_name": name, "width": 64 + 8 * i, "height": 48})
        anns += [{"id": 10 * i + k, "image_id": 1000 + i, "caption": f"image {i} caption {k}"}
                 for k in range(captions_per_image)]
        names.append(name)
    (root / "annotations").mkdir()
    (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps({"images": images,
                                                                                "annotations": anns}))
    return names


@pytest.fixture
def coco_root(tmp_path) -> Path:
    root = tmp_path / "coco"
    write_coco(root)
    return root


@pytest.fixture
def cli(capsys):
    """Run `ditpipe ARGS` in this process through the real entry point; returns (exit code, stdout, stderr)."""
    from ditpipe.stages.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def assert_common_checkpoints_equal(run: Path, ref: Path, note: str = "") -> set[str]:
    """Every checkpoint folder both runs hold has the same model, EMA and optimizer bytes (by the sha256 the
    checkpoint records; torch.save is deterministic). Returns the common folder names."""
    from ditpipe.pipeline.checkpoint import validate

    common = {p.name for p in ref.glob("checkpoint-*")} & {p.name for p in run.glob("checkpoint-*")}
    for name in sorted(common):
        files, ref_files = validate(run / name)["files"], validate(ref / name)["files"]
        for f in ("model.pt", "ema.pt", "optimizer.pt"):
            assert files[f]["sha256"] == ref_files[f]["sha256"], f"{name}/{f} differs{note}"
    return common


def train_tiny(tmp: Path, num_samples: int, **over) -> Path:
    """Encode `num_samples` 16 px shapes with the pixel codec and train a 1-block DiT on them; returns the run."""
    from accelerate.state import AcceleratorState

    from ditpipe.pipeline.config import load_config
    from ditpipe.stages.encode import encode
    from ditpipe.stages.train import train
    from tiny import TINY_MODEL

    data = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": num_samples,
            "vae.name": "pixel", "shards.path": str(tmp / "shards"), "data.num_workers": 0}
    encode(load_config(None, data))
    run = train(load_config(None, {**data, **TINY_MODEL, "training.mixed_precision": "no", "training.batch_size": 16,
                                   "training.gradient_accumulation_steps": 1, "logging.output_dir": str(tmp / "out"),
                                   "logging.run_name": "r", "logging.tensorboard": False, **over}))
    AcceleratorState._reset_state(True)
    return run


def resign(ckpt: Path) -> None:
    """Record a checkpoint's files anew in its training_state.json, as someone altering it on purpose would: its
    hashes then hold, and only the checks that do not trust them can catch what was changed."""
    import hashlib

    state_file = ckpt / "training_state.json"
    state = json.loads(state_file.read_text())
    for name in state["files"]:
        data = (ckpt / name).read_bytes()
        state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state_file.write_text(json.dumps(state))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server in its own process, tests/s3server.py) for the whole test session."""
    from s3server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """The S3 server's environment set for this test (the endpoint and dummy credentials, as for AWS), and a fresh
    bucket: returns (server, 's3://<bucket>')."""
    import re
    import uuid

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return s3_server, s3_server.bucket(f"{name}-{uuid.uuid4().hex[:8]}")
