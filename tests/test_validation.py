"""The held-out validation loss: a deterministic split that training never reads, fixed timesteps and noise through
the training objective, EMA and raw weights, logged to metrics.jsonl; or a separately encoded held-out folder."""

import json
import math

import numpy as np
import pytest
import torch

from ditpipe.pipeline.config import ConfigError, load_config
from ditpipe.pipeline.diffusion import make_objective
from ditpipe.pipeline.latent_norm import LatentNorm
from ditpipe.pipeline.order import EpochOrder
from ditpipe.pipeline.store import open_shards
from ditpipe.pipeline.metrics import read_metrics
from ditpipe.pipeline.validation import HeldOut, held_out_indices, loss_sums
from ditpipe.stages.encode import encode
from ditpipe.pipeline.hooks import RECORD_ENV
from ditpipe.stages.train import train

from tiny import TINY_MODEL, tiny_dit

TINY = {**TINY_MODEL,
        "data.num_workers": 0, "training.mixed_precision": "no", "lr_scheduler.warmup_steps": 0,
        "training.learning_rate": 3e-3, "logging.steps": 4, "logging.tensorboard": False,
        "checkpointing.steps": 1000, "training.batch_size": 16, "training.gradient_accumulation_steps": 1,
        "validation.grid": False}


def shapes(folder, n=128, seed=0, size=16):
    data = {"data.dataset_name": "shapes", "data.image_size": size, "data.num_samples": n, "vae.name": "pixel",
            "data.seed": seed, "shards.path": str(folder), "data.num_workers": 0, "shards.samples_per_shard": 50}
    encode(load_config(None, data))
    return data


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("val") / "train"
    return shapes(folder)


def test_the_split_is_deterministic_disjoint_and_spread():
    val = held_out_indices(1000, 0.1, seed=3)
    assert len(val) == 100 and np.array_equal(val, held_out_indices(1000, 0.1, seed=3))
    assert not np.array_equal(val, held_out_indices(1000, 0.1, seed=4))  # data.seed picks it
    assert len(np.unique(val // 100)) == 10  # every shard of 100 gives some, none gives all
    assert len(held_out_indices(10, 0.01, 0)) == 1 and len(held_out_indices(10, 0.0, 0)) == 0
    with pytest.raises(ConfigError, match="data.val_fraction"):
        held_out_indices(3, 0.9, 0)
    # the training order covers exactly the other samples, once per epoch, whatever the epoch
    order = EpochOrder([100] * 10, seed=0, window=3, exclude=val)
    assert order.num_samples == 900
    for epoch in range(3):
        seen = order(epoch, np.arange(900))
        assert sorted(seen.tolist()) == sorted(set(range(1000)) - set(val.tolist()))
    # with nothing excluded the order is what it always was
    assert np.array_equal(EpochOrder([100] * 10, 0, 3, exclude=np.zeros(0, np.int64))(1, np.arange(1000)),
                          EpochOrder([100] * 10, 0, 3)(1, np.arange(1000)))


def test_held_out_loss_is_logged_and_never_trained_on(tmp_path, train_shards, monkeypatch):
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv(RECORD_ENV, str(record))
    cfg = load_config(None, {**train_shards, **TINY, "data.val_fraction": 0.25, "validation.every_steps": 4,
                             "training.num_epochs": 3, "logging.output_dir": str(tmp_path / "out")})
    run = train(cfg)
    held = set(held_out_indices(128, 0.25, 0).tolist())
    trained = {g for line in record.read_text().splitlines() for g in json.loads(line)["indices"]}
    assert len(held) == 32 and trained and not trained & held  # 96 left: 6 steps an epoch of 16
    assert trained == set(range(128)) - held  # and every other sample was trained on

    rows = [m for m in read_metrics(run) if "val_loss_raw" in m]
    assert [m["step"] for m in rows] == [0, 4, 8, 12, 16, 18]  # step 0, every 4, and the end
    for m in rows:
        assert len(m["val_loss_ema_by_t"]) == len(m["val_loss_raw_by_t"]) == 10
        assert math.isclose(m["val_loss_raw"], sum(m["val_loss_raw_by_t"]) / 10, rel_tol=1e-5)
        assert all(math.isfinite(x) for x in m["val_loss_ema_by_t"] + m["val_loss_raw_by_t"])
    assert rows[0]["val_loss_ema"] == rows[0]["val_loss_raw"]  # before any step the EMA is the model
    assert rows[-1]["val_loss_raw"] < 0.9 * rows[0]["val_loss_raw"]  # it measures learning
    assert rows[-1]["val_loss_ema"] != rows[-1]["val_loss_raw"]
    # noise is hardest to predict at low t: the per-timestep curve shows it
    assert rows[-1]["val_loss_raw_by_t"][0] > rows[-1]["val_loss_raw_by_t"][-1]


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_the_held_out_loss_depends_on_the_weights_alone(train_shards, objective):
    """Fixed timesteps, noise, flips and posterior draws: the same weights give the same value every time, and
    splitting the set over ranks gives the same sums."""
    store, manifest = open_shards(train_shards["shards.path"])
    norm = LatentNorm.from_manifest(manifest, "scale")
    idx = held_out_indices(128, 0.25, 0)
    torch.manual_seed(0)
    model = tiny_dit("DiT-S/4", input_size=16, in_channels=3, num_classes=8, learn_sigma=objective == "ddpm").eval()
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.05)  # not zero-init, so the loss depends on the inputs
    objective = make_objective(objective, model.learn_sigma)
    whole = HeldOut(store, idx, norm, 0, rank=0, world=1)
    a = loss_sums(model, objective, whole, 8, 10, 7, torch.device("cpu"))
    b = loss_sums(model, objective, whole, 8, 10, 32, torch.device("cpu"))  # another batch size
    halves = [loss_sums(model, objective, HeldOut(store, idx, norm, 0, rank=r, world=2), 8, 10, 5,
                        torch.device("cpu")) for r in (0, 1)]
    assert torch.allclose(a, b, rtol=1e-6) and torch.allclose(a, halves[0] + halves[1], rtol=1e-6)
    other_seed = loss_sums(model, objective, HeldOut(store, idx, norm, 1, 0, 1), 8, 10, 32, torch.device("cpu"))
    assert not torch.allclose(a, other_seed)  # the draws are keyed on data.seed


def test_a_separately_encoded_held_out_folder(tmp_path, train_shards):
    shapes(tmp_path / "val", n=40, seed=7)  # other images, the same codec and classes
    cfg = load_config(None, {**train_shards, **TINY, "validation.shards": str(tmp_path / "val"),
                             "validation.every_steps": 4, "validation.loss_max_samples": 24, "training.num_epochs": 1,
                             "diffusion.objective": "flow", "logging.output_dir": str(tmp_path / "out")})
    run = train(cfg)
    rows = [m for m in read_metrics(run) if "val_loss_ema" in m]
    assert [m["step"] for m in rows] == [0, 4, 8] and rows[-1]["val_loss_raw"] < rows[0]["val_loss_raw"]
    assert [m["step"] for m in read_metrics(run) if "loss" in m][-1] == 8  # all 128 trained on: nothing held out

    shapes(tmp_path / "val32", n=8, size=32)
    bad = load_config(None, {**train_shards, **TINY, "validation.shards": str(tmp_path / "val32"),
                             "validation.every_steps": 8, "logging.output_dir": str(tmp_path / "out2")})
    with pytest.raises(ConfigError, match="validation.shards") as err:
        train(bad)
    assert "latents of shape [3, 32, 32]" in str(err.value) and str(tmp_path / "val32") in str(err.value)


def test_one_validation_set_at_a_time():
    with pytest.raises(ConfigError, match="validation.shards.*both"):
        load_config(None, {"data.val_fraction": 0.1, "validation.shards": "shards/coco-val"})
