"""What the commands say on the way: encode's next step and its one rate, empty inputs, worker counts, help text,
third-party noise in front of our errors, and no temporary paths."""

import os
import re
import shlex
import subprocess
import sys
import warnings


from conftest import photo, train_tiny
from ditpipe.pipeline.config import load_config, parse_overrides
from ditpipe.pipeline.manifest import load_manifest
from ditpipe.pipeline.workers import usable_cpus


def test_encode_with_no_usable_image_exits_1_and_says_why(bad_corpus, tmp_path, cli):
    folder, _ = bad_corpus
    for good in folder.glob("good.jpg"):
        good.unlink()
    for name in ("cmyk.jpg", "gray16.png", "palette_alpha.png", "la.png", "rotated.jpg", "tiny.png"):
        (folder / name).unlink()  # only the files that cannot be used are left
    code, _, err = cli("encode", "--dataset", "custom", "--data-path", folder, "--vae", "pixel", "--image-size", "16",
                       "--out", tmp_path / "s", "--data.num_workers", "0")
    assert code == 1, err
    assert "error: no usable image: all 6 input(s) were skipped" in " ".join(err.split()) and "Traceback" not in err
    assert "empty file" in err and "decompression bomb" in err  # the reasons, listed


def test_num_samples_null_means_all_and_names_the_folder_so(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        photo(24, 20, i).save(tmp_path / "imgs" / f"{i}.png")
    code, _, err = cli("encode", "--dataset", "custom", "--data-path", "imgs", "--vae", "pixel", "--image-size", "16",
                       "--num-samples", "null", "--num-workers", "0")
    assert code == 0, err
    assert load_manifest(tmp_path / "shards" / "custom-imgs-16px-pixel-all")["num_samples"] == 3
    code, _, err = cli("encode", "--dataset", "custom", "--data-path", "imgs", "--vae", "pixel", "--image-size", "16",
                       "--num-workers", "0")  # the default num_samples, 5000: the name says what was asked for
    assert code == 0, err
    assert "note: data.num_samples 5,000 asks for more than the 3 inputs there" in " ".join(err.split())
    assert load_manifest(tmp_path / "shards" / "custom-imgs-16px-pixel-5000")["num_samples"] == 3


def test_encode_ends_with_the_train_command_that_finds_its_shards(tmp_path, monkeypatch, cli):
    from ditpipe.pipeline.training import check_manifest

    monkeypatch.chdir(tmp_path)
    code, _, err = cli("encode", "--dataset", "shapes", "--vae", "pixel", "--image-size", "16", "--num-samples", "40",
                       "--no-flip", "--out", "my shards", "--data.num_workers", "0")
    assert code == 0, err
    line = next(x for x in err.splitlines() if x.startswith("next: "))  # one line, whatever the width
    argv = shlex.split(line[len("next: "):])
    assert argv[:2] == ["ditpipe", "train"]
    config = argv[3] if argv[2] == "--config" else None  # a CPU's line names the small recipe (--config cpu)
    cfg = load_config(config, parse_overrides(argv[4:] if config else argv[2:]))
    assert cfg.shards_path == tmp_path / "my shards" or str(cfg.shards_path) == "my shards"
    assert cfg.shards.flip is False and cfg.data.num_samples == 40
    check_manifest(cfg, load_manifest(cfg.shards_path), cfg.shards_path)  # train accepts these shards


def test_the_encode_bar_and_summary_show_one_rate(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("encode", "--dataset", "shapes", "--vae", "pixel", "--image-size", "16", "--num-samples", "600",
                       "--out", "s", "--samples-per-shard", "200", "--data.num_workers", "0")
    assert code == 0, err
    bar = re.search(r"600/600 ([\d,]+) img/s", err)
    summary = re.search(r"rate\s*│\s*([\d,]+) img/s", err)
    assert bar and summary and bar.group(1) == summary.group(1), err


def test_workers_are_capped_at_the_cpus_with_a_notice(tmp_path, capsys):
    from ditpipe.stages.encode import encode

    many = usable_cpus() + 3
    data = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 64, "vae.name": "pixel",
            "shards.path": str(tmp_path / "s"), "data.num_workers": many}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode(load_config(None, data))
        train_tiny(tmp_path / "t", 64, **{"data.num_workers": many, "training.max_steps": 2})
    err = " ".join(capsys.readouterr().err.split())
    notice = f"note: data.num_workers {many} is more than the {usable_cpus()} CPU(s) this process may use"
    assert err.count(notice) == 2, err  # once by encode, once by train
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]


def test_help_keeps_bracketed_words(cli):
    code, out, _ = cli("encode", "--help")
    assert code == 0 and "ditpipe[text]" in out.replace("\n", "").replace("│", "").replace(" ", "")
    assert "--no-flip" in out and "glyph" in out
    code, out, _ = cli("train", "--help")
    assert "[overrides]" in " ".join(out.split())


def test_third_party_deprecation_warnings_stay_out_of_our_errors(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()", "encode", "--dataset",
                           "shapes", "--num-samples", "4", "--out", str(tmp_path / "s")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[-1].startswith("error: VAE 'stabilityai/sd-vae-ft-ema'"), proc.stderr
    assert all(x.startswith("note: data.num_workers") for x in lines[:-1]), proc.stderr  # no library warnings
    assert "hf download stabilityai/sd-vae-ft-ema --local-dir" in proc.stderr  # the current CLI's spelling


def test_export_names_the_folder_it_wrote_not_its_temporary(tmp_path, cli):
    run = train_tiny(tmp_path, 32, **{"training.max_steps": 1})
    code, _, err = cli("export", run, "--format", "diffusers", "--out", tmp_path / "exported")
    assert code == 0, err
    assert "tmp" not in err.replace(str(tmp_path), "") and str(tmp_path / "exported") in " ".join(err.split())
    assert (tmp_path / "exported" / "transformer").is_dir()
