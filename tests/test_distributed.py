"""Many processes (issue 7): `torchrun --nproc_per_node 2` on CPU with gloo, through the real CLI.

- encode: two processes write the same bytes as one (shards, sidecars, manifest), `verify` passes, and a killed rank
  is recovered by rerunning the same command;
- train: every rank reads a disjoint block of each global micro-batch, equal batch counts with uneven shard counts
  and sizes, every sample at most once per epoch and exactly `steps_per_epoch × global batch` of them (recorded per
  rank through DITPIPE_RECORD_SAMPLES, and reproduced from Plan/MicroBatches); the logged loss is the mean over the
  ranks; every checkpoint holds and hashes each rank's RNG state;
- resume: a 2-process run killed with SIGKILL (torchrun and every worker) and resumed under torchrun ends bitwise
  equal to an uninterrupted 2-process run (fp32 and bf16); another world size is refused;
- shard locations: fsspec URLs are read (read-only), `pipe:` commands are refused.

torchrun starts each worker in its own session, so "kill the whole launch" means SIGKILL to torchrun and to each
worker's process group. Every subprocess runs with one thread, so the reference and the interrupted runs execute the
same kernels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ditpipe.pipeline import checkpoint
from ditpipe.pipeline.checkpoint import validate
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.errors import ShardError
from ditpipe.pipeline.loader import MicroBatches
from ditpipe.pipeline.order import EpochOrder, Plan
from ditpipe.pipeline.store import open_shards
from ditpipe.pipeline.metrics import read_metrics
from ditpipe.stages.encode import encode
from ditpipe.pipeline.hooks import PAUSE_ENV, RECORD_ENV
from ditpipe.stages.train import train

from conftest import assert_common_checkpoints_equal, pixel_shards, reset_accelerate
from tiny import TINY_MODEL

BIN = Path(sys.executable).parent
ONE = [str(BIN / "ditpipe")]


def torchrun(procs: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(procs), str(BIN / "ditpipe")]

# train: 100 samples in shards of 22 (22, 22, 22, 22, 12: uneven sizes, 5 shards over 2 ranks); batch 4 × accum 2 ×
# 2 ranks = 16 per step, 6 steps per epoch, a remainder of 4 dropped each epoch; 3 epochs
N, PER_SHARD, BATCH, ACCUM, WORLD, EPOCHS = 100, 22, 4, 2, 2, 3
PLAN = Plan(N, BATCH, ACCUM, WORLD)
END = PLAN.steps_per_epoch * EPOCHS


def env(**extra) -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "250"}
    for key in (PAUSE_ENV, RECORD_ENV):
        e.pop(key, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def cli_args(over: dict) -> list[str]:
    text = {True: "true", False: "false", None: "null"}
    return [a for k, v in over.items() for a in (f"--{k}", text.get(v, v) if isinstance(v, (bool, type(None)))
                                                 else str(v))]


class Launch:
    """A `torchrun ... ditpipe ARGS` (or one-process `ditpipe ARGS`) launch with its output in files."""

    count = 0

    def __init__(self, args: list[str], logs: Path, procs: int = 2, **extra_env):
        Launch.count += 1
        logs.mkdir(parents=True, exist_ok=True)
        self.log = logs / f"{Launch.count}.log"
        self.args = [str(a) for a in args]
        with open(self.log, "wb") as out:
            self.p = subprocess.Popen([*(torchrun(procs) if procs > 1 else ONE), *self.args], stdout=out,
                                      stderr=subprocess.STDOUT, env=env(**extra_env), start_new_session=True)
        _LIVE.append(self)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"`{' '.join(self.args[:2])}` hung (more than {timeout} s):\n{self.output()[-3000:]}")

    def ok(self, timeout: float = 180) -> "Launch":
        rc = self.wait(timeout)
        assert rc == 0, f"`ditpipe {' '.join(self.args)}` exited {rc}:\n{self.output()[-4000:]}"
        return self

    def workers(self) -> list[int]:
        """torchrun's worker processes (its direct children; each leads its own session)."""
        kids = []
        for task in Path(f"/proc/{self.p.pid}/task").glob("*"):
            try:
                kids += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
        return kids

    def worker(self, rank: int) -> int:
        for pid in self.workers():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return pid
        raise AssertionError(f"no worker with RANK={rank} under torchrun {self.p.pid}")

    def kill_all(self) -> None:
        """SIGKILL the launcher and every worker at once, as a lost node would be."""
        workers = self.workers()
        for pid in [self.p.pid, *workers]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.p.wait(30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{w}").exists() and "zombie" not in _state(w) for w in workers):
            assert time.monotonic() < deadline, "workers survived SIGKILL"
            time.sleep(0.01)

    def wait_for(self, what: str, predicate, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.p.poll() is not None:
                pytest.fail(f"the launch exited ({self.p.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill_all()
                pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.003)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (OSError, IndexError):
        return "zombie"


_LIVE: list[Launch] = []


@pytest.fixture(autouse=True, scope="module")
def _no_strays():
    yield
    for launch in _LIVE:
        if launch.p.poll() is None:
            launch.kill_all()


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- encode

# tiny VAE at 32 px, one image per encode batch (slow enough to kill a rank mid-run): 52 inputs in shards of 12, i.e.
# 12, 12, 12, 12, 4; rank 0 writes shards 0, 2, 4 and rank 1 shards 1, 3
def encode_args(vae: Path, out: Path) -> list[str]:
    return ["encode", "--dataset", "shapes", "--vae", str(vae), "--image-size", "32", "--num-samples", "52",
            "--samples-per-shard", "12", "--batch-size", "1", "--num-workers", "0", "--out", str(out)]


@pytest.fixture(scope="module")
def one_process_encode(tiny_vae, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("encode-one")
    Launch(encode_args(tiny_vae, root / "shards"), root / "logs", procs=1).ok()
    return root / "shards"


def test_two_process_encode_equals_one_process_and_verifies(tiny_vae, one_process_encode, tmp_path, cli):
    out = tmp_path / "shards"
    Launch(encode_args(tiny_vae, out), tmp_path / "logs").ok()
    ref = files_of(one_process_encode)
    assert sorted(ref) == ["encode-params.json", "manifest.json"] + [
        f"shard-{i:05d}.{ext}" for i in range(5) for ext in ("meta.json", "tar")]
    assert [s["samples"] for s in json.loads(ref["manifest.json"])["shards"]] == [12, 12, 12, 12, 4]
    got = files_of(out)
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert got[name] == ref[name], f"{name} differs between the 1- and the 2-process encode"
    code, _, err = cli("verify", out)
    assert code == 0, err


def test_a_killed_rank_is_recovered_by_rerunning_the_same_encode(tiny_vae, one_process_encode, tmp_path, cli):
    out, logs = tmp_path / "shards", tmp_path / "logs"
    launch = Launch(encode_args(tiny_vae, out), logs)
    # rank 1 has finished its first shard (1) and is encoding its second (3): kill it there
    launch.wait_for("rank 1's first shard", lambda: (out / "shard-00001.meta.json").is_file())
    os.killpg(launch.worker(1), signal.SIGKILL)
    assert launch.wait() != 0  # torchrun notices, stops rank 0 and fails
    assert not (out / "manifest.json").exists() and not (out / "shard-00003.meta.json").exists()
    Launch(encode_args(tiny_vae, out), logs).ok()  # the same command
    ref, got = files_of(one_process_encode), files_of(out)
    assert sorted(got) == sorted(ref)  # no temporaries left
    assert all(got[name] == ref[name] for name in ref)
    code, _, err = cli("verify", out)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return pixel_shards(tmp_path_factory.mktemp("dist-shards") / "shards", N,
                        **{"shards.samples_per_shard": PER_SHARD})


def run_config(shards: Path, outputs: Path, name: str, precision: str = "no", **over) -> dict:
    return {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": N, "vae.name": "pixel",
            "shards.path": str(shards), **TINY_MODEL, "data.num_workers": 0, "training.mixed_precision": precision,
            "training.batch_size": BATCH, "training.gradient_accumulation_steps": ACCUM,
            "training.num_epochs": EPOCHS, "training.learning_rate": 1e-3, "lr_scheduler.warmup_steps": 4,
            "logging.steps": 1, "logging.tensorboard": False, "checkpointing.steps": 4,
            "logging.output_dir": str(outputs), "logging.run_name": name, **over}


def start_train(shards: Path, root: Path, name: str, precision: str = "no", procs: int = 2, **extra_env) -> Launch:
    return Launch(["train", *cli_args(run_config(shards, root / "outputs", name, precision))], root / "logs",
                  procs=procs, **extra_env)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """Uninterrupted 2-process runs, recording every micro-batch; `reference(precision)` → (run, records)."""
    root = tmp_path_factory.mktemp("dist-ref")
    done: dict[str, tuple[Path, list[dict]]] = {}

    def get(precision: str) -> tuple[Path, list[dict]]:
        if precision not in done:
            record = root / f"samples-{precision}.jsonl"
            start_train(shards, root, f"ref-{precision}", precision, **{RECORD_ENV: record}).ok()
            done[precision] = root / "outputs" / f"ref-{precision}", records(record)
        return done[precision]

    return get


def expected_indices(shards: Path) -> dict[tuple[int, int, int], list[int]]:
    """{(rank, epoch, q): global sample indices} as the loader assigns them, for the whole run."""
    store, _ = open_shards(shards)
    cfg = load_config(None, {})
    order = EpochOrder(store.counts, cfg.training.seed, cfg.data.shuffle_window)
    out = {}
    for r in range(WORLD):
        ds = MicroBatches(store, order, PLAN, r, cfg.training.seed)
        for u in range(END * ACCUM):
            epoch, q = divmod(u, PLAN.micro_per_epoch)
            out[(r, epoch, q)] = ds[(epoch, q)]["indices"].tolist()
    return out


def test_plan_splits_every_epoch_exactly_once_over_two_ranks_with_uneven_shards():
    """The loader's assignment alone (no I/O): equal counts, disjoint ranks, the documented remainder, for uneven
    shard counts and sizes and several batch shapes."""
    for counts, batch, accum in [([22, 22, 22, 22, 12], 4, 2), ([37, 5, 61], 3, 1), ([7] * 9 + [1], 2, 3),
                                 ([100], 5, 2), ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 1, 4)]:
        n = sum(counts)
        plan = Plan(n, batch, accum, 2)
        order = EpochOrder(counts, seed=0, window=2)
        epochs = []
        for epoch in range(3):
            per_rank = [[order(epoch, plan.positions(q, r)).tolist() for q in range(plan.micro_per_epoch)]
                        for r in range(2)]
            assert len(per_rank[0]) == len(per_rank[1]) == plan.steps_per_epoch * accum
            assert all(len(b) == batch for r in per_rank for b in r)  # every micro-batch is full on every rank
            seen = [g for r in per_rank for b in r for g in b]
            assert len(seen) == len(set(seen)) == plan.steps_per_epoch * plan.global_batch
            assert set(seen) <= set(range(n))
            assert n - len(seen) == n % plan.global_batch  # the remainder is dropped, never wrapped
            epochs.append(seen)
        assert epochs[0] != epochs[1] != epochs[2]


def test_two_process_run_reads_disjoint_slices_exactly_once(shards, reference):
    run, rec = reference("no")
    assert PLAN.steps_per_epoch == 6 and N % PLAN.global_batch == 4
    assert len(rec) == END * ACCUM * WORLD
    by_rank = {r: [x for x in rec if x["rank"] == r] for r in range(WORLD)}
    expected = expected_indices(shards)
    for r, lines in by_rank.items():  # each rank: every micro-batch of every step, in order, B samples each
        assert [(x["step"], x["micro"]) for x in lines] == [(s, m) for s in range(END) for m in range(ACCUM)]
        for x in lines:
            assert (x["epoch"], x["q"]) == divmod(x["step"] * ACCUM + x["micro"], PLAN.micro_per_epoch)
            assert len(x["indices"]) == BATCH
            assert x["indices"] == expected[(r, x["epoch"], x["q"])]  # what Plan/MicroBatches say
    dropped = []
    for epoch in range(EPOCHS):
        seen = {r: [g for x in by_rank[r] if x["epoch"] == epoch for g in x["indices"]] for r in range(WORLD)}
        assert len(seen[0]) == len(seen[1]) == PLAN.steps_per_epoch * PLAN.global_batch // WORLD
        every = seen[0] + seen[1]
        assert len(every) == len(set(every)) == PLAN.steps_per_epoch * PLAN.global_batch == 96  # at most once
        assert not set(seen[0]) & set(seen[1])
        assert set(every) <= set(range(N))
        dropped.append(set(range(N)) - set(every))
        assert len(dropped[-1]) == 4
    assert len({frozenset(d) for d in dropped}) == EPOCHS  # each epoch drops other samples: a new permutation
    orders = [[g for x in rec if x["epoch"] == e and x["rank"] == 0 for g in x["indices"]] for e in range(EPOCHS)]
    assert orders[0] != orders[1] != orders[2]
    state = validate(run / checkpoint.step_name(END))
    assert state["samples_consumed"] == END * PLAN.global_batch and state["steps_per_epoch"] == 6


def test_logged_loss_is_the_mean_over_ranks(reference):
    run, rec = reference("no")
    metrics = {m["step"]: m["loss"] for m in read_metrics(run)}
    assert sorted(metrics) == list(range(1, END + 1))
    apart = 0
    for step in range(END):
        local = []
        for r in range(WORLD):  # the rank's step loss, summed as the loop sums it (float32)
            acc = torch.zeros(())
            for x in rec:
                if x["rank"] == r and x["step"] == step:
                    acc += torch.tensor(x["loss"], dtype=torch.float32) / ACCUM
            local.append(acc)
        mean = float(local[0] + local[1]) / WORLD
        assert metrics[step + 1] == pytest.approx(mean, rel=1e-6, abs=1e-7), step
        apart += abs(float(local[0]) - float(local[1])) > 1e-4
    assert apart > END // 2  # the ranks' losses differ, so the check above tells a mean from rank 0's own loss


def test_every_checkpoint_holds_and_hashes_each_ranks_rng_state(reference):
    run, _ = reference("no")
    names = sorted(p.name for p in run.glob("checkpoint-*"))
    assert names == sorted([*(f"checkpoint-{s}" for s in (4, 8, 12, 16, END)),
                            *(f"checkpoint-epoch-{e}" for e in range(1, EPOCHS + 1))])
    assert not list(run.glob(".checkpoint-*"))
    for name in names:
        state = validate(run / name)  # every recorded file present, sizes and sha256 matching
        assert state["world_size"] == WORLD and state["samples_consumed"] == state["step"] * PLAN.global_batch
        for r in range(WORLD):
            f = run / name / f"rng-rank{r}.pt"
            assert state["files"][f.name]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
            loaded = checkpoint.load_tensors(f)
            assert {"python", "numpy", "torch", "log_window"} <= set(loaded)


# ---------------------------------------------------------------------------------------------------- resume


def assert_same_run(run: Path, ref: Path) -> None:
    final = checkpoint.step_name(END)
    assert (run / "latest").read_text().strip() == final
    state, ref_state = validate(run / final), validate(ref / final)
    for key in ("step", "epoch", "samples_consumed", "total_steps", "world_size"):
        assert state[key] == ref_state[key], key
    for f in ("model.pt", "ema.pt", "optimizer.pt", "rng-rank0.pt", "rng-rank1.pt"):
        assert state["files"][f]["sha256"] == ref_state["files"][f]["sha256"], f"{final}/{f} differs"
    a, b = (torch.load(p / final / "model.pt", weights_only=True) for p in (run, ref))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert_common_checkpoints_equal(run, ref)
    expected = {m["step"]: m for m in read_metrics(ref)}
    got = read_metrics(run)
    assert [m["step"] for m in got] == sorted(expected) == list(range(1, END + 1))
    for m in got:
        for key in ("loss", "lr", "grad_norm", "epoch"):
            assert m[key] == expected[m["step"]][key], f"step {m['step']} {key}"


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_two_process_run_killed_after_a_checkpoint_resumes_bitwise(shards, reference, tmp_path, precision):
    ref, ref_rec = reference(precision)
    run = tmp_path / "outputs" / "cut"
    # a pause per checkpoint file keeps the run inside its next checkpoint write while the test kills it
    launch = start_train(shards, tmp_path, "cut", precision, **{PAUSE_ENV: 0.05,
                                                               RECORD_ENV: tmp_path / "cut.jsonl"})
    launch.wait_for("checkpoint-8", lambda: (run / "checkpoint-8").is_dir())
    launch.kill_all()
    assert not (run / checkpoint.step_name(END)).exists()
    resumed_from = checkpoint.find_resumable(run, warn=pytest.fail)[1]["step"]
    assert 8 <= resumed_from < END

    Launch(["resume", run], tmp_path / "logs", **{RECORD_ENV: tmp_path / "resumed.jsonl"}).ok()
    assert_same_run(run, ref)
    # exactly once across the kill: the killed run up to its checkpoint, then the resumed run, read what the
    # uninterrupted run read, micro-batch for micro-batch
    before = [x for x in records(tmp_path / "cut.jsonl") if x["step"] < resumed_from]
    after = records(tmp_path / "resumed.jsonl")
    assert min(x["step"] for x in after) == resumed_from
    key = lambda x: (x["step"], x["rank"], x["micro"])  # noqa: E731
    assert [(key(x), x["indices"]) for x in sorted(before + after, key=key)] == \
        [(key(x), x["indices"]) for x in sorted(ref_rec, key=key)]


# ---------------------------------------------------------------------------------------------------- elastic


def draws_by_step(rec: list[dict]) -> dict[int, list[tuple]]:
    """{step: sorted (sample index, its timestep, its noise sum)} over every rank and micro-batch of the step."""
    out: dict[int, list[tuple]] = {}
    for x in rec:
        out.setdefault(x["step"], []).extend(zip(x["indices"], x["t"], x["noise"]))
    return {step: sorted(v) for step, v in out.items()}


def relative_gap(run: Path, ref: Path, name: str = "model.pt") -> float:
    """‖a − b‖ / ‖b‖ over every tensor of the final checkpoint's `name`."""
    final = checkpoint.step_name(END)
    a, b = (torch.load(p / final / name, weights_only=True) for p in (run, ref))
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    return (diff / sum(float(b[k].double().square().sum()) for k in b)) ** 0.5


def test_the_same_global_batch_trains_the_same_samples_and_draws_on_1_2_and_4_processes(shards, reference,
                                                                                       tmp_path):
    """Global batch 16 as 1 process × accumulation 4, 2 × 2 (the reference) and 4 × 1: at every step the same
    samples with the same timestep and noise for each; the weights differ only by the order of float sums."""
    ref, ref_rec = reference("no")
    want = draws_by_step(ref_rec)
    assert len(want) == END and all(len(v) == PLAN.global_batch for v in want.values())
    for procs, accum in ((1, 4), (4, 1)):
        over = {**run_config(shards, tmp_path / "outputs", f"p{procs}"), "training.gradient_accumulation_steps": accum}
        record = tmp_path / f"p{procs}.jsonl"
        Launch(["train", *cli_args(over)], tmp_path / "logs", procs=procs, **{RECORD_ENV: record}).ok(timeout=600)
        rec = records(record)
        assert {x["rank"] for x in rec} == set(range(procs))
        assert draws_by_step(rec) == want, f"{procs} process(es): other samples or draws"
        run = tmp_path / "outputs" / f"p{procs}"
        assert relative_gap(run, ref) < 1e-5 and relative_gap(run, ref, "ema.pt") < 1e-5
        assert [m["loss"] for m in read_metrics(run)] == pytest.approx([m["loss"] for m in read_metrics(ref)],
                                                                      rel=1e-5)


def test_a_run_killed_on_2_processes_resumes_on_1_and_on_4(shards, reference, tmp_path):
    """kill -9 of a 2-process run after checkpoint-8; resumed with 1 process and with 4 (the global batch kept by
    the accumulation, as printed), it trains the uninterrupted run's samples and draws from the resume step on, and
    ends at its weights up to float summation order."""
    ref, ref_rec = reference("no")
    cut = tmp_path / "cut" / "outputs" / "cut"
    launch = start_train(shards, tmp_path / "cut", "cut", "no", **{PAUSE_ENV: 0.05})
    launch.wait_for("checkpoint-8", lambda: (cut / "checkpoint-8").is_dir())
    launch.kill_all()
    want = draws_by_step(ref_rec)
    for procs, accum in ((1, 4), (4, 1)):
        run = tmp_path / f"on{procs}" / "cut"
        shutil.copytree(cut, run)
        resumed_from = checkpoint.find_resumable(run, warn=pytest.fail)[1]["step"]
        record = tmp_path / f"resumed-{procs}.jsonl"
        launch = Launch(["resume", run], tmp_path / "logs", procs=procs, **{RECORD_ENV: record}).ok(timeout=600)
        out = " ".join(launch.output().split())
        assert f"this launch has {procs}: batch {BATCH} × accumulation {accum} keeps its global batch 16" in out
        got = draws_by_step(records(record))
        assert min(got) == resumed_from and got == {s: v for s, v in want.items() if s >= resumed_from}
        assert relative_gap(run, ref) < 1e-5
        state = validate(run / checkpoint.step_name(END))
        assert (state["world_size"], state["gradient_accumulation_steps"], state["global_batch"]) == (procs, accum, 16)


def test_a_world_size_that_cannot_keep_the_global_batch_is_refused(shards, reference, tmp_path, cli):
    ref, _ = reference("no")
    run = tmp_path / "two"
    shutil.copytree(ref, run)
    before = {str(p): p.stat().st_mtime_ns for p in run.rglob("*")}
    # one process, with a batch size whose split cannot make 16: refused, listing the splits that can
    code, _, err = cli("resume", run / "checkpoint-8", "--training.batch_size", "3")
    flat = " ".join(err.split())
    assert code == 2, err
    assert "global batch is 16 (batch 4 × accumulation 2 × 2 process(es))" in flat and "does not keep it" in flat
    assert "batch_size 1 × gradient_accumulation_steps 16" in flat and "batch_size 16 × gradient_accumulation_steps 1" \
        in flat
    assert {str(p): p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing touched
    # three processes: 16 has no split over 3; every rank refuses with the message, nobody hangs
    launch = Launch(["resume", run / "checkpoint-8"], tmp_path / "logs", procs=3)
    assert launch.wait() != 0
    out = " ".join(launch.output().split())
    assert out.count("no split of 16 over 3 process(es) exists") == 3, out[-3000:]
    assert {str(p): p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_an_existing_run_folder_is_refused_by_every_rank(shards, reference, tmp_path):
    ref, _ = reference("no")
    outputs = ref.parent
    launch = Launch(["train", *cli_args(run_config(shards, outputs, ref.name))], tmp_path / "logs")
    assert launch.wait() != 0
    out = launch.output()
    assert " ".join(out.split()).count(f"run folder '{ref}' already exists") == 2, out[-3000:]
    assert "Connection closed by peer" not in out  # no rank left waiting in a collective for the one that refused


# ---------------------------------------------------------------------------------------------------- URLs


def test_shards_from_an_fsspec_url_train_the_same_and_pipe_is_refused(shards, tmp_path, cli):
    import fsspec
    
    parquet = tmp_path / "parquet"
    encode(load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": N,
                              "vae.name": "pixel", "data.num_workers": 0, "shards.samples_per_shard": PER_SHARD,
                              "shards.format": "parquet", "shards.path": str(parquet)}))
    cfg = {**run_config(shards, tmp_path / "outputs", "local"), "training.max_steps": 3}
    for folder in (shards, parquet):  # tar and Parquet shards, from a path and from a file:// URL
        runs = []
        for where in (str(folder), folder.resolve().as_uri()):
            reset_accelerate()
            runs.append(train(load_config(None, {**cfg, "shards.path": where,
                                                 "logging.run_name": f"{folder.name}-{len(runs)}"})))
        wa, wb = (torch.load(r / "checkpoint-3" / "model.pt", weights_only=True) for r in runs)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # a remote copy whose shards changed after its manifest was written is refused by sha256
    mem = fsspec.filesystem("memory")
    for p in shards.iterdir():
        data = p.read_bytes()
        if p.suffix == ".tar":  # one byte of the tar's end padding: only the hash can tell
            data = data[:-1] + b"\x01"
        mem.pipe_file(f"/dist-test/{p.name}", data)
    reset_accelerate()
    with pytest.raises(ShardError, match="does not match the manifest's sha256"):
        train(load_config(None, {**cfg, "shards.path": "memory:///dist-test", "logging.run_name": "mem"}))
    mem.rm("/dist-test", recursive=True)

    reset_accelerate()
    code, _, err = cli("train", *cli_args({**cfg, "shards.path": f"pipe:cat {shards}/shard-00000.tar",
                                           "logging.run_name": "pipe"}))
    assert code == 1 and "pipe: shard locations are not supported" in " ".join(err.split())
    code, _, err = cli("encode", "--dataset", "shapes", "--vae", "pixel", "--out", f"pipe:cat {shards}/x.tar")
    assert code == 2 and "is not a folder URL an encode can write" in " ".join(err.split())  # s3://: test_s3_encode


@pytest.mark.slow
def test_a_compiled_two_process_run_writes_plain_keys_that_resume_sample_and_export_load(shards, tmp_path, cli):
    """`model.compile: true` under DDP: compile wraps the prepared module, so no checkpoint key carries `_orig_mod.`
    (or `module.`), and resume, `sample --no-ema` and `export --raw` load the weights strictly. (Before the fix the
    compiled module was wrapped by DDP and model.pt held `_orig_mod.` keys.) Slow: inductor compiles on the CPU."""
    over = {"model.compile": True, "training.num_epochs": 1, "logging.steps": 2, "checkpointing.steps": 2}
    Launch(["train", *cli_args(run_config(shards, tmp_path / "outputs", "compiled", **over))],
           tmp_path / "logs").ok(timeout=900)
    run = tmp_path / "outputs" / "compiled"
    for name in ("model.pt", "ema.pt", "optimizer.pt"):
        state = torch.load(run / "checkpoint-6" / name, weights_only=True)
        keys = state.keys() if name != "optimizer.pt" else [str(k) for k in state["state"]]
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys), (name, list(keys)[:3])
    Launch(["resume", str(run / "checkpoint-4"), "--training.max_steps", "6"], tmp_path / "logs").ok(timeout=900)
    code, _, err = cli("sample", "--checkpoint", str(run / "checkpoint-6"), "--no-ema", "--num", "4", "--steps", "2",
                       "--out", str(tmp_path / "grid.png"))
    assert code == 0, err[-2000:]
    code, _, err = cli("export", str(run / "checkpoint-6"), "--format", "safetensors", "--raw", "--out",
                       str(tmp_path / "exp"))
    assert code == 0, err[-2000:]
