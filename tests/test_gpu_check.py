"""scripts/gpu_check.sh: its parts are the ones docs/gpu.md documents; an unknown part is a usage error; where there is
no CUDA device every part stops with a clear message and runs nothing."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
GPU_PARTS = ["install", "tests-a", "tests-b", "bench-b2", "bench-xl2", "all"]  # "wheelhouse" needs pip's network


def gpu_check(tmp_path, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUT": str(tmp_path / "o")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def script_parts(tmp_path) -> list[str]:
    """The parts the script's usage message names (asked with --help, which is no part)."""
    usage = re.search(r"usage: scripts/gpu_check.sh \{([^}]*)\}", gpu_check(tmp_path, "--help").stderr)
    return usage.group(1).split("|")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
@pytest.mark.parametrize("args", [[], ["install"], ["bench-xl2"]])  # each import of torch costs seconds
def test_gpu_check_stops_clearly_without_cuda(tmp_path, args):
    proc = gpu_check(tmp_path, *args)
    assert proc.returncode == 2
    assert "torch sees no CUDA device here; this check is for a GPU machine" in proc.stderr
    assert not any((tmp_path / "o").iterdir())  # nothing ran, nothing was written


@pytest.mark.parametrize("args", [["bench"], ["tests-a", "tests-b"]])
def test_an_unknown_part_is_a_usage_error_that_names_the_parts(tmp_path, args):
    proc = gpu_check(tmp_path, *args)
    assert proc.returncode == 2
    assert "usage: scripts/gpu_check.sh {" + "|".join(["wheelhouse", *GPU_PARTS]) + "}" in proc.stderr
    assert not (tmp_path / "o").exists()  # refused before anything else


def test_readme_gives_every_part_its_command_and_its_time(tmp_path):
    section = (ROOT / "docs" / "gpu.md").read_text().split("## The GPU acceptance check", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^scripts/gpu_check.sh (\S+)", section, re.M)
    assert sorted(documented) == sorted(script_parts(tmp_path)) == sorted(["wheelhouse", *GPU_PARTS])
    for part in documented:  # each command's line says how long it takes, and whether that was measured
        line = re.search(rf"^scripts/gpu_check.sh {re.escape(part)}\b.*$", section, re.M).group(0)
        assert re.search(r"\b(estimated|measured)\b", line), line
