"""The fraction of image pixels a crop keeps: the square centre crop against aspect-ratio buckets (pipeline/buckets.py).

Reads only sizes, never pixels: a COCO annotation file's `images[].width/height`, or each file's header in a folder.

    python scripts/bucket_coverage.py --coco data/annotations/captions_train2017.json --image-size 256 --multiple 16
    python scripts/bucket_coverage.py --folder data/custom --image-size 256 --multiple 16

Prints one JSON line: images counted, the mean fraction kept by the centre crop and by the nearest `auto` bucket
(or `--buckets WxH,WxH,...`), the worst case of each, and how many images each bucket gets; for a folder also the
rate at which encode's bucket assignment reads the headers (files/s).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ditpipe.pipeline import buckets


def sizes_from(coco: str | None, folder: str | None) -> list[tuple[int, int]]:
    if coco:
        return [(im["width"], im["height"]) for im in json.loads(Path(coco).read_text())["images"]]
    from ditpipe.pipeline.config import DataConfig
    from ditpipe.pipeline.sources import header_size, make_source

    source = make_source(DataConfig(dataset_name="custom", dataset_path=folder, num_samples=None))
    return [d for it in source.items if (d := header_size(source.root / it.file, source.max_file_bytes))]


def header_rate(folder: str, sizes: list[tuple[int, int]]) -> float:
    """Files a second that encode's bucket assignment reads headers at (`assign_buckets`, 4 threads)."""
    from ditpipe.pipeline.config import DataConfig
    from ditpipe.pipeline.sources import assign_buckets, make_source

    source = make_source(DataConfig(dataset_name="custom", dataset_path=folder, num_samples=None))
    t0 = time.perf_counter()
    assign_buckets(source, sizes, threads=4)
    return len(source) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coco", help="a COCO annotation file (captions_*.json or instances_*.json)")
    ap.add_argument("--folder", help="a folder of images (sizes from their headers)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--multiple", type=int, default=16, help="the codec's downsample × the model's patch")
    ap.add_argument("--buckets", help="WxH,WxH,... instead of the auto list")
    a = ap.parse_args()
    sizes = sizes_from(a.coco, a.folder)
    chosen = ([buckets.parse_size(s) for s in a.buckets.split(",")] if a.buckets
              else buckets.auto_buckets(a.image_size, a.multiple))
    square = [buckets.kept_fraction(w, h, None) for w, h in sizes]
    assigned = [chosen[buckets.nearest(w, h, chosen)] for w, h in sizes]
    bucketed = [buckets.kept_fraction(w, h, b) for (w, h), b in zip(sizes, assigned)]
    print(json.dumps({"images": len(sizes), "centre_crop_kept": round(sum(square) / len(sizes), 4),
                      "buckets_kept": round(sum(bucketed) / len(sizes), 4), "centre_crop_worst": round(min(square), 4),
                      "buckets_worst": round(min(bucketed), 4),
                      "per_bucket": {f"{w}x{h}": assigned.count((w, h)) for w, h in chosen},
                      **({"header_reads_per_s": round(header_rate(a.folder, chosen))} if a.folder else {})}))


if __name__ == "__main__":
    main()
