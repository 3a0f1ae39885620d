"""`ditpipe ema`: choose the EMA length after training (post-hoc EMA, EDM2; the math is in pipeline/phema.py).

    ditpipe ema RUN --sigma-rel 0.08 [--step N] --out DIR
        the EMA of σ_rel 0.08 at step N (default: the last snapshot), from every snapshot at or before N of every
        tracked σ_rel, written as an export folder (DIR/model.safetensors + DIR/config.json) that `sample`,
        `evaluate`, `export` and `--init-from` load
    ditpipe ema RUN --sweep 0.02,0.05,0.1,0.2 --held-out
        reconstructs each and scores it: the held-out loss where the run has a held-out set (data.val_fraction or
        validation.shards), the class accuracy of --num samples judged by `classify_shape` on shapes; prints a
        table and which is best. The run's classic EMA and raw weights at that step are scored beside them when a
        checkpoint of that step exists.

Reconstruction runs on the CPU in fp64 (one model-sized accumulator); scoring on the run's device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ditpipe.pipeline import checkpoint, exported, phema, safe_yaml
from ditpipe.pipeline.config import validate_tree
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.manifest import Manifest

POOR_FIT = 0.05  # a profile fit error above this gets a warning: the snapshots cannot make that EMA well


def ema(run: Path, *, sigma_rel: float | None = None, sweep: str | None = None, step: int | None = None,
        out: Path | None = None, held_out: bool = False, num: int = 256, overwrite: bool = False,
        console: Console | None = None) -> list[dict]:
    """Reconstruct (and write, or score) post-hoc EMAs of `run`; returns one row per σ_rel (and reference rows)."""
    console = console or Console(stderr=True)
    sigmas = _sigmas(sigma_rel, sweep, out)
    run = _run_folder(Path(run))
    snapshots = phema.list_snapshots(run / phema.SNAPSHOT_DIR)
    at = phema.pick_step(snapshots, step, run / phema.SNAPSHOT_DIR)
    ckpt, saved = checkpoint.find_resumable(run, lambda m: console.print(f"[yellow]warning:[/] {m}", soft_wrap=True))
    cfg = validate_tree(safe_yaml.safe_load((ckpt / checkpoint.CONFIG).read_text()))  # only resumable keys ever differ
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    shapes = _model_shapes(cfg, manifest)
    phema.check_snapshots([s for s in snapshots if s.step <= at], shapes)  # before the scorer loads any data
    scorer = _Scorer(cfg, manifest, num, console) if held_out else None
    rows = []
    for sigma in sigmas:
        state, fit = phema.reconstruct(snapshots, at, sigma, shapes)
        console.print(f"σ_rel {sigma:g} at step {at:,}: {fit.summary()}", highlight=False, soft_wrap=True)
        if fit.profile_error > POOR_FIT:
            console.print(f"[yellow]warning:[/] σ_rel {sigma:g} is poorly represented by the snapshots (profile fit "
                          f"error {fit.profile_error:.1%}): it lies far from the tracked σ_rel "
                          f"{', '.join(f'{s:g}' for s in sorted(set(fit.sigmas.tolist())))}, or there are too few "
                          "snapshots (lower checkpointing.phema_every)", soft_wrap=True)
        row = {"sigma_rel": sigma, "step": at, "snapshots": len(fit.coefficients), "condition": fit.condition,
               "profile_error": fit.profile_error}
        if out is not None:
            _write(out, overwrite, cfg, manifest, state, run, at, sigma, fit)
            console.print(f"wrote {out} (post-hoc EMA σ_rel {sigma:g}, step {at:,}); sample it with `ditpipe sample "
                          f"--checkpoint {out}`, fine-tune from it with `--init-from {out}`", soft_wrap=True)
        if scorer is not None:
            row.update(scorer(state))
        rows.append(row)
    if scorer is not None:
        rows += _references(ckpt if saved["step"] == at else _checkpoint_at(run, at), scorer, console)
    if len(rows) > 1 or scorer is not None:
        _table(console, rows, at, scorer)
    return rows


def _sigmas(sigma_rel: float | None, sweep: str | None, out: Path | None) -> list[float]:
    if (sigma_rel is None) == (sweep is None):
        raise DitpipeError("give one of --sigma-rel 0.08 (one EMA) or --sweep 0.02,0.05,0.1,0.2 (several)")
    if sweep is not None:
        try:
            values = [float(x) for x in sweep.split(",") if x.strip()]
        except ValueError:
            raise DitpipeError(f"--sweep {sweep!r}: expected comma-separated σ_rel values, e.g. 0.02,0.05,0.1,0.2") \
                from None
        if out is not None:
            raise DitpipeError("--out writes one EMA: pick it with --sigma-rel (after the sweep)")
    else:
        if out is None:
            raise DitpipeError("--sigma-rel needs --out DIR, the folder to write the weights to")
        values = [sigma_rel]
    return [phema.check_sigma_rel(v, "--sweep" if sweep is not None else "--sigma-rel") for v in values]


def _run_folder(path: Path) -> Path:
    """A run folder (a checkpoint folder means its run)."""
    if not path.is_dir():
        raise DitpipeError(f"'{path}' is not a run folder; pass one such as outputs/RUN")
    return path.parent if (path / checkpoint.STATE).is_file() else path


def _model_shapes(cfg, manifest: dict) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the run's model state dict, built on the meta device (nothing is allocated)."""
    from ditpipe.pipeline.training import build_model, num_classes_for

    with torch.device("meta"):
        model = build_model(cfg, manifest, num_classes_for(cfg, manifest))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _checkpoint_at(run: Path, step: int) -> Path | None:
    """A valid checkpoint of `step`, or None."""
    for s, _, p in checkpoint.list_checkpoints(run):
        if s == step:
            try:
                checkpoint.validate(p)
                return p
            except checkpoint.CheckpointError:
                pass
    return None


def _write(out: Path, overwrite: bool, cfg, manifest: dict, state: dict, run: Path, at: int, sigma: float,
           fit: phema.Fit) -> None:
    """The reconstruction as an export folder; loading it into the run's model first checks every key and shape."""
    from ditpipe.pipeline.training import build_model, num_classes_for

    model = build_model(cfg, manifest, num_classes_for(cfg, manifest))
    model.load_state_dict(state, strict=True)
    meta = exported.metadata(cfg, manifest, model, source=str(run), step=at, weights=f"post-hoc EMA σ_rel {sigma:g}",
                             posthoc_ema={"sigma_rel": sigma, "snapshots": len(fit.coefficients),
                                          "condition": fit.condition, "profile_error": fit.profile_error})
    with exported.written_to(Path(out)), exported.replacing(Path(out), overwrite, protect=Path(run),
                                                            fmt="safetensors", meta=meta, verb="ema") as tmp:
        exported.write(tmp, state, meta)


class _Scorer:
    """Scores weights: the held-out loss where the run has a held-out set, the class accuracy on shapes."""

    def __init__(self, cfg, manifest, num: int, console: Console):
        from ditpipe.pipeline.device import make_accelerator
        from ditpipe.pipeline.training import conditioning_for, num_classes_for

        if conditioning_for(cfg, manifest) == "caption":  # as in training: HeldOut reads labels, not captions
            raise DitpipeError("--held-out scores class and unconditional models; caption models are not supported "
                               "yet (reconstruct with --sigma-rel and evaluate the result)")
        self.cfg, self.manifest, self.num, self.cache = cfg, Manifest.of(manifest), num, {}
        self.acc = make_accelerator(cfg.training.mixed_precision, tf32=cfg.training.tf32)[0]
        self.num_classes = num_classes_for(cfg, manifest)
        self.held = self._held_out()
        self.shapes = cfg.data.dataset_name == "shapes" and self.num_classes > 0
        if self.held is None and not self.shapes:
            raise DitpipeError("--held-out: the run has no held-out set (train with data.val_fraction or "
                               "validation.shards) and is not a shapes run (scored by class accuracy); nothing to "
                               "score the EMAs on")
        what = (["held-out loss"] if self.held else []) + ([f"class accuracy of {num} samples"] if self.shapes else [])
        console.print(f"scoring by {' and '.join(what)} on {self.acc.device}", highlight=False)

    def _held_out(self):
        from ditpipe.pipeline.latent_norm import LatentNorm
        from ditpipe.pipeline.training import open_data
        from ditpipe.pipeline.validation import HeldOut, open_held_out

        if not (self.cfg.validation.shards or self.cfg.data.val_fraction > 0):
            return None
        manifest, _, store, _ = open_data(self.cfg, self.acc.device)  # the run's shards, as training opened them
        spec = open_held_out(self.cfg, manifest, store)
        norm = LatentNorm.from_manifest(manifest, self.cfg.data.latent_norm)
        return HeldOut(spec.store, spec.evaluate, norm, self.cfg.data.seed, 0, 1)

    def __call__(self, state: dict) -> dict:
        from ditpipe.pipeline.diffusion import make_objective
        from ditpipe.pipeline.validation import eval_model, held_out_losses

        model = eval_model(self.cfg, self.manifest, self.num_classes, state, self.acc.device, self.cache)
        objective = make_objective(self.cfg.diffusion.objective, model.learn_sigma, self.cfg.diffusion)
        scores = {}
        if self.held is not None:
            scores["held_out_loss"] = held_out_losses(self.acc, self.cfg, self.manifest, self.held, {"x": state},
                                                      objective, self.num_classes, self.cache)["loss_x"]
        if self.shapes:
            scores["accuracy"] = self._accuracy(model, objective)
        return scores

    @torch.no_grad()
    def _accuracy(self, model, objective) -> float:
        """The share of `num` samples (classes cycled, the run's validation sampler) that `classify_shape` judges
        to show their class; the same seed for every candidate, so they are compared on the same noise."""
        from ditpipe.pipeline.codec import load_codec
        from ditpipe.pipeline.generate import decode, generate
        from ditpipe.pipeline.images import to_uint8
        from ditpipe.pipeline.latent_norm import LatentNorm
        from ditpipe.pipeline.sources import classify_shape

        v, device = self.cfg.validation, self.acc.device
        codec = load_codec(self.manifest.codec["name"], self.manifest.codec["dtype"], device)
        norm = LatentNorm.from_record(self.manifest.latent_norm)
        labels = np.arange(self.num) % self.num_classes
        images = []
        for b, start in enumerate(range(0, self.num, 64)):
            y = torch.from_numpy(labels[start:start + 64])
            z = generate(model, objective, tuple(self.manifest.latent["shape"][1:]), y, len(y), v.sampler,
                         v.sampling_steps, v.cfg_scale, self.cfg.training.seed + b, device,
                         cfg_interval=tuple(v.cfg_interval), bf16=v.bf16)
            images.append(to_uint8(decode(z, codec, norm)))
        return float(np.mean([classify_shape(img) == y for img, y in zip(np.concatenate(images), labels)]))


def _references(ckpt: Path | None, scorer: _Scorer, console: Console) -> list[dict]:
    """The run's classic EMA and raw weights at the same step, scored the same way (when that checkpoint exists)."""
    if ckpt is None:
        console.print("(no checkpoint at that step: the classic EMA and raw weights are not scored beside it)")
        return []
    rows = []
    for name, label in ((checkpoint.EMA, f"classic EMA ({scorer.cfg.training.ema_decay:g})"),
                        (checkpoint.MODEL, "raw")):
        if (ckpt / name).is_file():
            rows.append({"sigma_rel": None, "label": label, **scorer(checkpoint.load_tensors(ckpt / name))})
    return rows


def _table(console: Console, rows: list[dict], at: int, scorer: _Scorer | None) -> None:
    t = Table(title=f"post-hoc EMA at step {at:,}", title_justify="left")
    for col in ("σ_rel", "snapshots", "condition", "profile fit error"):
        t.add_column(col, justify="right")
    keys = [k for k in ("held_out_loss", "accuracy") if any(k in r for r in rows)]
    for k in keys:
        t.add_column({"held_out_loss": "held-out loss", "accuracy": "class accuracy"}[k], justify="right")
    for r in rows:
        fit = ([f"{r['sigma_rel']:g}", str(r["snapshots"]), f"{r['condition']:.1e}", f"{r['profile_error']:.2%}"]
               if r["sigma_rel"] is not None else [r["label"], "", "", ""])
        t.add_row(*fit, *(f"{r[k]:.4f}" if k == "held_out_loss" else f"{r[k]:.1%}" for k in keys))
    console.print(t)
    if scorer is None:
        return
    key = keys[0]  # the held-out loss when there is one, else the accuracy
    candidates = [r for r in rows if r["sigma_rel"] is not None]
    best = min(candidates, key=lambda r: r[key]) if key == "held_out_loss" else max(candidates, key=lambda r: r[key])
    score = f"held-out loss {best[key]:.4f}" if key == "held_out_loss" else f"class accuracy {best[key]:.1%}"
    console.print(f"best: σ_rel {best['sigma_rel']:g} ({score}); write it with `ditpipe ema RUN --sigma-rel "
                  f"{best['sigma_rel']:g} --step {at} --out DIR`", highlight=False, soft_wrap=True)
