"""`ditpipe sample`: our checkpoints, official-layout state dicts, guidance, determinism, the files it writes."""

import numpy as np
import pytest
import torch
from PIL import Image

from ditpipe.pipeline.diffusion import make_objective
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.generate import SampleNoise, generate
from ditpipe.pipeline.model import build_dit
from ditpipe.pipeline.sample_options import SampleOptions
from ditpipe.pipeline.sampleable import OFFICIAL_SETTINGS, load_sampleable, resolve_settings
from ditpipe.stages.sample import class_list, sample

from conftest import train_tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("run"), 128, **{"training.max_steps": 6,
                                                              "lr_scheduler.warmup_steps": 0,
                                                              "training.learning_rate": 1e-2})


def test_grid_and_per_sample_files(run_dir, tmp_path):
    images = sample(run_dir, SampleOptions(num=16, steps=5, batch_size=6), out=tmp_path / "grid.png",
                    out_dir=tmp_path / "each")
    assert images.shape == (16, 16, 16, 3) and images.dtype == np.uint8
    names = sorted(p.name for p in (tmp_path / "each").iterdir())
    assert names[:3] == ["0000_class0.png", "0001_class1.png", "0002_class2.png"] and len(names) == 16
    assert names[-1] == "0015_class7.png"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "each" / "0005_class5.png")), images[5])
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 8 * 64 and grid.height > 2 * 64  # 8 class columns, cells enlarged for visibility


def test_same_seed_same_samples_and_ema_choice(run_dir, tmp_path):
    a = sample(run_dir, SampleOptions(num=8, steps=4, seed=3), out=None)
    b = sample(run_dir, SampleOptions(num=8, steps=4, seed=3), out=None)
    c = sample(run_dir, SampleOptions(num=8, steps=4, seed=4), out=None)
    raw = sample(run_dir, SampleOptions(num=8, steps=4, seed=3, use_ema=False), out=None)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, raw)
    assert sample(run_dir, SampleOptions(num=8, steps=4, seed=3, sampler="ddim"), out=None).shape == a.shape


def test_cfg_scale_one_is_plain_conditional_sampling(run_dir):
    s = load_sampleable(run_dir)
    labels = torch.tensor([0, 3, 5, 7])
    guided = generate(s.model, s.objective, s.latent_shape, labels, 4, "ddim", 5, 1.0, 11, torch.device("cpu"))
    gen = torch.Generator().manual_seed(11)
    plain = s.objective.sample(lambda x, t: s.model(x, t, labels), (4, *s.latent_shape), "ddim", 5, gen,
                               torch.device("cpu"))
    assert torch.equal(guided, plain)
    strong = generate(s.model, s.objective, s.latent_shape, labels, 4, "ddim", 5, 4.0, 11, torch.device("cpu"))
    assert not torch.equal(guided, strong)


def test_guidance_doubles_the_batch_like_official_sample_py(run_dir):
    """Official sample.py: z = randn(n); z = cat([z, z]); y = cat([y, null]); sample the 2n batch with
    forward_with_cfg; keep the first half. Ours must give exactly that."""
    s = load_sampleable(run_dir)
    y = torch.tensor([1, 2])
    ours = generate(s.model, s.objective, s.latent_shape, y, 2, "ddpm", 6, 3.0, 5, torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    z = torch.randn((2, *s.latent_shape), generator=gen)
    yy = torch.cat([y, torch.full_like(y, s.model.null_class)])
    ref = s.objective.sample(lambda x, t: s.model.forward_with_cfg(x, t, yy, 3.0), (4, *s.latent_shape), "ddpm", 6,
                             gen, torch.device("cpu"), noise=torch.cat([z, z]))[:2]
    assert torch.equal(ours, ref)


def test_guidance_interval_guides_only_the_high_noise_steps(run_dir):
    """cfg_interval=(0.5, 1): guided where the DDPM timestep is at least half of 999, plain conditional below."""
    s = load_sampleable(run_dir)
    y, cpu = torch.tensor([1, 6]), torch.device("cpu")
    full = generate(s.model, s.objective, s.latent_shape, y, 2, "ddim", 6, 4.0, 5, cpu)
    assert torch.equal(full, generate(s.model, s.objective, s.latent_shape, y, 2, "ddim", 6, 4.0, 5, cpu,
                                      cfg_interval=(0.0, 1.0)))
    half = generate(s.model, s.objective, s.latent_shape, y, 2, "ddim", 6, 4.0, 5, cpu, cfg_interval=(0.5, 1.0))
    seen = []

    def by_hand(x, t):  # x (4, C, H, W): [conditional, null] halves
        seen.append(int(t[0]))
        if t[0] >= 999 * 0.5:
            return s.model.forward_with_cfg(x, t, torch.cat([y, torch.full_like(y, s.model.null_class)]), 4.0)
        return s.model(x[:2], t[:2], y).repeat(2, 1, 1, 1)

    gen = torch.Generator().manual_seed(5)
    z = torch.randn((2, *s.latent_shape), generator=gen)
    ref = s.objective.sample(by_hand, (4, *s.latent_shape), "ddim", 6, gen, cpu, noise=torch.cat([z, z]))[:2]
    assert torch.equal(half, ref) and not torch.equal(half, full)
    assert min(seen) < 500 <= max(seen)  # both kinds of step happened


def test_official_layout_state_dict_loads_strictly_and_samples(tmp_path, tiny_vae):
    """An official-style checkpoint is a bare state dict; --model/--image-size give its shape, --vae the decoder
    and the VAE's config the scaling factor."""
    torch.manual_seed(0)
    model = build_dit("DiT-S/8", input_size=16, in_channels=4, num_classes=1000)
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.02)  # not zero-init, so the samples depend on the weights
    torch.save(model.state_dict(), tmp_path / "DiT-S-8-32x32.pt")
    s = load_sampleable(tmp_path / "DiT-S-8-32x32.pt", model_name="DiT-S/8", image_size=32, vae=str(tiny_vae))
    assert s.latent_shape == (4, 16, 16) and s.norm.scale == (pytest.approx(0.18215),) * 4
    assert all(torch.equal(a, b) for a, b in zip(s.model.state_dict().values(), model.state_dict().values()))
    images = sample(tmp_path / "DiT-S-8-32x32.pt", SampleOptions(model_name="DiT-S/8", image_size=32, vae=str(tiny_vae),
                                                                 steps=3), classes="1,207,980", out=tmp_path / "g.png")
    assert images.shape == (3, 32, 32, 3)
    # the same weights through our own generate() give the same pixels: each sample's noise keyed on (seed,
    # index), and official DiT's guidance of the first 3 channels (the default for an official checkpoint)
    z = generate(model.eval(), make_objective("ddpm", True), (4, 16, 16), torch.tensor([1, 207, 980]), 3, "ddpm", 3,
                 4.0, 0, torch.device("cpu"), cfg_channels=3, noise=SampleNoise(0, range(3), torch.device("cpu")))
    from ditpipe.pipeline.generate import decode
    from ditpipe.pipeline.images import to_uint8

    assert np.array_equal(to_uint8(decode(z, s.codec, s.norm)), images)


def test_official_checkpoint_errors(tmp_path, tiny_vae):
    model = build_dit("DiT-S/8", input_size=16, in_channels=4, num_classes=1000)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    with pytest.raises(DitpipeError, match="pass --model"):
        load_sampleable(tmp_path / "ckpt.pt", vae=str(tiny_vae))
    with pytest.raises(DitpipeError, match="does not match DiT-B/8"):
        load_sampleable(tmp_path / "ckpt.pt", model_name="DiT-B/8", image_size=32, vae=str(tiny_vae))
    import argparse

    torch.save({"model": model.state_dict(), "args": argparse.Namespace(x=1)}, tmp_path / "pickled.pt")
    with pytest.raises(DitpipeError, match="weights_only"):  # never unpickled
        load_sampleable(tmp_path / "pickled.pt", model_name="DiT-S/8", image_size=32, vae=str(tiny_vae))


def test_class_list():
    assert class_list(None, None, 4) == [0, 1, 2, 3]
    assert class_list("0,3", 5, 8) == [0, 3, 0, 3, 0]
    assert class_list(None, None, 0) is None
    with pytest.raises(DitpipeError, match="out of range"):
        class_list("9", None, 8)
    with pytest.raises(DitpipeError, match="unconditional"):
        class_list("1", None, 0)


def test_classes_by_name_and_every_bad_value_is_a_one_line_error(run_dir, tmp_path, cli):
    from ditpipe.pipeline.sources import SHAPES_CLASS_NAMES

    names = list(SHAPES_CLASS_NAMES)
    assert class_list("red_circle, 3,yellow_square", None, 8, names) == [0, 3, 7]
    with pytest.raises(DitpipeError, match="'red_cirle': not a class id or name; the model's classes are 0 red_circle"):
        class_list("red_cirle", None, 8, names)
    code, _, err = cli("sample", "--checkpoint", run_dir, "--classes", "green_square,blue_circle", "--num", "2",
                       "--steps", "2", "--out", tmp_path / "g.png", "--out-dir", tmp_path / "d")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["0000_class3.png", "0001_class4.png"]
    for args, code_wanted, words in [
            (["--classes", "red_circel"], 1, "not a class id or name"), (["--classes", "1.5"], 1, "red_circle"),
            (["--classes", ","], 1, "names no class"), (["--classes", "8"], 1, "out of range"),
            (["--num", "0"], 2, "--num"), (["--steps", "0"], 2, "--steps"), (["--batch-size", "0"], 2, "--batch-size"),
            (["--seed", "-1"], 2, "--seed"), (["--cfg-scale", "0.5"], 2, "--cfg-scale"),
            (["--cfg-interval", "a,b"], 2, "--cfg-interval"), (["--out", str(tmp_path / "grid.txt")], 1, "suffix")]:
        code, _, err = cli("sample", "--checkpoint", run_dir, "--steps", "2", "--out", tmp_path / "x.png", *args)
        assert code == code_wanted and words in err and "Traceback" not in err, (args, err)
    code, _, err = cli("sample", "--checkpoint", tmp_path / "nowhere")
    assert code == 1 and "'" + str(tmp_path / "nowhere") + "' does not exist" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def tuned_flow_run(tmp_path_factory):
    """A flow run that validated with its own sampler settings, as the quickstart's does."""
    return train_tiny(tmp_path_factory.mktemp("flow"), 64, **{
        "training.max_steps": 3, "diffusion.objective": "flow", "validation.sampler": "heun",
        "validation.sampling_steps": 3, "validation.cfg_scale": 2.5, "validation.cfg_interval": [0.5, 1.0]})


def test_sampling_defaults_to_the_runs_validation_settings_and_prints_every_value(tuned_flow_run, tmp_path, cli):
    run = tuned_flow_run
    code, _, err = cli("sample", "--checkpoint", run, "--num", "8", "--out", tmp_path / "a.png",
                       "--out-dir", tmp_path / "a")
    assert code == 0, err
    assert "heun × 3 steps, cfg 2.5 at noise 0.5–1, seed 0 (defaults from the run's validation settings)" in err
    explicit = sample(run, SampleOptions(num=8, sampler="heun", steps=3, cfg_scale=2.5, cfg_interval=(0.5, 1.0)),
                      out=None)
    assert np.array_equal(np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "a").iterdir())]), explicit)
    code, _, err = cli("sample", "--checkpoint", run, "--num", "8", "--sampler", "euler", "--cfg-scale", "1",
                       "--out", tmp_path / "b.png")
    assert code == 0 and "euler × 3 steps, cfg 1 (no guidance), seed 0 (defaults from" in err
    code, _, err = cli("sample", "--checkpoint", run, "--num", "8", "--sampler", "heun", "--steps", "4",
                       "--cfg-scale", "3", "--cfg-interval", "0,1", "--seed", "2", "--out", tmp_path / "c.png")
    assert code == 0 and "heun × 4 steps, cfg 3 at noise 0–1, seed 2" in err and "defaults from" not in err


def test_unconditional_models_print_no_cfg_and_refuse_one(tmp_path_factory, tmp_path, cli):
    run = train_tiny(tmp_path_factory.mktemp("uncond"), 32, **{"training.max_steps": 2,
                                                               "model.conditioning": "none"})
    code, _, err = cli("sample", "--checkpoint", run, "--num", "2", "--steps", "2", "--out", tmp_path / "u.png")
    assert code == 0, err
    line = next(x for x in err.splitlines() if x.startswith("sampling"))
    assert "ddpm × 2 steps, unconditional, seed 0" in line and "cfg" not in line
    code, _, err = cli("sample", "--checkpoint", run, "--cfg-scale", "3", "--out", tmp_path / "u.png")
    assert code == 1 and "unconditional" in err and "drop --cfg-scale" in err


def test_official_checkpoints_keep_official_dits_settings(tmp_path, tiny_vae, capsys):
    model = build_dit("DiT-S/8", input_size=16, in_channels=4, num_classes=1000)
    torch.save(model.state_dict(), tmp_path / "DiT-S-8-32x32.pt")
    s = load_sampleable(tmp_path / "DiT-S-8-32x32.pt", model_name="DiT-S/8", image_size=32, vae=str(tiny_vae))
    assert resolve_settings(s, "sample") == OFFICIAL_SETTINGS["sample"]  # official sample.py: DDPM 250, cfg 4.0
    assert resolve_settings(s, "evaluate").cfg_scale == 1.5  # official sample_ddp.py, the paper's FID-50K
    assert resolve_settings(s, "sample", steps=3).steps == 3 and OFFICIAL_SETTINGS["sample"].steps == 250


def test_cli_sample(run_dir, tmp_path, cli):
    code, _, err = cli("sample", "--checkpoint", run_dir / "checkpoint-6", "--classes", "2,4", "--num", "4",
                       "--steps", "3", "--sampler", "ddim", "--out", tmp_path / "g.png", "--out-dir", tmp_path / "d")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["0000_class2.png", "0001_class4.png",
                                                                  "0002_class2.png", "0003_class4.png"]
    code, _, err = cli("sample", "--checkpoint", run_dir, "--cfg-interval", "0.7,0.2", "--out", tmp_path / "x.png")
    assert code == 2 and "--cfg-interval" in err and "LOW <= HIGH" in err
    code, _, err = cli("sample", "--checkpoint", run_dir, "--sampler", "euler", "--out", tmp_path / "x.png")
    assert code == 1 and "valid samplers: ddpm, ddim" in err


def test_grid_column_labels_wrap_instead_of_being_cut():
    from ditpipe.pipeline.images import _wrap, make_grid

    assert _wrap("yellow_square", 11) == ["yellow", "square"] and _wrap("red_circle", 11) == ["red circle"]
    images = np.zeros((4, 16, 16, 3), np.uint8)
    grid = np.asarray(make_grid(images, 2, column_labels=["yellow_square", "red"], min_cell=64))
    assert grid.shape == (26 + 2 * (64 + 2) + 2, 2 * (64 + 2) + 2, 3)  # two label lines of 12 px above the cells
    assert grid[13:25, :66].any() and not grid[13:25, 66:].any()  # the second line exists only where it wrapped
