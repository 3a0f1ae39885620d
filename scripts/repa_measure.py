"""What REPA's alignment does to a short CPU run, measured: loss and sample accuracy at equal steps, with and without.

Issue 28's offline measurement: no DINOv2 can be had offline, so the targets are the TF-FID Inception's Mixed_6e
tokens (`encode --targets inception`, the one pretrained vision network in the `eval` extra), on two datasets:

- digits: scikit-learn's `load_digits()` (1,797 real 8×8 handwritten digits), upscaled to 32 px BILINEAR, grey as
  RGB, one folder per digit, encoded with `--dataset custom --no-flip` (a mirrored glyph is another glyph);
- shapes: the built-in dataset, 1,000 samples, flips on (the mirror's targets are encoded too).

Each dataset × seed trains two arms on the same shards, with the same seed (init, data order, noise, timesteps):
`training.repa.weight` 0 (the baseline: the targets are in the shards but unused) and 0.5 (REPA's), aligning block
`--depth` of the cpu recipe's 4 with a `--projector-dim` projector. Every run stops at `--steps`, short of
convergence, where a faster start would show. Then:

- loss: the denoising loss (metrics.jsonl `loss`), the mean of the last `--tail` logged windows of 10 steps;
- accuracy: `ditpipe sample --num 400` (classes cycled, the run's validation sampler and guidance, sample seed =
  the training seed, so the two arms of a seed draw from the same noise), each sample judged against its intended
  class: digits by a LogisticRegression fitted on real digits rendered the same way (its held-out accuracy on real
  digits is reported), shapes by `pipeline.sources.classify_shape` (colour, shape, and both, as the quickstart).

Every step is a `ditpipe` CLI call (encode, train, sample), so this measures what a user gets. Idempotent: encode is
incremental, and a run whose result.json exists is read, not retrained.

    nice -n 19 .venv/bin/python scripts/repa_measure.py --work /tmp/repa --seeds 0 1 2 --steps 300

Writes WORK/results-nSTEPS.json (every run, with its loss curve) and WORK/results-nSTEPS.md (the table), and prints
the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

DITPIPE = str(Path(sys.executable).parent / "ditpipe")  # the venv's CLI, beside the python running this
SIZE = 32  # the cpu recipe's image size: DiT-S/4 makes an 8×8 token grid of it
LOG_EVERY = 10  # logging.steps: a loss window every 10 steps (the recipe's 50 gives 6 points in a 300-step run)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------------- data


def digit_pixels(images: np.ndarray) -> np.ndarray:
    """sklearn's 8×8 digits (values 0..16) as 32 px uint8 grey, BILINEAR: what the PNGs hold and the judge reads."""
    return np.stack([np.asarray(Image.fromarray((im / 16.0 * 255).round().astype(np.uint8)).resize(
        (SIZE, SIZE), Image.BILINEAR)) for im in images])  # (N, 32, 32)


def write_digits(folder: Path) -> None:
    """One subfolder per digit (the class names '0'..'9'), grey as RGB PNGs; left alone once complete, so that
    encode's incremental check finds every input unchanged."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == len(digits.target):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for i, (px, y) in enumerate(zip(digit_pixels(digits.images), digits.target)):
        (folder / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).convert("RGB").save(folder / str(y) / f"{i:04d}.png")


def encode(args: list[str], log: Path) -> list[str]:
    """Run `ditpipe encode`; return the train keys its `next:` line prints (the shards, and what train checks)."""
    out = _run([DITPIPE, "encode", *args], log)
    line = next(ln for ln in out.splitlines() if ln.startswith("next: "))
    argv = shlex.split(line[len("next: "):])
    keys = argv[argv.index("train") + 1:]
    return _drop(keys, {"--config", "--training.repa.weight"})  # the arms set these themselves


def _drop(argv: list[str], flags: set[str]) -> list[str]:
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            kept.append(a)
    return kept


def _run(cmd: list[str], log: Path) -> str:
    """A CLI call, its output kept in `log`; a failure stops the measurement with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    log.write_text(f"$ {shlex.join(cmd)}\n{p.stdout}\n--- stderr\n{p.stderr}")
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {shlex.join(cmd)}\n{(p.stdout + p.stderr)[-3000:]}")
    return p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------------- judges


def digit_judge() -> tuple[object, float]:
    """A LogisticRegression on real digits rendered as the PNGs are; its accuracy on a held-out quarter."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digit_pixels(digits.images).reshape(len(digits.target), -1) / 255.0  # (N, 1024)
    xtr, xte, ytr, yte = train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    clf = LogisticRegression(max_iter=2000).fit(xtr, ytr)
    return clf, float(clf.score(xte, yte))


def judge(dataset: str, folder: Path, clf) -> dict:
    """Accuracy of the samples in `folder` (`<index>_class<k>.png`) against their intended class k."""
    files = sorted(folder.glob("*_class*.png"))
    want = np.array([int(f.stem.split("_class")[1]) for f in files])
    pixels = [np.asarray(Image.open(f).convert("RGB")) for f in files]  # (H, W, 3) each
    if dataset == "digits":
        x = np.stack([p.mean(axis=2) for p in pixels]).reshape(len(files), -1) / 255.0  # (N, 1024) grey
        return {"n": len(files), "acc": float(np.mean(clf.predict(x) == want))}
    from ditpipe.pipeline.sources import classify_shape

    got = np.array([classify_shape(p) for p in pixels])  # 2·colour + shape, −1 for an empty image
    ok = got >= 0
    return {"n": len(files), "acc": float(np.mean(got == want)),
            "color_acc": float(np.mean(ok & (got // 2 == want // 2))),
            "shape_acc": float(np.mean(ok & (got % 2 == want % 2)))}


# ---------------------------------------------------------------------------------------------------- runs


def one_run(job: dict, a: argparse.Namespace, clfs: dict) -> dict:
    ds, seed, weight = job["dataset"], job["seed"], job["weight"]
    name = f"{ds}-s{seed}-w{weight:g}-n{a.steps}"  # a run of other steps is another run
    out = a.work / "runs"
    run_dir, done = out / name, out / name / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run of ours: start it again from scratch
    cmd = [DITPIPE, "train", "--config", "cpu", *job["keys"], "--training.repa.weight", f"{weight:g}",
           "--training.repa.depth", str(a.depth), "--training.repa.projector_dim", str(a.projector_dim),
           "--training.max_steps", str(a.steps), "--training.seed", str(seed), "--logging.steps", str(LOG_EVERY),
           "--validation.every_steps", "0",  # no grid at the end: `sample` below is the measurement
           "--logging.run_name", name, "--logging.output_dir", str(out)]
    t0 = time.time()
    _run(cmd, a.work / "logs" / f"{name}.train.log")
    train_s = time.time() - t0
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    tail = rows[-a.tail:]
    t0 = time.time()
    samples = run_dir / "measure-samples"
    _run([DITPIPE, "sample", "--checkpoint", str(run_dir), "--num", str(a.num_samples), "--seed", str(seed),
          "--out", str(run_dir / "measure-grid.png"), "--out-dir", str(samples)],
         a.work / "logs" / f"{name}.sample.log")
    sample_s = time.time() - t0
    result = {"dataset": ds, "seed": seed, "weight": weight, "depth": a.depth, "projector_dim": a.projector_dim,
              "steps": rows[-1]["step"], "loss": statistics.fmean(r["loss"] for r in tail),
              "align_loss": statistics.fmean(r["align_loss"] for r in tail) if "align_loss" in tail[-1] else None,
              **judge(ds, samples, clfs.get(ds)), "train_s": round(train_s, 1), "sample_s": round(sample_s, 1),
              "curve": [[r["step"], r["loss"], r.get("align_loss")] for r in rows], "command": shlex.join(cmd)}
    done.write_text(json.dumps(result, indent=1))
    print(f"{name}: loss {result['loss']:.4f} acc {result['acc']:.3f} align {result['align_loss']} "
          f"train {train_s:.0f}s sample {sample_s:.0f}s", flush=True)
    return result


def _ms(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def early_loss(run: dict) -> float:
    """The denoising loss from a third to half of the way in (steps 101-150 of 300): where a faster start shows."""
    lo, hi = early_span(run["steps"])
    return statistics.fmean(loss for step, loss, _ in run["curve"] if lo < step <= hi)


def early_span(steps: int) -> tuple[int, int]:
    return steps // 3, steps // 2


def table(results: list[dict], judge_acc: float | None, a: argparse.Namespace) -> str:
    """Per dataset and arm, mean ± std over seeds; then the paired difference (REPA − baseline, same seed)."""
    early = early_span(a.steps)
    lines = [f"{a.steps} steps, batch 32, configs/cpu.yaml (DiT-S/4, width 128, depth 4, flow); REPA: Inception "
             f"Mixed_6e targets, block {a.depth} of 4, projector {a.projector_dim}; {a.num_samples} samples a run; "
             f"mean ± std over seeds {a.seeds}; loss = mean of the last {a.tail * LOG_EVERY} steps.", "",
             f"| dataset | REPA weight | loss, steps {early[0] + 1}-{early[1]} | loss | accuracy | colour acc | shape acc | align loss (end) | train s | "
             "sample s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ds in a.datasets:
        for w in (0.0, a.weight):
            rs = [{**r, "early": early_loss(r)} for r in results if r["dataset"] == ds and r["weight"] == w]
            pick = lambda k: [r[k] for r in rs if r.get(k) is not None]  # noqa: E731
            lines.append(f"| {ds} | {w:g} | {_ms(pick('early'), 4)} | {_ms(pick('loss'), 4)} | {_ms(pick('acc'))} | {_ms(pick('color_acc'))} | "
                         f"{_ms(pick('shape_acc'))} | {_ms(pick('align_loss'), 4)} | {_ms(pick('train_s'), 0)} | "
                         f"{_ms(pick('sample_s'), 0)} |")
    lines += ["", "Paired by seed (REPA − baseline, the same seed: same init, data order and draws): negative loss / positive "
              "accuracy favour REPA.", "",
              f"| dataset | Δ loss, steps {early[0] + 1}-{early[1]} | Δ loss | Δ accuracy | seeds where REPA's loss is lower | "
              "seeds where REPA's accuracy is higher |", "|---|---|---|---|---|---|"]
    for ds in a.datasets:
        pairs = [(b, r) for b in results for r in results if b["dataset"] == r["dataset"] == ds
                 and b["seed"] == r["seed"] and b["weight"] == 0.0 and r["weight"] == a.weight]
        dl = [r["loss"] - b["loss"] for b, r in pairs]
        de = [early_loss(r) - early_loss(b) for b, r in pairs]
        da = [r["acc"] - b["acc"] for b, r in pairs]
        lines.append(f"| {ds} | {_ms(de, 4)} | {_ms(dl, 4)} | {_ms(da)} | {sum(d < 0 for d in dl)} of {len(dl)} | "
                     f"{sum(d > 0 for d in da)} of {len(da)} |")
    if judge_acc is not None:
        lines += ["", f"Digits judge: LogisticRegression on real digits (32 px bilinear, as the PNGs), "
                      f"{judge_acc:.1%} right on a held-out quarter of real digits."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="data, shards, runs, logs and results go here")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (training.max_steps)")
    ap.add_argument("--datasets", nargs="+", default=["digits", "shapes"], choices=["digits", "shapes"])
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each uses every core torch finds)")
    ap.add_argument("--weight", type=float, default=0.5, help="the REPA arm's training.repa.weight")
    ap.add_argument("--depth", type=int, default=2, help="training.repa.depth: the block aligned, of the recipe's 4")
    ap.add_argument("--projector-dim", type=int, default=256, help="training.repa.projector_dim")
    ap.add_argument("--num-samples", type=int, default=400, help="samples judged per run")
    ap.add_argument("--shapes-samples", type=int, default=1000, help="shapes dataset size (data.num_samples)")
    ap.add_argument("--tail", type=int, default=5, help="logged windows (10 steps each) the end loss averages")
    a = ap.parse_args()
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)

    keys, clfs, judge_acc = {}, {}, None
    if "digits" in a.datasets:
        write_digits(a.work / "digits_png")
        keys["digits"] = encode(["--config", "cpu", "--dataset", "custom", "--data-path", str(a.work / "digits_png"),
                                 "--no-flip", "--targets", "inception", "--out", str(a.work / "digits_shards")],
                                a.work / "logs" / "digits.encode.log")
        clfs["digits"], judge_acc = digit_judge()
    if "shapes" in a.datasets:
        keys["shapes"] = encode(["--config", "cpu", "--dataset", "shapes", "--num-samples", str(a.shapes_samples),
                                 "--targets", "inception", "--out", str(a.work / "shapes_shards")],
                                a.work / "logs" / "shapes.encode.log")
    jobs = [{"dataset": ds, "seed": s, "weight": w, "keys": keys[ds]}
            for ds in a.datasets for s in a.seeds for w in (0.0, a.weight)]
    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(lambda j: one_run(j, a, clfs), jobs))
    md = table(results, judge_acc, a)
    (a.work / f"results-n{a.steps}.json").write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(a).items()},
                                                     "digits_judge_heldout_acc": judge_acc, "runs": results}, indent=1))
    (a.work / f"results-n{a.steps}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
