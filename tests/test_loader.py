"""The streaming loader: exactly-once epochs, keyed order and draws, equal rank splits, locality, exact resume."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.loader import LatentView, MicroBatches, RunKeys, make_loader, sample_normal
from ditpipe.pipeline.order import EpochOrder, Plan, sample_flip, sample_key
from ditpipe.pipeline.store import ShardStore, open_shards
from ditpipe.stages.encode import encode


def _encode(folder, **over):
    base = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 200, "vae.name": "pixel",
            "data.num_workers": 0, "shards.samples_per_shard": 37, "shards.path": str(folder)}
    encode(load_config(None, {**base, **over}))
    return folder


@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory):
    return _encode(tmp_path_factory.mktemp("px") / "shards")


@pytest.fixture(scope="module")
def vae_shards(tmp_path_factory, tiny_vae):
    return _encode(tmp_path_factory.mktemp("vae") / "shards", **{"vae.name": str(tiny_vae), "data.num_samples": 64,
                                                                  "data.image_size": 16})


def epoch_indices(store, plan, rank, seed=0, epoch=0, window=8):
    ds = MicroBatches(store, EpochOrder(store.counts, seed, window), plan, rank, seed)
    return [ds[(epoch, q)]["indices"].tolist() for q in range(plan.micro_per_epoch)]


def test_every_sample_at_most_once_per_epoch_and_ranks_split_evenly(pixel_shards):
    store, manifest = open_shards(pixel_shards)
    assert store.counts == [37, 37, 37, 37, 37, 15]  # uneven shards
    plan = Plan(200, batch_size=4, accum=2, world_size=2)
    per_rank = [epoch_indices(store, plan, r) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == plan.steps_per_epoch * 2 == 24
    seen = [g for rank in per_rank for batch in rank for g in batch]
    assert len(seen) == len(set(seen)) == plan.steps_per_epoch * plan.global_batch == 192  # remainder of 8 dropped
    assert set(seen) <= set(range(200))
    assert not set(g for b in per_rank[0] for g in b) & set(g for b in per_rank[1] for g in b)  # disjoint ranks


def test_order_changes_every_epoch_and_repeats_for_the_same_seed(pixel_shards):
    store, _ = open_shards(pixel_shards)
    plan = Plan(200, 8, 1, 1)
    e0, e1 = epoch_indices(store, plan, 0, epoch=0), epoch_indices(store, plan, 0, epoch=1)
    assert e0 != e1
    assert e0 == epoch_indices(store, plan, 0, epoch=0)
    assert e0 != epoch_indices(store, plan, 0, seed=1, epoch=0)
    # the dropped remainder differs between epochs, so every sample gets its turn
    missed = [set(range(200)) - {g for b in epoch_indices(store, plan, 0, epoch=e) for g in b} for e in range(4)]
    assert len(set.intersection(*missed)) == 0


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=12), window=st.integers(1, 5),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 50))
def test_epoch_order_is_a_permutation(counts, window, seed, epoch):
    order = EpochOrder(counts, seed, window)
    n = sum(counts)
    assert sorted(order(epoch, np.arange(n)).tolist()) == list(range(n))


def test_reads_stay_within_a_window_of_shards(pixel_shards):
    store, _ = open_shards(pixel_shards)
    order = EpochOrder(store.counts, seed=3, window=2)
    starts = np.cumsum([0] + store.counts)
    shard_of = lambda g: int(np.searchsorted(starts, g, side="right") - 1)  # noqa: E731
    first_window = order._epoch(0)[0][0]
    span = int(sum(store.counts[s] for s in first_window))
    touched = {shard_of(g) for g in order(0, np.arange(span))}
    assert touched == set(first_window.tolist()) and len(touched) == 2


def test_worker_count_does_not_change_the_batches(pixel_shards):
    store, _ = open_shards(pixel_shards)
    plan = Plan(200, 8, 2, 1)
    runs = []
    for workers in (0, 2):
        order = EpochOrder(store.counts, 0, 8)
        loader = make_loader(MicroBatches(store, order, plan, 0, 0), plan, 0, 30, workers)
        runs.append([(b["indices"].clone(), b["mean"].clone()) for b in loader])
    assert len(runs[0]) == len(runs[1]) == 60  # 30 steps × 2 micro-batches, across epoch boundaries
    for (i0, x0), (i1, x1) in zip(*runs):
        assert torch.equal(i0, i1) and torch.equal(x0, x1)


class CountingStore(ShardStore):
    """The real store, counting which samples it reads."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reads = []

    def read(self, g):
        self.reads.append(g)
        return super().read(g)

    def gather(self, indices, picks):  # a micro-batch's reads, as one call
        self.reads += [int(g) for g in indices]
        return super().gather(indices, picks)


def test_resume_starts_at_the_position_without_reading_earlier_samples(pixel_shards):
    _, manifest = open_shards(pixel_shards)
    plan = Plan(200, 8, 2, 1)  # 12 steps per epoch
    full_store, tail_store = CountingStore(pixel_shards, manifest), CountingStore(pixel_shards, manifest)
    order = EpochOrder(full_store.counts, 0, 8)
    full = [b["mean"] for b in make_loader(MicroBatches(full_store, order, plan, 0, 0), plan, 0, 20, 0)]
    tail = [b["mean"] for b in make_loader(MicroBatches(tail_store, order, plan, 0, 0), plan, 15, 20, 0)]
    assert len(tail) == 10 and all(torch.equal(a, b) for a, b in zip(full[30:], tail))
    assert len(tail_store.reads) == 10 * 8  # only what it yields
    assert tail_store.reads == full_store.reads[30 * 8:]
    assert list(RunKeys(plan, 15, 16)) == [(1, 6), (1, 7)]  # one counter → (epoch, micro-batch)


def test_pixel_flip_is_exact_and_keyed_per_sample(pixel_shards):
    store, manifest = open_shards(pixel_shards)
    view = LatentView(manifest)
    assert view.flip_at_load and view.norm.scale == (1.0,) * 3 and view.norm.shift == (0.0,) * 3
    flips = 0
    for g in range(40):
        stored, _ = store.read(g)
        image = stored[0].astype(np.float32)  # (3, H, W) in [-1, 1]
        got = view(stored, sample_key(0, 5, g))
        flipped = sample_flip(sample_key(0, 5, g))
        flips += flipped
        assert np.array_equal(got, image[:, :, ::-1] if flipped else image)
        assert np.array_equal(got, view(stored, sample_key(0, 5, g)))  # a pure function of the key
    assert 10 < flips < 30
    # in a batch, a sample gets the same draw whatever its rank or position
    plan = Plan(200, 4, 1, 2)
    ds = MicroBatches(store, EpochOrder(store.counts, 0, 8), plan, 1, 0)
    batch = ds[(5, 3)]
    assert batch["mean"].dtype == torch.float16 and "std" not in batch  # the stored image, flipped, no draw
    for g, x in zip(batch["indices"].tolist(), batch["mean"]):
        assert np.array_equal(x.float().numpy(), view(store.read(g)[0], sample_key(0, 5, g)))


def test_vae_latents_use_posterior_noise_and_the_manifests_factors(vae_shards):
    store, manifest = open_shards(vae_shards)
    assert manifest["latent"]["slices"] == ["mean", "std", "mean_flip", "std_flip"]
    scale, shift = manifest["codec"]["scaling_factor"], manifest["codec"]["shift_factor"]
    view = LatentView(manifest)
    for g in range(10):
        stored, _ = store.read(g)
        key = sample_key(0, 0, g)
        mean, std = (stored[2], stored[3]) if sample_flip(key) else (stored[0], stored[1])
        eps = sample_normal(key, mean.shape, torch.Generator())
        assert abs(float(eps.mean())) < 0.2 and 0.8 < float(eps.std()) < 1.2  # a standard normal draw
        expected = (mean.astype(np.float32) + std.astype(np.float32) * eps - shift) * scale
        assert np.allclose(view(stored, key), expected, atol=1e-6)
    assert not np.allclose(view(stored, sample_key(0, 0, 0)), view(stored, sample_key(0, 1, 0)))
    assert len({sample_flip(sample_key(0, 0, g)) for g in range(10)}) == 2  # both mirror states occur
    # the training loader copies the key's slices as stored (fp16) and draws nothing: ε is the step's
    batch = MicroBatches(store, EpochOrder(store.counts, 0, 8), Plan(64, 8, 1, 1), 0, 0)[(0, 1)]
    for g, m, s in zip(batch["indices"].tolist(), batch["mean"], batch["std"]):
        key = sample_key(0, 0, g)
        want = (2, 3) if sample_flip(key) else (0, 1)
        stored = store.read(g)[0]
        assert np.array_equal(m.numpy(), stored[want[0]]) and np.array_equal(s.numpy(), stored[want[1]])


def test_tar_and_parquet_give_the_same_batches(tmp_path):
    a = _encode(tmp_path / "wds", **{"data.num_samples": 60})
    b = _encode(tmp_path / "pq", **{"data.num_samples": 60, "shards.format": "parquet"})
    plan = Plan(60, 6, 1, 1)
    batches = []
    for folder in (a, b):
        store, _ = open_shards(folder)
        ds = MicroBatches(store, EpochOrder(store.counts, 0, 8), plan, 0, 0)
        batches.append([ds[(0, q)] for q in range(plan.micro_per_epoch)])
    for x, y in zip(*batches):
        assert torch.equal(x["mean"], y["mean"]) and torch.equal(x["labels"], y["labels"])


def test_open_shards_stay_bounded(pixel_shards):
    store, manifest = open_shards(pixel_shards)
    small = ShardStore(pixel_shards, manifest, max_open=2)
    for g in range(200):
        small.read(g)
        assert len(small._open) <= 2
    assert np.array_equal(small.read(199)[0], store.read(199)[0])
