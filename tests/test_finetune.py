"""Fine-tuning (`--init-from`): our checkpoints onto another class count, official-layout state dicts at another
image size, strict loading with named keys and shapes, and never unpickling."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ditpipe.pipeline.config import ConfigError, load_config
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.finetune import InitSource, adapt, load_init
from ditpipe.pipeline.metrics import read_metrics
from ditpipe.stages.encode import encode
from ditpipe.stages.train import train

from conftest import train_tiny
from tiny import TINY_MODEL, tiny_dit

TINY = {**TINY_MODEL, "training.mixed_precision": "no", "training.batch_size": 16,
        "training.gradient_accumulation_steps": 1, "logging.tensorboard": False, "data.num_workers": 0,
        "logging.steps": 1, "lr_scheduler.warmup_steps": 0}


def three_classes(folder, n=20, size=16):
    """A custom folder of 3 classes the shapes model never saw by these names: red discs, blue squares, yellow
    discs, at random sizes and places."""
    rng = np.random.default_rng(0)
    kinds = {"red_disc": ((255, 0, 0), "disc"), "blue_square": ((0, 0, 255), "square"),
             "yellow_disc": ((255, 255, 0), "disc")}
    for name, (colour, shape) in kinds.items():
        (folder / name).mkdir(parents=True)
        for i in range(n):
            img = Image.new("RGB", (size, size))
            d = int(rng.integers(size // 4, 3 * size // 4 + 1))
            x, y = (int(v) for v in rng.integers(0, size - d + 1, 2))
            draw = ImageDraw.Draw(img)
            (draw.ellipse if shape == "disc" else draw.rectangle)([x, y, x + d - 1, y + d - 1], fill=colour)
            img.save(folder / name / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A checkpoint trained on the 8 shapes classes."""
    return train_tiny(tmp_path_factory.mktemp("src"), 256, **{"training.max_steps": 80, "logging.steps": 20,
                                                              "lr_scheduler.warmup_steps": 0,
                                                              "training.learning_rate": 3e-3})


def test_fine_tune_onto_another_class_count_starts_lower_and_trains(tmp_path, source_run, capsys):
    data = {"data.dataset_name": "custom", "data.dataset_path": str(three_classes(tmp_path / "custom")),
            "data.image_size": 16, "data.num_samples": None, "vae.name": "pixel", "shards.path": str(tmp_path / "s")}
    encode(load_config(None, {**data, "data.num_workers": 0}))
    common = {**data, **TINY, "training.max_steps": 12, "logging.output_dir": str(tmp_path / "out"),
              "training.learning_rate": 1e-3}
    scratch = train(load_config(None, {**common, "logging.run_name": "scratch"}))
    capsys.readouterr()
    tuned = train(load_config(None, {**common, "logging.run_name": "tuned", "model.init_from": str(source_run)}))
    err = capsys.readouterr().err
    assert "ema.pt, step 80" in err and "step count and optimizer start fresh" in err  # EMA by default, said so
    assert "label table re-initialised (8 classes in the checkpoint, 3 here)" in err and "null-class row" in err

    a, b = ([m["loss"] for m in read_metrics(r) if "loss" in m] for r in (scratch, tuned))
    assert b[0] < 0.9 * a[0], (a[0], b[0])  # step 0's loss: the fine-tune starts below from-scratch
    assert all(np.isfinite(b)) and np.mean(b) < np.mean(a)
    state = json.loads((tuned / "checkpoint-12" / "training_state.json").read_text())
    assert state["step"] == 12  # a new run from step 0, not a resume of step 80
    final = torch.load(tuned / "checkpoint-12" / "model.pt", weights_only=True)
    ema_src = torch.load(source_run / "checkpoint-80" / "ema.pt", weights_only=True)
    assert final["y_embedder.embedding_table.weight"].shape == (4, 32)  # 3 classes + null
    assert not torch.equal(final["blocks.0.attn.qkv.weight"], ema_src["blocks.0.attn.qkv.weight"])  # it trained


def official_like(num_classes=1000, input_size=8, hidden=32, learn_sigma=True):
    """A DiT in the official layout (1,000 ImageNet classes + null), as torch.save(model.state_dict()) writes it."""
    torch.manual_seed(1)
    model = tiny_dit("DiT-S/2", input_size=input_size, in_channels=4, num_classes=num_classes, hidden_size=hidden,
                     depth=2, learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)  # not zero-init: outputs depend on every weight
    return model


def test_official_checkpoint_onto_8_classes_at_another_size(tmp_path):
    src = official_like()
    torch.save(src.state_dict(), tmp_path / "DiT-tiny-1000.pt")
    torch.manual_seed(0)
    dst = tiny_dit("DiT-S/2", input_size=4, in_channels=4, num_classes=8, depth=2)
    fresh = dst.state_dict()
    state, notes = adapt(load_init(tmp_path / "DiT-tiny-1000.pt"), dst, [f"c{i}" for i in range(8)])
    dst.load_state_dict(state, strict=True)
    assert any("1000 classes in the checkpoint, 8 here" in n for n in notes)
    assert any("position embedding recomputed for this run's 2×2 patch grid (the checkpoint's is 4×4)" in n
               for n in notes)
    table = dst.y_embedder.embedding_table.weight
    assert torch.equal(table[8], src.y_embedder.embedding_table.weight[1000])  # the null row, moved to index 8
    assert torch.equal(table[:8], fresh["y_embedder.embedding_table.weight"][:8])  # class rows: this run's init
    assert torch.equal(dst.pos_embed, fresh["pos_embed"])  # sin-cos for the 2×2 grid
    for k, v in src.state_dict().items():  # everything else strictly as loaded
        if k not in ("pos_embed", "y_embedder.embedding_table.weight"):
            assert torch.equal(dst.state_dict()[k], v), k
    # so the unconditional (null-class) prediction carries over exactly at the checkpoint's own size
    same = tiny_dit("DiT-S/2", input_size=8, in_channels=4, num_classes=8, depth=2)
    same.load_state_dict(adapt(load_init(tmp_path / "DiT-tiny-1000.pt"), same, None)[0])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(same.eval()(x, t, torch.tensor([8, 8])), src.eval()(x, t, torch.tensor([1000, 1000])))


def test_an_unconditional_run_keeps_the_checkpoints_unconditional_model():
    src = official_like()
    dst = tiny_dit("DiT-S/2", input_size=8, in_channels=4, num_classes=0, depth=2)
    state, notes = adapt(InitSource(src.state_dict(), "src"), dst, None)
    dst.load_state_dict(state, strict=True)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0, 500])
    with torch.no_grad():
        assert torch.allclose(dst.eval()(x, t), src.eval()(x, t, torch.tensor([1000, 1000])), atol=1e-6)
    assert "folded into t_embedder.mlp.2.bias" in notes[0]


def test_other_mismatches_name_every_key_and_shape(tmp_path):
    src = official_like(hidden=48)
    dst = tiny_dit("DiT-S/2", input_size=8, in_channels=4, num_classes=1000, learn_sigma=False)
    with pytest.raises(ConfigError) as err:
        adapt(InitSource(src.state_dict(), "DiT-XL-2-256x256.pt"), dst, None)
    text = str(err.value)
    assert "DiT-XL-2-256x256.pt" in text and "x_embedder.proj.weight" in text
    assert "checkpoint (48, 4, 2, 2), this model (32, 4, 2, 2)" in text
    assert "blocks.1.attn.qkv.weight" in text and "in the checkpoint, not in this model" in text
    assert "looks like hidden 48, depth 2, patch 2, 4 input channels, learned sigma, 1000 classes + null" in text


def test_loading_never_unpickles_and_says_what_it_takes(tmp_path):
    torch.save({"model": official_like().state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "train.pt")
    with pytest.raises(DitpipeError, match=r"train\.pt.*weights_only=True.*never unpickles"):
        load_init(tmp_path / "train.pt")
    with pytest.raises(DitpipeError, match="does not exist.*official DiT .pt"):
        load_init(tmp_path / "missing.pt")
    torch.save({"ema": {"w": torch.ones(1)}, "model": {"w": torch.zeros(1)}}, tmp_path / "both.pt")
    assert load_init(tmp_path / "both.pt").state["w"].item() == 1.0  # the official training checkpoint's EMA


def test_cli_refuses_init_from_with_resume(cli, tmp_path):
    code, _, err = cli("train", "--resume", str(tmp_path), "--init-from", str(tmp_path / "x.pt"))
    assert code == 1 and "--init-from starts a new run" in err
