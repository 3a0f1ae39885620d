"""A finished rank leaves its process group with no gloo thread left running (issue 25, 0b).

gloo's threads (the group's `pt_gloo_runloop` workers, its transport's `gloo_tcp_loop`) still running when the
interpreter exits now and then abort a rank that finished ("terminate called without an active exception",
SIGABRT): up to one run in five of a 2-process test, depending on load. `destroy_process_group` alone did not stop
them, because `torch.distributed.nn.functional`, imported by torch._dynamo when DDP is built (after the group
exists), keeps the group as the default argument of ten functions. `pipeline.device.leave_process_group` must free
the group, so its destructor joins those threads before the interpreter tears down. Checked in one process (world size 1,
gloo), which builds the same threads and the same references as each rank of a torchrun launch, deterministically.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc")

GLOO = ("pt_gloo_runloop", "gloo_tcp_loop")

RANK = """
import os, sys
from pathlib import Path
import torch, torch.distributed as dist

def threads():
    return sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))

dist.init_process_group("gloo", init_method="file://{group}", rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))  # imports torch._dynamo: the capture
model(torch.randn(2, 4)).sum().backward()
del model
import torch.distributed.nn.functional as F
print("captured", any(isinstance(d, dist.ProcessGroup) for d in F.all_reduce.__defaults__))
print("before", *threads())
{leave}
print("after", *threads())
"""


def _run(tmp_path: Path, leave: str) -> dict[str, list[str]]:
    code = RANK.replace("{group}", str(tmp_path / "group")).replace("{leave}", leave)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.strip()}


def test_leaving_the_process_group_joins_every_gloo_thread(tmp_path):
    out = _run(tmp_path, "from ditpipe.pipeline.device import leave_process_group\nleave_process_group()\n"
                         "print('initialized', dist.is_initialized())")
    assert all(name in out["before"] for name in GLOO), out  # the group had threads to stop
    assert not [t for t in out["after"] if t in GLOO], out  # and none is left for exit to tear down
    assert out["initialized"] == ["False"]


def test_destroy_process_group_alone_leaves_them_running_while_torch_captures_the_group(tmp_path):
    """Why `leave_process_group` does more than torch's own call: with the group held by those default arguments,
    `destroy_process_group` leaves gloo's threads running. Skipped once a torch no longer captures the group."""
    out = _run(tmp_path, "dist.destroy_process_group()")
    if out["captured"] != ["True"]:
        pytest.skip("this torch no longer keeps the group in torch.distributed.nn.functional's defaults")
    assert all(name in out["after"] for name in GLOO), out
