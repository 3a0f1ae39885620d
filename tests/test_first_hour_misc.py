"""A new user's first hour, round two (issue 26): item 6, the default VAE with no hub (offline, or the hub
unreachable) fails at once, naming the real cause and the fix; and item 8: `inspect` of a checkpoint shows the
precision that ran and ditpipe's version once, the diffusers export message names the folder as given, every file
of an export has the mode the umask gives, `exports/` is ignored by git, and at 80 columns `sample --help` cuts
nothing and `runs` shows each run's name whole on one line."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import train_tiny

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()"]
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # vae.name's default
FIX = f"`hf download {DEFAULT_VAE} --local-dir /models/sd-vae-ft-mse`"


def clean_env(**extra) -> dict:
    """This process's environment without the hub's and the proxies' variables (nothing may reach a network)."""
    drop = {"HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"}
    env = {k: v for k, v in os.environ.items() if k.upper() not in drop}
    return {**env, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **extra}


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released: a connection to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Loads the default VAE in a fresh process (the hub client reads its settings at import) and prints how long the
# load took (diffusers imported before the clock starts) and what it raised.
LOAD = [sys.executable, "-c", "import json, sys, time\nimport diffusers\n"
        "from ditpipe.pipeline.codec import load_codec\n"
        "t = time.perf_counter()\ntry:\n    load_codec(sys.argv[1])\n    error = None\n"
        "except Exception as e:\n    error = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'error': error}))", DEFAULT_VAE]


def load_default_vae(tmp_path: Path, **env) -> tuple[float, str]:
    home = tmp_path / "hf-home"  # empty: the VAE is not in the cache
    home.mkdir(exist_ok=True)
    done = subprocess.run(LOAD, env=clean_env(HF_HOME=str(home), **env), capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)  # cwd: the id is not a local folder by accident
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], result["error"] or ""


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_default_vae_offline_fails_at_once_naming_the_cause_and_the_fix(tmp_path):
    seconds, error = load_default_vae(tmp_path, HF_HUB_OFFLINE="1")
    assert seconds < 5, f"{seconds:.1f} s"
    assert error.startswith("CodecError: ") and "\n" not in error
    assert DEFAULT_VAE in error and "not in the Hugging Face cache" in error and str(tmp_path / "hf-home") in error
    assert "HF_HUB_OFFLINE is set (offline)" in error and "config.json" not in error
    assert FIX in error and "--vae /models/sd-vae-ft-mse" in error and "--vae pixel" in error


def test_default_vae_with_the_hub_unreachable_fails_at_once_naming_the_cause_and_the_fix(tmp_path):
    """HF_HUB_OFFLINE unset, the hub's endpoint a closed local port: no retries for 23 s, no 'config.json' blamed."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    seconds, error = load_default_vae(tmp_path, HF_ENDPOINT=endpoint)
    assert seconds < 5, f"{seconds:.1f} s: {error}"
    assert error.startswith("CodecError: ") and "\n" not in error
    assert DEFAULT_VAE in error and "not in the Hugging Face cache" in error
    assert f"the hub ({endpoint}) is unreachable" in error and "refused" in error.lower()
    assert "config.json" not in error
    assert FIX in error and "--vae /models/sd-vae-ft-mse" in error and "--vae pixel" in error


# ---------------------------------------------------------------------------------------------------- item 8


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    """A tiny run configured fp16, which a CPU runs in bf16 (what its checkpoints record)."""
    return train_tiny(tmp_path_factory.mktemp("fp16"), 64, **{"training.mixed_precision": "fp16",
                                                               "training.max_steps": 4})


def flat(text: str) -> str:
    """A rich table's text with its borders gone and its wrapped cells joined."""
    return " ".join(text.replace("│", " ").replace("┃", " ").split())


def test_inspect_shows_the_precision_that_ran_and_the_version_once(fp16_run, tmp_path, cli):
    import shutil

    from ditpipe.pipeline import __version__

    ckpt = fp16_run / "checkpoint-4"
    code, out, err = cli("inspect", ckpt)
    assert code == 0, err
    text = flat(out)
    assert "precision bf16 (configured fp16)" in text, text
    written = re.search(r"written by (.*?\)) ", text).group(1)
    assert written.count("ditpipe") == 1 and written.count(__version__) == 1, written
    older = tmp_path / "older"  # a checkpoint from before the state recorded the precision
    shutil.copytree(ckpt, older)
    state = json.loads((older / "training_state.json").read_text())
    del state["precision"]
    (older / "training_state.json").write_text(json.dumps(state))
    code, out, err = cli("inspect", older)
    assert code == 0 and "precision fp16 (configured)" in flat(out), out + err


def export_modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_files_take_the_umask_mode_and_the_message_names_the_folder(fp16_run, tmp_path, cli, monkeypatch,
                                                                           umask):
    monkeypatch.chdir(tmp_path)
    old = os.umask(umask)
    try:
        code, _, err = cli("export", fp16_run, "--format", "safetensors", "--out", "exports/st")
        assert code == 0, err
        code, _, err = cli("export", fp16_run, "--format", "diffusers", "--out", "exports/df")
        assert code == 0, err
    finally:
        os.umask(old)
    for folder in ("exports/st", "exports/df"):
        modes = export_modes(tmp_path / folder)
        assert "model.safetensors" in modes or "transformer/diffusion_pytorch_model.safetensors" in modes, modes
        assert set(modes.values()) == {0o666 & ~umask}, modes
    assert "exports/df/transformer loads with" in " ".join(err.split()), err  # 8 classes: the transformer alone


def test_exports_is_ignored_by_git():
    for path in ("exports/quickstart/model.safetensors", "exports/x/transformer/config.json"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert done.returncode == 0, f"{path} is not ignored"
    assert subprocess.run(["git", "check-ignore", "-q", "outputs/.gitkeep"], cwd=REPO).returncode == 1


def at_80(*argv: str) -> str:
    done = subprocess.run([*CLI, *argv], env=clean_env(HF_HUB_OFFLINE="1", COLUMNS="80", TERMINAL_WIDTH="80"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("verb", ["sample", "runs", "inspect", "export"])
def test_help_at_80_columns_cuts_nothing(verb):
    text = at_80(verb, "--help")
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
    if verb == "sample":  # every option is there, whole
        for option in ("--checkpoint", "--num", "--cfg-scale", "--cfg-interval", "--steps", "--out-dir", "--vae",
                       "--text-encoder", "--cfg-channels", "--npz"):
            assert re.search(rf"{option}\b", text), option
        assert "validation.sampling_steps" in text and "stabilityai/sd-vae-ft-ema" in text


def make_runs(outputs: Path, names: list[str]) -> None:
    """Run folders as `runs` sees them (a config and a logged step), without training."""
    for name in names:
        run = outputs / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("training: {}\n")
        (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 0.5}) + "\n")


def test_runs_at_80_columns_shows_each_name_whole_on_one_line(tmp_path):
    names = ["quickstart", "shapes-dit-s4-32px-lr1e-3-batch64-warmup50-ema9999", "a" * 70]
    make_runs(tmp_path / "long", names)
    lines = at_80("runs", str(tmp_path / "long")).splitlines()
    for name in names:
        assert any(re.search(rf"(^|[\s│]){name}($|[\s│])", line) for line in lines), (name, lines)
    assert not any("…" in line for line in lines)
    make_runs(tmp_path / "short", ["quickstart", "shapes-b"])  # names that fit: the table
    lines = at_80("runs", str(tmp_path / "short")).splitlines()
    assert any(re.search(r"│ quickstart +│ unknown +│", line) for line in lines), lines
    assert max(len(line) for line in lines if line[:1] in "┏┃┡│└") <= 80  # (the folder's path is printed whole)


def test_posthoc_ema_snapshots_take_the_umask_mode_too(tmp_path):
    """safetensors writes 0600 whatever the umask: the snapshots, like an export's files, are set to the mode any
    other file here gets (0644 under umask 022)."""
    import os

    import torch

    from ditpipe.pipeline.atomic import new_file_mode
    from ditpipe.pipeline.phema import PowerEMA, write_snapshots

    old = os.umask(0o022)
    try:
        paths = write_snapshots(tmp_path / "snapshots", 4, PowerEMA(torch.nn.Linear(2, 2), [0.05, 0.1]))
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in paths] == [oct(0o644)] * 2
    assert new_file_mode() == 0o666 & ~old
