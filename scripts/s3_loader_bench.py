"""`ditpipe bench loader --shards s3://...` against a local S3 server (moto, as the tests start it), end to end:

    .venv/bin/python scripts/s3_loader_bench.py [--samples 5000] [--image-size 256] [--workers 2] [--repeats 3]
                                                 [--json s3-loader.json]

writes synthetic latent shards (the loader part's own, `bench.task_prepare_shards`: 4×4×(image/8)² fp16 a sample,
1,000 a shard, tar), uploads them to a bucket object by object (the manifest last), then runs the bench loader
command with the server's endpoint and dummy credentials in its environment, and stops the server. The JSON's
`loader.remote` holds local, cold and warm samples/s and the two ratios."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from s3server import S3Server

    from ditpipe.pipeline import objstore, shards
    from ditpipe.stages.bench import BenchOptions, task_prepare_shards

    server = S3Server().start()
    try:
        os.environ.update(server.env)
        with tempfile.TemporaryDirectory(prefix="s3-loader-bench-") as work:
            folder = Path(work) / "wds"
            print(f"writing {args.samples:,} samples to {folder}", file=sys.stderr)
            task_prepare_shards(BenchOptions(), {"wds": str(folder)}, n=args.samples, image_size=args.image_size,
                                codec_kind="vae", codec_name="bench-synthetic")
            url = server.bucket("bench") + "/shards"
            fs, root = objstore.filesystem(url)
            for p in sorted(folder.iterdir(), key=lambda p: p.name == shards.MANIFEST):  # the manifest last
                fs.put_file(str(p), f"{root}/{p.name}")
            command = [str(ROOT / ".venv/bin/ditpipe"), "bench", "loader", "--shards", url, "--num-workers",
                       str(args.workers), "--repeats", str(args.repeats), "--loader-batch", str(args.batch),
                       "--workdir", str(Path(work) / "bench")] + (["--json", args.json] if args.json else [])
            print(" ".join(command), file=sys.stderr)
            return subprocess.run(command, env={**os.environ, **server.env}).returncode
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
