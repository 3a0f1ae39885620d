"""The baseline issue 27 set the loader against: plain pyarrow.parquet reading a bench folder's Parquet shards, the
latent column indexed with numpy in the order of a random global permutation, in one process (no checks, no keys,
no flips, no torch). Prints one JSON line: samples/s and CPU µs a sample, to set beside `ditpipe bench loader`'s
`per_sample_us.microbatch_parquet` from the same machine and run.

    ditpipe bench loader --num-workers 2 --threads 1 --workdir /tmp/bench   # writes /tmp/bench/loader-20000/
    OMP_NUM_THREADS=1 python scripts/plain_parquet_rate.py /tmp/bench/loader-20000/parquet 256
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def main(folder: str, batch: int, repeats: int = 3) -> None:
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    shape = tuple(manifest["latent"]["shape"])  # one sample as stored: (slices, C, H, W)
    t0, c0 = time.perf_counter(), time.process_time()
    arrays = [pq.read_table(Path(folder) / e["name"], columns=["latent"]).column("latent").combine_chunks()
              for e in manifest["shards"]]
    rows = np.concatenate([np.frombuffer(a.buffers()[1], np.float16).reshape(len(a), *shape) for a in arrays])
    load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    best = None
    for r in range(repeats):
        order = np.random.default_rng(r).permutation(len(rows))
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(order) - batch + 1, batch):
            rows[order[i:i + batch]]  # (batch, slices, C, H, W): one numpy gather a batch, a copy
        n = (len(order) // batch) * batch
        run = (n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6)
        best = run if best is None or run[0] > best[0] else best
    print(json.dumps({"samples": len(rows), "batch": batch, "load_seconds": round(load_s, 3),
                      "load_cpu_us_per_sample": round(load_cpu / len(rows) * 1e6, 2),
                      "gather_samples_per_s": round(best[0], 1), "gather_cpu_us_per_sample": round(best[1], 2)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 256)
