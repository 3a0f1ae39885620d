"""scripts/gpu_check.sh stops with a clear message, and runs nothing, where there is no CUDA device."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_gpu_check_stops_clearly_without_cuda(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUT": str(tmp_path / "o")}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "torch sees no CUDA device here; this check is for a GPU machine" in proc.stderr
    assert not any((tmp_path / "o").iterdir())  # nothing ran, nothing was written
