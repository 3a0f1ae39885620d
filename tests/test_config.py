"""The typed config: the training guide's defaults, YAML quirks, overrides, and errors that name every bad key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ditpipe.pipeline.config import Config, ConfigError, known_keys, load_config, parse_overrides, resolve_config_path

REPO = Path(__file__).resolve().parents[1]
GUIDE = {  # the training guide's keys and defaults (shared/reference/training_guide.md)
    "data.dataset_name": "coco", "data.dataset_path": "./data", "data.image_size": 256, "data.num_samples": 5000,
    "training.batch_size": 4, "training.num_epochs": 50, "training.learning_rate": 1e-4,
    "training.gradient_accumulation_steps": 4, "training.mixed_precision": "fp16", "training.max_grad_norm": 1.0,
    "training.use_ema": True, "training.ema_decay": 0.9999, "lr_scheduler.type": "cosine",
    "lr_scheduler.warmup_steps": 500, "vae.use_slicing": False,
}


def get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def test_schema_defaults_are_the_guides():
    cfg = Config()
    for key, value in GUIDE.items():
        assert get(cfg, key) == value, key


def test_train_config_yaml_carries_the_guides_keys_and_values():
    raw = yaml.safe_load((REPO / "configs" / "train_config.yaml").read_text())
    flat = {f"{s}.{k}": v for s, sec in raw.items() for k, v in sec.items()}
    assert set(GUIDE) <= set(flat)
    assert flat["training.learning_rate"] == "1e-4"  # PyYAML's YAML 1.1 reads it as a string ...
    cfg = load_config("configs/train_config.yaml")
    for key, value in GUIDE.items():
        assert get(cfg, key) == value, key
    assert isinstance(cfg.training.learning_rate, float)  # ... and the typed schema makes it a number


def test_every_design_key_exists():
    keys = set(known_keys())
    for key in ["data.split", "data.captions", "data.source", "data.num_workers", "shards.path", "shards.format",
                "shards.samples_per_shard", "shards.store", "shards.flip", "vae.name", "vae.dtype", "vae.batch_size",
                "model.name", "model.conditioning", "model.learn_sigma", "model.class_dropout_prob", "model.qk_norm",
                "model.gradient_checkpointing", "model.compile", "diffusion.objective", "training.seed",
                "training.max_steps", "training.weight_decay", "training.ema_warmup", "checkpointing.steps",
                "checkpointing.every_epoch", "checkpointing.total_limit", "logging.steps", "logging.output_dir",
                "logging.run_name", "logging.tensorboard", "validation.every_steps", "validation.num_samples",
                "validation.cfg_scale", "validation.sampling_steps"]:
        assert key in keys, key


def test_every_problem_is_reported_at_once_with_its_key_and_a_suggestion():
    with pytest.raises(ConfigError) as info:
        load_config(None, {"training.batchsize": 8, "data.image_size": -1, "lr_scheduler.type": "cos",
                           "training.learning_rate": "fast", "training.image_size": 64, "vae.dtype": "fp16"})
    problems = dict(info.value.problems)
    assert len(problems) == 6
    assert "training.batch_size" in problems["training.batchsize"]
    assert "data.image_size" in problems["training.image_size"]  # the same key in another section
    assert "greater than or equal to 8" in problems["data.image_size"]
    assert "'cosine'" in problems["lr_scheduler.type"]
    assert "fast" in problems["training.learning_rate"]
    assert "'fp32' or 'bf16'" in problems["vae.dtype"]  # fp16 is refused: SD VAEs overflow in it


def test_guidance_interval_and_adam_betas():
    cfg = load_config(None, {"validation.cfg_interval": [0.5, 1], "training.adam_beta2": 0.95})
    assert cfg.validation.cfg_interval == (0.5, 1.0) and cfg.training.adam_beta2 == 0.95
    assert load_config(None, {}).validation.cfg_interval == (0.0, 1.0)  # guided everywhere, as official DiT
    with pytest.raises(ConfigError) as info:
        load_config(None, {"validation.cfg_interval": [0.8, 0.2], "training.adam_beta2": 1.0})
    problems = dict(info.value.problems)
    assert "0 <= low <= high <= 1" in problems["validation.cfg_interval"] and "training.adam_beta2" in problems


def test_overrides_both_spellings_and_set():
    over = parse_overrides(["--data.dataset_name", "custom", "--data.dataset_path=./data/custom",
                            "--set", "training.learning_rate=5e-5", "--training.max_steps", "null",
                            "--training.seed", "-3"])
    assert over == {"data.dataset_name": "custom", "data.dataset_path": "./data/custom",
                    "training.learning_rate": 5e-5, "training.max_steps": None, "training.seed": -3}
    with pytest.raises(ConfigError) as info:
        load_config("train_config", over)
    assert [k for k, _ in info.value.problems] == ["training.seed"]
    over["training.seed"] = 3
    cfg = load_config("train_config", over)
    assert (cfg.data.dataset_name, cfg.data.dataset_path, cfg.training.learning_rate) == ("custom", "./data/custom",
                                                                                         5e-5)
    assert cfg.training.batch_size == 4  # untouched keys keep the file's values


def test_bad_override_arguments_are_reported():
    with pytest.raises(ConfigError) as info:
        parse_overrides(["--data.dataset_name", "--set", "nokey", "stray"])
    keys = [k for k, _ in info.value.problems]
    assert keys == ["data.dataset_name", "--set", "stray"]


def test_shards_path_is_derived_from_the_data_and_codec():
    cfg = load_config(None, {"data.dataset_name": "shapes", "data.image_size": 32, "vae.name": "pixel",
                             "data.num_samples": 2000})
    assert cfg.shards_path == Path("shards/shapes-32px-pixel-2000")
    cfg = load_config(None, {"data.split": "val", "data.num_samples": None, "vae.name": "/models/My-VAE/"})
    assert cfg.shards_path == Path("shards/coco-val-256px-my-vae-all")
    assert load_config(None, {"shards.path": "x/y"}).shards_path == Path("x/y")


def test_shapes_needs_a_sample_count():
    with pytest.raises(ConfigError) as info:
        load_config(None, {"data.dataset_name": "shapes", "data.num_samples": None})
    assert info.value.problems[0][0] == "data.num_samples"


def test_timestep_shape_is_a_flow_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, {"diffusion.timestep_std": 0.6})  # the default objective is ddpm
    assert [k for k, _ in info.value.problems] == ["diffusion.timestep_std"]
    assert "flow" in info.value.problems[0][1]
    cfg = load_config(None, {"diffusion.objective": "flow", "diffusion.timestep_std": 0.6})
    assert (cfg.diffusion.timestep_mean, cfg.diffusion.timestep_std) == (0.0, 0.6)
    with pytest.raises(ConfigError) as info:
        load_config(None, {"diffusion.objective": "flow", "diffusion.timestep_std": 0})
    assert [k for k, _ in info.value.problems] == ["diffusion.timestep_std"]


def test_config_hash_follows_content():
    a, b = load_config("train_config"), load_config("train_config", {"training.seed": 1})
    assert a.hash() == load_config("train_config").hash() != b.hash()


def test_shipped_configs_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ["quickstart", "quickstart.yaml", "configs/quickstart.yaml", "train_config"]:
        assert resolve_config_path(spec).name in ("quickstart.yaml", "train_config.yaml")
    assert load_config("quickstart").data.dataset_name == "shapes"
    with pytest.raises(ConfigError) as info:
        resolve_config_path("nonesuch.yaml")
    assert "quickstart" in str(info.value) and "train_config" in str(info.value)
    local = tmp_path / "quickstart.yaml"  # a real file of that name wins over the shipped one
    local.write_text("training:\n  seed: 7\n")
    assert load_config("quickstart.yaml").training.seed == 7


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError):
        load_config(bad)
    bad.write_text("data: {image_size: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "not valid YAML" in str(info.value)


def test_cli_config_errors_exit_2_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()", "encode",
                           "--dataset", "shapes", "--training.batchsize", "3", "--data.image_size", "abc"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "training.batchsize" in proc.stderr and "did you mean 'training.batch_size'" in proc.stderr
    assert "data.image_size" in proc.stderr


def test_a_misspelt_section_suggests_the_same_named_key_before_spelling():
    with pytest.raises(ConfigError) as info:
        load_config(None, {"trainig.batch_size": 8, "trainig.learning_rate": 1e-3, "data.batch_size": 2})
    problems = dict(info.value.problems)
    assert "did you mean 'training.batch_size'" in problems["trainig.batch_size"]  # not training.seed
    assert "did you mean 'training.learning_rate'" in problems["trainig.learning_rate"]
    assert problems["data.batch_size"].endswith("batch_size'?")  # a batch_size of another section


def test_config_show_lists_every_key_with_value_default_and_meaning(cli):
    code, out, err = cli("config", "show", "--config", "quickstart", "--training.num_epochs", "20")
    assert code == 0, err
    rows = {line[2:].split()[0]: line for line in out.splitlines()[1:] if line[2:3].strip()}
    assert set(known_keys()) <= set(rows)
    assert rows["training.num_epochs"].startswith("*") and rows["training.num_epochs"][2:].split()[1:3] == ["20", "50"]
    assert rows["training.seed"].startswith(" ") and "model init, data order" in rows["training.seed"]
    assert all(len(row[2:].split(None, 3)) == 4 for row in rows.values())  # key, value, default and a meaning
    code, out, _ = cli("train", "--help")
    assert "ditpipe config show" in " ".join(out.split())
