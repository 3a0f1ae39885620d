"""The process group and DDP as `make_accelerator` sets them up, under torchrun on CPU (gloo), and what they buy
(issue 24): the long collective timeout, gradients as views into DDP's buckets, bitwise resume on 4 processes,
and one COCO download per node."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from ditpipe.pipeline import checkpoint
from ditpipe.pipeline.checkpoint import validate
from ditpipe.pipeline.device import ddp_options
from ditpipe.pipeline.spread import TIMEOUT

from conftest import assert_common_checkpoints_equal, pixel_shards
from test_distributed import BIN, Launch, cli_args, env, run_config

ROOT = Path(__file__).resolve().parents[1]


def torchrun_script(tmp_path: Path, code: str, procs: int, *args: str, timeout: float = 180) -> list[dict]:
    """Run `code` (a script) under torchrun on `procs` ranks (gloo on a CPU, NCCL on GPUs); each prints one JSON
    object, returned in rank order. The ranks share torchrun's stdout, so their lines can interleave: the objects
    are read wherever they start, not line by line."""
    script = tmp_path / "worker.py"  # ends as a CLI command does: the group left and freed (no abort at exit)
    script.write_text(textwrap.dedent(code)
                      + "\nfrom ditpipe.pipeline.device import leave_process_group\nleave_process_group()\n")
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(procs), str(script), *args],
                       capture_output=True, text=True, timeout=timeout, env=env(PYTHONPATH=ROOT), cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    decoder, rows, at = json.JSONDecoder(), [], p.stdout.find('{"rank"')
    while at >= 0:
        row, end = decoder.raw_decode(p.stdout, at)
        rows.append(row)
        at = p.stdout.find('{"rank"', end)
    assert len(rows) == procs, p.stdout[-3000:]
    return sorted(rows, key=lambda r: r["rank"])


ACCELERATOR = """
    import json, sys, torch
    from ditpipe.pipeline.device import make_accelerator

    acc, _, _ = make_accelerator("no", deterministic=sys.argv[1] == "1")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    storages = []
    for _ in range(2):
        acc.backward(model(torch.randn(3, 8)).square().mean())
        storages.append(len({p.grad.untyped_storage().data_ptr() for p in model.parameters()}))
        opt.step()
        opt.zero_grad(set_to_none=True)
    group = torch.distributed.distributed_c10d._get_default_group()
    print(json.dumps({"rank": acc.process_index, "storages": storages, "view": model.gradient_as_bucket_view,
                      "unused": model.find_unused_parameters,
                      "timeout": group._get_backend(torch.device("cpu")).options._timeout.total_seconds()}))
"""


def test_the_process_group_waits_long_and_ddp_grads_are_bucket_views(tmp_path):
    """The run's process group has sample/evaluate's long timeout (rank 0 alone computes FID reference statistics
    while the others wait in a collective; NCCL's default watchdog kills that after 10 minutes, gloo's after 30),
    and DDP's gradients are views into its one bucket (no second copy): the 4 parameters' grads share one storage.
    Deterministic on 3 processes: DDP never rebuilds its buckets (find_unused_parameters; see the 4-process test)."""
    for rank in torchrun_script(tmp_path, ACCELERATOR, 3, "1"):
        assert rank["timeout"] == TIMEOUT.total_seconds()
        assert rank["view"] and rank["storages"] == [1, 1]
        assert rank["unused"]


def test_ddp_finds_unused_parameters_only_for_a_deterministic_run_on_3_or_more_processes():
    assert [ddp_options(d, w)["find_unused_parameters"] for d, w in ((False, 8), (True, 1), (True, 2), (True, 3))] \
        == [False, False, False, True]
    assert all(ddp_options(d, w)["gradient_as_bucket_view"] for d in (False, True) for w in (1, 2, 8))


# ---------------------------------------------------------------------------------------------------- 4 processes

N4, BATCH4, PROCS4 = 64, 2, 4  # global batch 8: 8 steps in one epoch, a checkpoint every 4


@pytest.mark.slow  # ~45 s on 2 cores: two 4-process launches
def test_a_deterministic_4_process_run_resumed_halfway_ends_bitwise_equal(tmp_path):
    """`training.deterministic` on 4 processes: a run resumed at its halfway checkpoint ends bitwise equal to the
    uninterrupted run. Without a fixed bucket layout it does not: DDP rebuilds its buckets after the first step
    of each launch, so the resumed first step all-reduces in another layout, and with 3 or more ranks the ring's
    summation order per value changes with its place in the buffer."""
    shards = pixel_shards(tmp_path / "shards", N4)
    over = {"training.batch_size": BATCH4, "training.gradient_accumulation_steps": 1, "training.num_epochs": 1,
            "training.deterministic": True, "checkpointing.steps": 4, "logging.steps": 4}
    Launch(["train", *cli_args(run_config(shards, tmp_path / "outputs", "ref", **over))], tmp_path / "logs",
           procs=PROCS4).ok(timeout=600)
    ref = tmp_path / "outputs" / "ref"
    end = checkpoint.step_name(8)
    assert validate(ref / end)["world_size"] == PROCS4
    run = tmp_path / "cut" / "ref"
    shutil.copytree(ref, run)
    shutil.rmtree(run / end)
    for p in run.glob("checkpoint-epoch-*"):
        shutil.rmtree(p)
    Launch(["resume", run / "checkpoint-4"], tmp_path / "logs", procs=PROCS4).ok(timeout=600)
    for f in ("model.pt", "ema.pt", "optimizer.pt"):
        assert validate(run / end)["files"][f]["sha256"] == validate(ref / end)["files"][f]["sha256"], f
    assert end in assert_common_checkpoints_equal(run, ref)


# ---------------------------------------------------------------------------------------------------- download

DOWNLOAD = """
    import json, sys
    from ditpipe.pipeline import download
    from ditpipe.pipeline.config import load_config
    from ditpipe.pipeline.encode import Observer, _distributed, _source_once_per_node

    for rel, pin in json.loads(sys.argv[1]).items():  # the test site's archives are the "official" ones
        download.COCO_ARCHIVES[rel].update(pin)
    rank, world, _ = _distributed()
    cfg = load_config(None, {"data.dataset_name": "coco", "data.split": "val", "data.dataset_path": sys.argv[2],
                             "data.download": True, "data.download_url": sys.argv[3], "data.num_samples": None})
    try:
        print(json.dumps({"rank": rank, "inputs": len(_source_once_per_node(cfg, Observer(), world))}))
    except Exception as e:
        print(json.dumps({"rank": rank, "error": f"{type(e).__name__}: {e}"}))
"""


def test_torchrun_encode_download_fetches_once_per_node_and_a_failure_stops_every_rank(tmp_path):
    """`torchrun ... encode --download`: LOCAL_RANK 0 downloads and extracts, the other rank waits and then finds the
    data in place (each archive requested once, not once per rank into one shared .part file and temporary folder);
    a failed download stops both ranks with the downloading rank's message."""
    from test_download import ANN_ZIP, VAL_ZIP, Site

    (tmp_path / "site").mkdir()
    site = Site(tmp_path / "site")
    site.thread.start()
    try:
        site.put_standard()
        pins = site.pins(**{VAL_ZIP: {"images": 3}})
        root = tmp_path / "coco"
        rows = torchrun_script(tmp_path, DOWNLOAD, 2, json.dumps(pins), str(root), site.base_url)
        assert [r.get("inputs") for r in rows] == [3, 3], rows
        assert sorted(site.requests) == sorted(f"/{rel}" for rel in (VAL_ZIP, ANN_ZIP))
        assert not list((root / ".downloads").glob("*.part")) and not list(root.glob(".extract-*"))

        site.requests.clear()
        bad = site.pins(**{VAL_ZIP: {"images": 3, "sha256": "0" * 64}})
        rows = torchrun_script(tmp_path, DOWNLOAD, 2, json.dumps(bad), str(tmp_path / "coco-bad"), site.base_url)
        assert site.requests == [f"/{VAL_ZIP}"]
        assert rows[0]["error"] == rows[1]["error"] and "is not the official archive" in rows[0]["error"], rows
    finally:
        site.server.shutdown()
        site.server.server_close()
        site.thread.join(timeout=5)
