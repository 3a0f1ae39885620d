"""Shard formats behind one registry (pipeline/formats/): each format's writer, reader, iterator and verifier reached
through it alone; no other module switches on the format string; a micro-batch read as a batch is exactly the
per-sample reads, in the order's sequence; a Parquet reader maps its file instead of decoding a copy of it."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from ditpipe.pipeline import formats, shards
from ditpipe.pipeline.loader import LatentView, MicroBatches
from ditpipe.pipeline.order import EpochOrder, Plan, sample_key
from ditpipe.pipeline.store import ShardStore, open_shards
from conftest import pixel_shards

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (2, 3, 4, 4)  # (k, C, H, W)


def test_the_registry_lists_both_formats_and_each_module_has_the_whole_interface():
    assert formats.names() == ("wds", "parquet")
    for name in formats.names():
        fm = formats.get(name)
        assert fm.NAME == name and fm.NAME_RE.fullmatch(fm.shard_name(7)) and fm.shard_name(7).endswith(fm.SUFFIX)
        for part in ("Writer", "Reader", "iter_shard", "decode", "NAME_HINT", "PREFIX"):
            assert hasattr(fm, part), (name, part)
        assert formats.SHARD_FILE_RE.match(fm.shard_name(3)) and shards.shard_index(fm.shard_name(3)) == 3
    with pytest.raises(Exception, match="unknown shard format 'zip'"):
        formats.get("zip")


def _write(fm, path: Path, n: int, ragged: bool):
    """n samples through the format's Writer alone; returns (latents, the sidecar the reader needs)."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((n, *SHAPE)).astype(np.float16)
    writer, keys = fm.Writer(path, SHAPE, False), []
    for i in range(n):
        key = f"{i:06d}"
        meta = {"key": key, "label": i % 3, **({"note": "x" * (700 * (i % 2))} if ragged else {})}  # 2 tar strides
        writer.add(key, latents[i], shards.json_bytes(meta), None)
        keys.append(key)
    writer.close()
    return latents, {"keys": keys, "labels": [i % 3 for i in range(n)], **writer.sidecar()}


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("name", ["wds", "parquet"])
def test_each_format_round_trips_writer_reader_iterator_verifier_through_the_registry(tmp_path, name, ragged):
    fm = formats.get(name)
    path = tmp_path / fm.shard_name(0)
    latents, side = _write(fm, path, 300, ragged)  # > one Parquet row group
    reader = fm.Reader(path, side, SHAPE, False, path)
    assert all(np.array_equal(reader.row(i), latents[i]) for i in range(300))
    rows = np.random.default_rng(1).permutation(300)[:100]
    slices = rows % 2
    out = np.empty((len(rows), *SHAPE[1:]), np.float16)
    reader.gather(rows, np.arange(len(rows)), [(slices, out)])
    assert np.array_equal(out, latents[rows, slices])
    reader.release()
    samples = list(fm.iter_shard(path, side, SHAPE, None))
    assert [s.key for s in samples] == side["keys"] and np.array_equal(np.stack([s.latent for s in samples]), latents)
    problems = []
    assert fm.decode(path, SHAPE, set(shards.SAMPLE_MEMBERS), side, problems, None, 3) == 300 and problems == []


def test_no_module_outside_the_format_modules_compares_a_format_string():
    found = []
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]):
        if path.parent == ROOT / "pipeline" / "formats":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                names = {c.value for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant)}
                if names & {"wds", "parquet"}:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory, tiny_vae):
    """(codec, format) → a small shard folder, encoded on first use: the pixel codec mirrors at load time, the
    tiny VAE stores mean, std and their mirrors."""
    made = {}

    def get(codec: str, fmt: str) -> Path:
        if (codec, fmt) not in made:
            over = {"shards.samples_per_shard": 16, "shards.format": fmt,
                    **({"vae.name": str(tiny_vae)} if codec == "vae" else {})}
            made[codec, fmt] = pixel_shards(tmp_path_factory.mktemp(f"{codec}-{fmt}") / "s", 90 if codec == "pixel"
                                            else 40, **over)
        return made[codec, fmt]
    return get


def _per_sample(store, ds, epoch, indices):
    """What a read a sample gives: the stored latent's selected slices, flipped by its key."""
    view, means, stds, labels = LatentView(store.manifest), [], [], []
    for g in indices.tolist():
        stored, label = store.read(g)
        m, s = view.select(stored, sample_key(ds.seed, epoch, g))
        means.append(np.ascontiguousarray(m))
        stds.append(None if s is None else np.ascontiguousarray(s))
        labels.append(label)
    return np.stack(means), None if stds[0] is None else np.stack(stds), labels


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
@pytest.mark.parametrize("codec", ["pixel", "vae"])
def test_a_batch_read_is_exactly_the_per_sample_reads_in_the_orders_sequence(shard_sets, codec, fmt):
    folder = shard_sets(codec, fmt)
    store, manifest = open_shards(folder)
    plan = Plan(manifest["num_samples"], 8, 1, 2)
    ds = MicroBatches(store, EpochOrder(store.counts, 5, 2), plan, 1, 5)
    flipped = 0
    last = plan.micro_per_epoch - 1
    for epoch, q in [(0, 0), (0, last), (1, 1), (2, last), (3, 0)]:
        batch = ds[(epoch, q)]
        indices = batch["indices"].numpy()
        assert np.array_equal(indices, ds.order(epoch, plan.positions(q, 1)))
        mean, std, labels = _per_sample(store, ds, epoch, indices)
        assert np.array_equal(batch["mean"].numpy().view(np.uint16), mean.view(np.uint16))  # bit for bit
        assert (std is None) == ("std" not in batch)
        if std is not None:
            assert np.array_equal(batch["std"].numpy().view(np.uint16), std.view(np.uint16))
        assert batch["labels"].tolist() == labels
        flipped += sum(sample_key(5, epoch, int(g)) >> 63 for g in indices)
    assert flipped  # the flip path was taken


def test_a_parquet_reader_maps_its_file_and_a_store_holds_a_bounded_number_open(tmp_path):
    import pyarrow as pa

    folder = pixel_shards(tmp_path / "s", 96, **{"shards.samples_per_shard": 16, "shards.format": "parquet"})
    manifest = json.loads((folder / shards.MANIFEST).read_text())
    store = ShardStore(folder, manifest, max_open=2)
    before = pa.total_allocated_bytes()
    for g in range(0, 96, 5):
        store.read(g)
        assert len(store._open) <= 2
    # no decoded copy of a shard: the latent rows are views of each reader's file map
    assert pa.total_allocated_bytes() - before < manifest["shards"][0]["bytes"]
    for reader, _ in store._open.values():
        file_bytes = np.frombuffer(reader.data, np.uint8)
        assert all(np.shares_memory(chunk, file_bytes) for chunk in reader.chunks)


def test_a_parquet_file_laid_out_otherwise_is_still_read_through_pyarrow(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fm = formats.get("parquet")
    path = tmp_path / fm.shard_name(0)
    latents, side = _write(fm, path, 40, False)
    table = pq.read_table(path)
    pq.write_table(pa.table(table.columns, schema=table.schema), path, compression="snappy")  # not our layout
    reader = fm.Reader(path, side, SHAPE, False, path)
    assert not any(np.shares_memory(c, np.frombuffer(reader.data, np.uint8)) for c in reader.chunks)
    assert all(np.array_equal(reader.row(i), latents[i]) for i in range(40))
