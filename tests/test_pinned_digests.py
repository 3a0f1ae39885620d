"""The bytes ditpipe writes, pinned: shards (tar and Parquet, pixel codec and a real diffusers autoencoder),
checkpoint files and sample images from a tiny run through the CLI. A refactor must leave every digest unchanged;
a deliberate format change updates PINNED in the same commit and says why (docs/design.md, the contracts).

Pinned at bd1d5d8 (before issue 27's redesign), on the CPU with one thread, torch 2.13. Text files that record
the test's folders (config.yaml, the autoencoder's path in the manifest) are hashed with them replaced by WORK / VAE.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


from conftest import reset_accelerate

PINNED = {
    "checkpoints": {
        "checkpoint-2": {
            "config.yaml": "cff48dcd3b157e66",  # issue 29: + storage.*, training.parallel, training.fsdp_cpu_offload
            "ema.pt": "5398cd4f8f021fab",
            "manifest.json": "ab54e55eab56de72",
            "model.pt": "2f164859691acb6d",
            "optimizer.pt": "05e4052ec0f43097",
            "rng-rank0.pt": "d5045881d8ab23d8"
        },
        "checkpoint-4": {
            "config.yaml": "cff48dcd3b157e66",  # issue 29: + storage.*, training.parallel, training.fsdp_cpu_offload
            "ema.pt": "3d5425c66211534a",
            "manifest.json": "ab54e55eab56de72",
            "model.pt": "aaddff1178963d14",
            "optimizer.pt": "16a677213162fee0",
            "rng-rank0.pt": "d5045881d8ab23d8"
        },
        "checkpoint-5": {
            "config.yaml": "cff48dcd3b157e66",  # issue 29: + storage.*, training.parallel, training.fsdp_cpu_offload
            "ema.pt": "93a79e2385dd61ee",
            "manifest.json": "ab54e55eab56de72",
            "model.pt": "f3dbc445fa0c8781",
            "optimizer.pt": "56788807ceaf136e",
            "rng-rank0.pt": "d5045881d8ab23d8"
        },
        "checkpoint-epoch-1": {
            "config.yaml": "cff48dcd3b157e66",  # issue 29: + storage.*, training.parallel, training.fsdp_cpu_offload
            "ema.pt": "3ad39e8777d3e329",
            "manifest.json": "ab54e55eab56de72",
            "model.pt": "0e0b9fb2711a0205",
            "optimizer.pt": "8084247660c1d2b5",
            "rng-rank0.pt": "d5045881d8ab23d8"
        }
    },
    "parquet": {
        "encode-params.json": "9ad580bcb9db8fc0",
        "manifest.json": "ff03736ab2951064",
        "part-00000.meta.json": "6f2a11a74ebc860a",
        "part-00000.parquet": "dc4b4a42dbea0458",
        "part-00001.meta.json": "e6704db5b8250404",
        "part-00001.parquet": "67505e90ba902785",
        "part-00002.meta.json": "8043c136abd305b6",
        "part-00002.parquet": "f3c07d1c268c3612"
    },
    "samples": {
        "0000_class0.png": "22d983064cbdb85b",
        "0001_class1.png": "b0d3e3c028b054d8",
        "0002_class2.png": "45b24f3b6cac5257",
        "0003_class3.png": "0e35121540279978",
        "grid.png": "120713bbc3074519"
    },
    "vae": {
        "encode-params.json": "78ec84d6332ef2b8",
        "manifest.json": "b5ed91f8ce58ecc3",
        "shard-00000.meta.json": "93d85f500913d76e",
        "shard-00000.tar": "1ae937239b3a6838",
        "shard-00001.meta.json": "015cbd0588140078",
        "shard-00001.tar": "278087d538c2fb9e"
    },
    "wds": {
        "encode-params.json": "981ec5c452f5b6b2",
        "manifest.json": "ccdee80d3363d332",
        "shard-00000.meta.json": "24b503c135ccad6b",
        "shard-00000.tar": "f91f292ad6e454cb",
        "shard-00001.meta.json": "ae0eaebbd27529df",
        "shard-00001.tar": "db568ac97e5fc2b8",
        "shard-00002.meta.json": "87662c7874f1c796",
        "shard-00002.tar": "8eb22895e17daab2"
    }
}


def _digest(path: Path, where: dict[Path, str]) -> str:
    data = path.read_bytes()
    if path.suffix in (".json", ".yaml"):
        for folder, name in where.items():
            data = data.replace(str(folder).encode(), name.encode())
    return hashlib.sha256(data).hexdigest()[:16]


def _tree(folder: Path, where: dict[Path, str]) -> dict[str, str]:
    return {str(p.relative_to(folder)): _digest(p, where) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != "training_state.json"}  # it records times


def _run(cli, *args) -> None:
    code, _, err = cli(*args)
    assert code == 0, err


def digests(cli, work: Path, vae: Path) -> dict:
    out, where = {}, {vae: "VAE", work: "WORK"}
    for fmt in ("wds", "parquet"):
        _run(cli, "encode", "--dataset", "shapes", "--vae", "pixel", "--image-size", "16", "--num-samples", "48",
             "--samples-per-shard", "20", "--num-workers", "0", "--format", fmt, "--out", work / f"shards-{fmt}")
        out[fmt] = _tree(work / f"shards-{fmt}", where)
    _run(cli, "encode", "--dataset", "shapes", "--vae", vae, "--image-size", "32", "--num-samples", "12",
         "--samples-per-shard", "8", "--num-workers", "0", "--batch-size", "4", "--out", work / "shards-vae")
    out["vae"] = _tree(work / "shards-vae", where)
    reset_accelerate()
    _run(cli, "train", "--shards.path", work / "shards-wds", "--data.dataset_name", "shapes", "--data.image_size", "16",
         "--data.num_samples", "48", "--vae.name", "pixel", "--data.num_workers", "0", "--shards.samples_per_shard",
         "20", "--model.name", "DiT-S/4", "--model.hidden_size", "32", "--model.depth", "1", "--model.num_heads", "2",
         "--training.mixed_precision", "no", "--training.batch_size", "8", "--training.gradient_accumulation_steps",
         "2", "--training.max_steps", "5", "--checkpointing.steps", "2", "--lr_scheduler.warmup_steps", "2",
         "--training.learning_rate", "0.001", "--logging.output_dir", work / "out", "--logging.run_name", "r",
         "--logging.tensorboard", "false", "--logging.steps", "1")
    reset_accelerate()
    run = work / "out" / "r"
    out["checkpoints"] = {c.name: _tree(c, where) for c in sorted(run.glob("checkpoint-*"))
                          if c.is_dir() and not c.is_symlink()}
    _run(cli, "sample", "--checkpoint", run, "--num", "4", "--steps", "5", "--out", work / "grid.png",
         "--out-dir", work / "samples")
    out["samples"] = {**_tree(work / "samples", where), "grid.png": _digest(work / "grid.png", where)}
    return out


def test_written_bytes_are_the_pinned_ones(cli, tmp_path, tiny_vae, one_thread):
    got = digests(cli, tmp_path, tiny_vae)
    assert got.keys() == PINNED.keys()
    for part in PINNED:
        assert got[part] == PINNED[part], f"{part}: the bytes written changed"
