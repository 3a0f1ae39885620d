"""Many nodes (issue 29, part 2): two "nodes" on this machine, each a torchrun launch with its own elastic agent
(`--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT`), one process each and its own storage.cache_dir,
training from shards in a real S3 server (moto, tests/s3server.py) through the real CLI, on CPU with gloo.

- every sample exactly once per epoch across the nodes (DITPIPE_RECORD_SAMPLES);
- (slow) checkpoints straight to s3://: a reader polling the bucket never sees `latest` name a partial checkpoint,
  retention deletes the pruned checkpoints' objects, `ditpipe resume s3://…/run` on two fresh nodes (empty caches:
  both download) ends bitwise equal to the uninterrupted run, and the dummy credentials reach no log or object;
- the bucket side alone (pipeline/run_store.py): a fetched checkpoint is validated, retention deletes only ours;
- (slow) SIGKILL of rank 0's worker: both agents restart the workers (`--max-restarts 1`), which rerun the same
  `train --resume auto` and end bitwise equal to the uninterrupted run, the restarted rank 0 taking the run's lock;
- (slow) shrink: both nodes killed after a checkpoint, the same command on one node continues with the global batch
  kept (accumulation 2 → 4), the uninterrupted run's samples and draws at every step.

Every subprocess runs with one thread, so the reference and the interrupted runs execute the same kernels.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from ditpipe.pipeline import checkpoint, objstore
from ditpipe.pipeline.checkpoint import validate
from ditpipe.pipeline.hooks import PAUSE_ENV, RECORD_ENV
from ditpipe.pipeline.metrics import read_metrics
from ditpipe.pipeline.order import Plan

from conftest import pixel_shards
from s3server import ACCESS_KEY, SECRET_KEY
from test_distributed import cli_args
from test_distributed import env as one_machine_env
from tiny import TINY_MODEL

BIN = Path(sys.executable).parent

# 100 samples in shards of 22 (uneven: 22 × 4 + 12); batch 4 × accumulation 2 × 2 nodes = 16 a step, 6 steps an
# epoch (4 samples dropped each epoch), 3 epochs
N, PER_SHARD, BATCH, ACCUM, WORLD, EPOCHS = 100, 22, 4, 2, 2, 3
PLAN = Plan(N, BATCH, ACCUM, WORLD)
END = PLAN.steps_per_epoch * EPOCHS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The agents' rendezvous store is shared with the workers by default, and a restarted worker can read the previous
# attempt's gloo/NCCL addresses from it (pytorch/pytorch#135712): every elastic launch sets this (docs/multi-node.md)
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def env(server, **extra) -> dict:
    """test_distributed's launch environment, with the S3 server's endpoint and credentials and AGENT_ENV."""
    return one_machine_env(**server.env, **AGENT_ENV, **extra)


class Node:
    """One node: `torchrun --nnodes NODES --nproc_per_node 1 --rdzv-backend c10d ... ditpipe ARGS`, its output in a
    file. `nodes` 1 with no endpoint: a one-node launch."""

    count = 0

    def __init__(self, args: list[str], logs: Path, endpoint: str, run_id: str, server, nodes: int | str = 2,
                 restarts: int = 0, rdzv_conf: str | None = None, **extra_env):
        Node.count += 1
        logs.mkdir(parents=True, exist_ok=True)
        self.log = logs / f"node-{Node.count}.log"
        agent = [str(BIN / "torchrun"), "--nnodes", str(nodes), "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--max-restarts", str(restarts),
                 "--monitor-interval", "0.5", *(["--rdzv-conf", rdzv_conf] if rdzv_conf else []), str(BIN / "ditpipe")]
        with open(self.log, "wb") as out:
            self.p = subprocess.Popen([*agent, *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                                      env=env(server, **extra_env), start_new_session=True)
        _LIVE.append(self)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ok(self, timeout: float = 240) -> "Node":
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"a node hung (more than {timeout} s):\n{self.output()[-4000:]}")
        assert rc == 0, f"a node exited {rc}:\n{self.output()[-4000:]}"
        return self

    def workers(self) -> list[int]:
        kids = []
        for task in Path(f"/proc/{self.p.pid}/task").glob("*"):
            try:
                kids += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
        return [k for k in kids if b"RANK=" in _environ(k)]

    def kill_workers(self) -> None:
        """SIGKILL this node's worker processes (each leads its own session), leaving its agent to notice."""
        for pid in self.workers():
            os.killpg(pid, signal.SIGKILL)

    def kill_all(self) -> None:
        """SIGKILL the agent and its workers at once, as a lost node."""
        for pid in [self.p.pid, *self.workers()]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.p.wait(30)


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


_LIVE: list[Node] = []


@pytest.fixture(autouse=True, scope="module")
def _no_strays():
    yield
    for node in _LIVE:
        if node.p.poll() is None:
            node.kill_all()


def two_nodes(args: list[str], root: Path, server, caches=("node0", "node1"), **options) -> list[Node]:
    """Two nodes of one job on a fresh rendezvous endpoint, each with its own storage.cache_dir under `root`;
    `options`: Node's."""
    port, run_id = _free_port(), uuid.uuid4().hex[:8]
    endpoint = f"127.0.0.1:{port}"
    nodes = []
    for cache in caches:
        nodes.append(Node([*args, "--storage.cache_dir", root / cache], root / "logs", endpoint, run_id, server,
                          **options))
        if len(nodes) == 1:  # node 0's agent hosts the rendezvous store (the first to bind the endpoint does): a
            _listening(port, nodes[0])  # test that loses node 1 must not lose the store with it
    return nodes


def _listening(port: int, node: Node, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.p.poll() is not None:
            pytest.fail(f"node 0 exited before its rendezvous store listened:\n{node.output()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"node 0's rendezvous store never listened on 127.0.0.1:{port}")


def wait_for(nodes: list[Node], what: str, predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(n.p.poll() is not None for n in nodes):
            pytest.fail(f"a node exited before {what}:\n" + "\n".join(n.output()[-2000:] for n in nodes))
        if time.monotonic() > deadline:
            for n in nodes:
                n.kill_all()
            pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(n.output()[-2000:] for n in nodes))
        time.sleep(0.005)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def draws_by_step(rec: list[dict]) -> dict[int, list[tuple]]:
    """{step: sorted (sample index, its timestep, its noise sum)} over every rank and micro-batch of the step."""
    out: dict[int, list[tuple]] = {}
    for x in rec:
        out.setdefault(x["step"], []).extend(zip(x["indices"], x["t"], x["noise"]))
    return {step: sorted(v) for step, v in out.items()}


def tensors(folder: Path, name: str) -> dict:
    return torch.load(folder / name, weights_only=True)


def relative_gap(a: Path, b: Path, name: str = checkpoint.MODEL) -> float:
    """‖a − b‖ / ‖b‖ over every tensor of the checkpoints' `name`."""
    x, y = tensors(a, name), tensors(b, name)
    return (sum(float((x[k].double() - y[k].double()).square().sum()) for k in y)
            / sum(float(y[k].double().square().sum()) for k in y)) ** 0.5


def assert_bitwise(a: Path, b: Path) -> None:
    """The checkpoints `a` and `b` hold the same model and EMA tensors, bit for bit."""
    for name in (checkpoint.MODEL, checkpoint.EMA):
        x, y = tensors(a, name), tensors(b, name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in y), f"{a}/{name} differs from {b}"


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    """A bucket for the module, this process talking to the S3 server (endpoint, dummy credentials) meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        yield s3_server.bucket(f"multinode-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def s3_shards(bucket, tmp_path_factory) -> str:
    """Pixel shards uploaded to the bucket, whole objects, the manifest last (as a remote encode leaves them)."""
    local = pixel_shards(tmp_path_factory.mktemp("mn-shards") / "shards", N, **{"shards.samples_per_shard": PER_SHARD})
    url = f"{bucket}/shards"
    for p in sorted(local.iterdir(), key=lambda p: p.name == "manifest.json"):
        objstore.put_file(p, f"{url}/{p.name}")
    return url


def run_config(shards: str, output_dir, name: str, **over) -> dict:
    return {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": N, "vae.name": "pixel",
            "shards.path": shards, **TINY_MODEL, "data.num_workers": 0, "training.mixed_precision": "no",
            "training.batch_size": BATCH, "training.gradient_accumulation_steps": ACCUM,
            "training.num_epochs": EPOCHS, "training.learning_rate": 1e-3, "lr_scheduler.warmup_steps": 4,
            "logging.steps": 1, "logging.tensorboard": False, "checkpointing.steps": 4,
            "logging.output_dir": str(output_dir), "logging.run_name": name, **over}


def train_args(shards: str, output_dir, name: str, **over) -> list[str]:
    return ["train", *cli_args(run_config(shards, output_dir, name, **over)), "--resume", "auto"]


@pytest.fixture(scope="module")
def reference(s3_server, s3_shards, tmp_path_factory) -> tuple[Path, list[dict], float]:
    """An uninterrupted two-node run into a folder both nodes see: (run folder, sample records, seconds)."""
    root = tmp_path_factory.mktemp("mn-ref")
    record = root / "samples.jsonl"
    t0 = time.monotonic()
    for node in two_nodes(train_args(s3_shards, root / "outputs", "ref"), root, s3_server, **{RECORD_ENV: record}):
        node.ok()
    return root / "outputs" / "ref", records(record), time.monotonic() - t0


# ---------------------------------------------------------------------------------------------------- tests


def test_two_nodes_read_every_sample_exactly_once_per_epoch(reference):
    run, rec, seconds = reference
    print(f"two-node run, {END} steps: {seconds:.1f} s")
    assert {x["rank"] for x in rec} == {0, 1}
    assert len(rec) == END * ACCUM * WORLD  # every micro-batch of every step on each node, nothing replayed
    for epoch in range(EPOCHS):
        seen = {r: [g for x in rec if x["epoch"] == epoch and x["rank"] == r for g in x["indices"]] for r in (0, 1)}
        assert len(seen[0]) == len(seen[1]) == PLAN.steps_per_epoch * PLAN.global_batch // WORLD
        every = seen[0] + seen[1]
        assert len(every) == len(set(every)) == PLAN.steps_per_epoch * PLAN.global_batch  # exactly once
        assert set(every) <= set(range(N)) and len(set(range(N)) - set(every)) == N % PLAN.global_batch
    state = validate(run / checkpoint.step_name(END))
    assert (state["world_size"], state["global_batch"], state["samples_consumed"]) == (2, 16, END * 16)
    assert all(f"rng-rank{r}.pt" in state["files"] for r in (0, 1))


class LatestWatcher(threading.Thread):
    """A reader polling the bucket while a run publishes: each time `latest` names a checkpoint, that checkpoint's
    training_state.json must be there and every file it lists present at its recorded size."""

    def __init__(self, run_url: str):
        super().__init__(daemon=True)
        self.run_url, self.stop, self.seen, self.partial = run_url, threading.Event(), set(), []

    def run(self) -> None:
        fs, _ = objstore.filesystem(self.run_url)
        root = self.run_url.split("://", 1)[1]
        while not self.stop.is_set():
            try:
                name = fs.cat_file(f"{root}/latest").decode().strip()
            except FileNotFoundError:
                time.sleep(0.02)
                continue
            listing = objstore.listing(f"{self.run_url}/{name}")
            try:
                state = json.loads(fs.cat_file(f"{root}/{name}/{checkpoint.STATE}"))
                missing = [f for f, rec in state["files"].items() if listing.get(f) != rec["bytes"]]
            except FileNotFoundError:
                missing = [checkpoint.STATE]
            if missing and fs.cat_file(f"{root}/latest").decode().strip() != name:
                continue  # `latest` moved on meanwhile and retention pruned the one it named: a reader tries again
            if missing and name not in [n for n, _ in self.partial]:
                self.partial.append((name, missing))
            self.seen.add(name)
            time.sleep(0.02)


@pytest.mark.slow  # two 2-node launches (~20 s); the bucket side alone is the default run's (below)
def test_checkpoints_straight_to_s3_publish_latest_last_and_resume_bitwise(s3_server, s3_shards, bucket, reference,
                                                                          tmp_path):
    ref, _, _ = reference
    output = f"{bucket}/runs-{uuid.uuid4().hex[:6]}"
    run_url = f"{output}/s3run"
    watcher = LatestWatcher(run_url)
    watcher.start()
    t0 = time.monotonic()
    # the first launch stops at step 4 (checkpoint-4 in the bucket); retention keeps 1 step checkpoint there
    for node in two_nodes(train_args(s3_shards, output, "s3run", **{"training.max_steps": 4,
                                                                    "checkpointing.total_limit": 1}),
                          tmp_path / "first", s3_server):
        node.ok()
    first = time.monotonic() - t0
    assert objstore.listing(run_url)["latest"] and objstore.filesystem(run_url)[0].cat_file(
        f"{run_url.split('://')[1]}/latest").decode().strip() == "checkpoint-4"
    # two fresh nodes (empty caches: each downloads the checkpoint) resume from the bucket's URL
    t0 = time.monotonic()
    nodes = two_nodes(["resume", run_url, "--training.max_steps", "null", "--shards.path", s3_shards],
                      tmp_path / "second", s3_server)
    for node in nodes:
        node.ok()
    second = time.monotonic() - t0
    watcher.stop.set()
    watcher.join(10)
    print(f"s3 run: first launch (4 steps) {first:.1f} s, resume on 2 fresh nodes ({END - 4} steps) {second:.1f} s")
    assert not watcher.partial, f"`latest` named a partial checkpoint: {watcher.partial}"
    assert "checkpoint-4" in watcher.seen and checkpoint.step_name(END) in watcher.seen
    assert all("resuming from" in n.output() for n in nodes)

    # the final checkpoint, downloaded and validated like a resume does, equals the uninterrupted run's, bit for bit
    got = download(f"{run_url}/{checkpoint.step_name(END)}", tmp_path / "got")
    state = validate(got)
    assert state["step"] == END and state["world_size"] == 2
    assert_bitwise(got, ref / checkpoint.step_name(END))
    objstore.get_file(f"{run_url}/metrics.jsonl", tmp_path / "metrics.jsonl")
    want = {m["step"]: m["loss"] for m in read_metrics(ref)}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {m["step"]: m["loss"] for m in lines if "loss" in m} == want  # the logs continue the first launch's

    # retention: one step checkpoint (the last) and the epoch ones are left in the bucket; pruned ones are gone
    folders = {p.rsplit("/", 1)[-1] for p in objstore.filesystem(run_url)[0].ls(run_url.split("://")[1])}
    assert folders == {"config.yaml", "metrics.jsonl", "latest", checkpoint.step_name(END),
                       *(checkpoint.epoch_name(e) for e in range(1, EPOCHS + 1))}
    # credentials reach no log and no object of the run
    fs, root = objstore.filesystem(run_url)
    for path in fs.find(root):
        data = fs.cat_file(path)
        assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, path
    for node in nodes:
        assert ACCESS_KEY not in node.output() and SECRET_KEY not in node.output()


def download(url: str, folder: Path) -> Path:
    """A checkpoint folder in the bucket, every object of it, into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in objstore.listing(url):
        objstore.get_file(f"{url}/{name}", folder / name)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("where", ["shared", "s3"])
def test_a_killed_node_is_restarted_by_the_elastic_agent_and_ends_bitwise(s3_server, s3_shards, bucket, reference,
                                                                         tmp_path, where):
    """SIGKILL of rank 0's worker after checkpoint-4: both agents restart their workers, which rerun
    `train --resume auto`, resume from the newest checkpoint (the restarted rank 0 takes the run's lock again; with
    the run in s3://, each node fetches it into its own staging folder) and end at the uninterrupted run's weights,
    bit for bit, having read its samples."""
    ref, ref_rec, _ = reference
    output = tmp_path / "outputs" if where == "shared" else f"{bucket}/elastic-{uuid.uuid4().hex[:6]}"
    run = f"{output}/elastic"
    published = (lambda: (Path(run) / "checkpoint-4").is_dir()) if where == "shared" else \
        (lambda: "latest" in objstore.listing(run))
    record = tmp_path / "samples.jsonl"
    t0 = time.monotonic()
    nodes = two_nodes(train_args(s3_shards, output, "elastic"), tmp_path, s3_server, restarts=1,
                      **{PAUSE_ENV: 0.1, RECORD_ENV: record})
    wait_for(nodes, "checkpoint-4", published)
    killed = [n for n in nodes if any(b"\0RANK=0\0" in b"\0" + _environ(w) for w in n.workers())][0]
    killed.kill_workers()
    for node in nodes:
        node.ok()
    print(f"two nodes ({where} run folder), rank 0 killed after checkpoint-4 and restarted by the agents: "
          f"{time.monotonic() - t0:.1f} s")
    out = [n.output() for n in nodes]
    assert all(o.count("no checkpoint yet: starting the run") == 1 for o in out)
    resumed = {int(line.rsplit("checkpoint-", 1)[1].split()[0]) for o in out for line in o.splitlines()
               if "resuming from" in line and "checkpoint-" in line}
    assert len(resumed) == 1 and 4 <= resumed.pop() < END  # both nodes resumed from the same checkpoint
    final = Path(run) / checkpoint.step_name(END) if where == "shared" else \
        download(f"{run}/{checkpoint.step_name(END)}", tmp_path / "final")
    validate(final)
    assert_bitwise(final, ref / checkpoint.step_name(END))
    if where == "shared":
        assert json.loads((Path(run) / "ended.json").read_text())["outcome"] == "finished"
    key = lambda x: (x["step"], x["rank"], x["micro"])  # noqa: E731
    want = {key(x): x["indices"] for x in ref_rec}
    got = records(record)
    assert {key(x) for x in got} == set(want)  # every micro-batch trained; the replayed ones read the same samples
    assert all(x["indices"] == want[key(x)] for x in got)


@pytest.mark.slow
def test_shrinking_to_one_node_keeps_the_global_batch(s3_server, s3_shards, reference, tmp_path):
    """Both nodes lost after a checkpoint (SIGKILL of agents and workers); the same command on one node resumes with
    accumulation 4 instead of 2 (the global batch 16 kept), trains the uninterrupted run's samples and draws from
    the resume step on, and ends at its weights up to float summation order."""
    ref, ref_rec, _ = reference
    run = tmp_path / "outputs" / "shrink"
    args = train_args(s3_shards, tmp_path / "outputs", "shrink")
    nodes = two_nodes(args, tmp_path, s3_server, **{PAUSE_ENV: 0.1})
    wait_for(nodes, "checkpoint-4", lambda: (run / "checkpoint-4").is_dir())
    for node in nodes:
        node.kill_all()
    resumed_from = checkpoint.find_resumable(run, warn=pytest.fail)[1]["step"]
    record = tmp_path / "one.jsonl"
    t0 = time.monotonic()
    one = Node([*args, "--storage.cache_dir", tmp_path / "node0"], tmp_path / "logs", f"127.0.0.1:{_free_port()}",
               "one", s3_server, nodes=1, **{RECORD_ENV: record}).ok()
    print(f"one node resumed from checkpoint-{resumed_from}: {time.monotonic() - t0:.1f} s")
    out = " ".join(one.output().split())
    assert f"this launch has 1: batch {BATCH} × accumulation {ACCUM * 2} keeps its global batch 16" in out
    want = draws_by_step(ref_rec)
    got = draws_by_step(records(record))
    assert min(got) == resumed_from and got == {s: v for s, v in want.items() if s >= resumed_from}
    final = checkpoint.step_name(END)
    state = validate(run / final)
    assert (state["world_size"], state["gradient_accumulation_steps"], state["global_batch"]) == (1, ACCUM * 2, 16)
    assert relative_gap(run / final, ref / final) < 1e-5


@pytest.mark.slow
def test_the_agent_re_forms_the_job_on_one_node_when_the_other_is_lost(s3_server, s3_shards, reference, tmp_path):
    """`--nnodes 1:2`: node 1 (agent and worker) is lost after checkpoint-4; node 0's worker fails in its next
    collective, its agent restarts it in a rendezvous of the one node left, and the same `train --resume auto`
    continues on 1 process with the global batch kept, to the uninterrupted run's draws and (up to summation order)
    weights."""
    ref, ref_rec, _ = reference
    run = tmp_path / "outputs" / "agent-shrink"
    record = tmp_path / "samples.jsonl"
    nodes = two_nodes(train_args(s3_shards, tmp_path / "outputs", "agent-shrink"), tmp_path, s3_server, nodes="1:2",
                      restarts=1, rdzv_conf="last_call_timeout=5", **{PAUSE_ENV: 0.1, RECORD_ENV: record})
    wait_for(nodes, "checkpoint-4", lambda: (run / "checkpoint-4").is_dir())
    t0 = time.monotonic()
    nodes[1].kill_all()
    nodes[0].ok()
    print(f"node 1 lost after checkpoint-4; node 0 re-formed alone and finished: {time.monotonic() - t0:.1f} s")
    out = " ".join(nodes[0].output().split())
    assert f"this launch has 1: batch {BATCH} × accumulation {ACCUM * 2} keeps its global batch 16" in out
    state = validate(run / checkpoint.step_name(END))
    assert (state["world_size"], state["gradient_accumulation_steps"], state["global_batch"]) == (1, ACCUM * 2, 16)
    start = int(out.split("resuming from ")[1].split()[0].rsplit("checkpoint-", 1)[1])
    assert 4 <= start < END
    resumed = records(record)[-(END - start) * ACCUM * 2:]  # the one-process launch wrote last, alone
    assert {x["rank"] for x in resumed} == {0} and min(x["step"] for x in resumed) == start
    assert draws_by_step(resumed) == {s: v for s, v in draws_by_step(ref_rec).items() if s >= start}
    assert relative_gap(run / checkpoint.step_name(END), ref / checkpoint.step_name(END)) < 1e-5


def test_the_bucket_side_refuses_damage_and_deletes_only_its_own_objects(s3, reference, tmp_path):
    """pipeline/run_store.py alone, against the S3 server: a fetched checkpoint is validated (a changed object is
    refused, nothing of it staged), retention deletes only what our own training_state.json lists, never the
    checkpoint `latest` names, and a run folder URL of a protocol without whole-object PUTs is refused."""
    import shutil

    from ditpipe.pipeline.errors import ConfigError, DitpipeError
    from ditpipe.pipeline.run_store import RemoteRun, is_remote

    ref, _, _ = reference
    _, bucket_url = s3
    url = f"{bucket_url}/runs/r"
    staged = tmp_path / "node0" / "r"
    shutil.copytree(ref / "checkpoint-4", staged / "checkpoint-4")
    (staged / "latest").write_text("checkpoint-4\n")
    snaps = staged / "phema"
    snaps.mkdir()
    (snaps / "step-0000004-sigma-0.05.safetensors").write_bytes(b"a snapshot's bytes")
    (snaps / ".step-0000008-sigma-0.05.safetensors.123.tmp").write_bytes(b"half written")
    RemoteRun(url, staged).publish("checkpoint-4")
    # post-hoc EMA snapshots go up with the checkpoint, whole and once; temporaries never
    assert objstore.listing(f"{url}/phema") == {"step-0000004-sigma-0.05.safetensors": 18}
    (snaps / "step-0000008-sigma-0.05.safetensors").write_bytes(b"the next one")
    assert RemoteRun(url, staged).publish_snapshots() == ["step-0000008-sigma-0.05.safetensors"]
    assert RemoteRun(url, staged).publish_snapshots() == []
    fs, root = objstore.filesystem(url)
    fs.pipe_file(f"{root}/checkpoint-4/notes.txt", b"the user's")  # not listed by our state
    fs.pipe_file(f"{root}/checkpoint-2/training_state.json", json.dumps({"written_by": "someone", "files": {
        "model.pt": {}}}).encode())
    fs.pipe_file(f"{root}/checkpoint-2/model.pt", b"theirs")

    fetched = RemoteRun(url, tmp_path / "node1" / "r").fetch()  # `latest`
    assert fetched == tmp_path / "node1" / "r" / "checkpoint-4" and validate(fetched)["step"] == 4
    assert_bitwise(fetched, ref / "checkpoint-4")

    data = bytearray(fs.cat_file(f"{root}/checkpoint-4/model.pt"))
    data[len(data) // 2] ^= 1  # one bit of a weight: only the sha256 can tell
    fs.pipe_file(f"{root}/checkpoint-4/model.pt", bytes(data))
    fresh = RemoteRun(url, tmp_path / "node2" / "r")
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot resume from 's3://.*/checkpoint-4'.*damaged"):
        fresh.fetch()
    assert not list((tmp_path / "node2" / "r").iterdir())  # nothing of it staged, no temporary left

    run = RemoteRun(url, staged)
    with pytest.raises(DitpipeError, match=r"already holds checkpoints. Continue it with `ditpipe resume s3://"):
        run.refuse_published()  # a new run never writes over a published one
    assert run.remove(["checkpoint-2", "checkpoint-4"]) == []  # theirs; and the one `latest` names
    fs.pipe_file(f"{root}/latest", b"checkpoint-8\n")
    assert run.remove(["checkpoint-4"]) == ["checkpoint-4"]
    assert set(objstore.listing(f"{url}/checkpoint-4")) == {"notes.txt"}
    assert set(objstore.listing(f"{url}/checkpoint-2")) == {"training_state.json", "model.pt"}
    with pytest.raises(ConfigError, match="logging.output_dir"):
        is_remote("file:///tmp/runs")


def test_an_fsdp_run_is_refused_a_run_folder_in_object_storage(cli, tmp_path):
    """fsdp's checkpoint shards are written by a collective into one folder: refused in s3:// at once, naming the
    key, before anything is made (the staging folder included)."""
    code, _, err = cli("train", "--training.parallel", "fsdp", "--logging.output_dir", "s3://bucket/runs",
                       "--storage.cache_dir", tmp_path / "cache", "--shards.path", tmp_path / "none")
    assert code == 2 and "logging.output_dir" in err and "fsdp" in err
    assert not (tmp_path / "cache").exists()
