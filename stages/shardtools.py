"""`ditpipe inspect` and `ditpipe verify`: read a shard folder's manifest (or a run's or checkpoint's summary,
stages/runs.py), and check every byte of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ditpipe.pipeline import shards
from ditpipe.pipeline.errors import ShardError
from ditpipe.pipeline.manifest import load_manifest


def inspect(folder: Path, as_json: bool, console: Console) -> None:
    from ditpipe.stages import runs

    if runs.is_checkpoint(folder):  # checked first: a checkpoint holds a manifest.json excerpt too
        runs.inspect_checkpoint(folder, console, as_json)
        return
    if runs.is_run(folder):
        runs.inspect_run(folder, console, as_json)
        return
    if not (Path(folder) / shards.MANIFEST).is_file():
        raise ShardError(f"'{folder}' is not a shard folder, a run or a checkpoint (no {shards.MANIFEST}, "
                         f"training_state.json or checkpoint folders)" + ("; it does not exist" if not
                                                                          Path(folder).exists() else "")
                         + ". Make shards with `ditpipe encode`; list runs with `ditpipe runs`")
    m = load_manifest(folder)
    if as_json:
        console.print_json(json.dumps(m.raw))
        return
    src, codec, lat = m.source, m.codec, m.latent
    t = Table(title=f"{folder}", show_header=False, title_justify="left")
    t.add_row("source", ", ".join(f"{k}={v}" for k, v in src.items()))
    t.add_row("codec", f"{codec['name']} ({codec.get('class', codec['kind'])}, {codec['dtype']}, "
                       f"×{codec['downsample']} down, {codec['latent_channels']} channels), "
                       f"scaling {codec['scaling_factor']:g}, shift {codec['shift_factor']:g}, hash {codec['hash'][:12]}")
    t.add_row("latent", f"{lat['dtype']} {tuple(lat['shape'])}: {', '.join(lat['slices'])}"
                        + ("; flipped at load time" if lat.get("flip_at_load") else ""))
    if m.bucketed:  # each shard's latents have its bucket's shape
        t.add_row("buckets", m.describe_buckets())
    labels = m.labels
    t.add_row("labels", "none (unconditional)" if not labels else
              f"{labels['num_classes']} classes: {', '.join(labels['names'][:12])}"
              + (" …" if labels["num_classes"] > 12 else ""))
    captions, enc = m.captions, m.text_encoder
    t.add_row("captions", "none" if not captions else "as text in each sample's json (not embedded)" if not enc else
              f"{captions['num_captions']:,} embedded with {enc['name']} ({enc['source']}, {enc['dim']}-d, ≤ "
              f"{enc['max_tokens']} tokens, longest {captions['max_tokens_seen']}), hash {enc['hash'][:12]}")
    if (tg := m.targets) is not None:  # REPA's representation targets (pipeline/targets.py)
        enc, lay = tg["encoder"], m.target_layout()
        latent_bytes = int(np.prod(m.latent_shape())) * 2
        t.add_row("targets", f"{enc['name']} ({enc['class']}, {enc['layer']}), {lay.tokens} tokens"
                             f"{' (class token first)' if tg['class_token'] else ''} × {enc['dim']}, {tg['dtype']}, "
                             f"{', '.join(tg['slices'])}; {lay.data_bytes:,} bytes a sample (the latent "
                             f"{latent_bytes:,}); grid of patch {tg['model_patch']}, hash {enc['hash'][:12]}")
    t.add_row("samples", f"{m.num_samples:,} of {m.raw['num_inputs']:,} inputs "
                         f"({len(m.raw['skipped']):,} skipped, {len(m.raw['converted']):,} converted)")
    t.add_row("shards", f"{m.num_shards} × {m.format}, {sum(s['bytes'] for s in m.entries):,} bytes, "
                        f"≤ {m.samples_per_shard} samples each")
    if m.stats:
        fmt = lambda xs: "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"  # noqa: E731
        t.add_row("channel mean", fmt(m.stats["channel_mean"]))
        t.add_row("channel std", fmt(m.stats["channel_std"]))
    console.print(t)
    for s in m.raw["skipped"][:5]:
        console.print(f"  skipped {s['file']}: {s['reason']}")


def verify(folder: Path, console: Console) -> None:
    from ditpipe.stages.progress import progress_bar

    manifest = load_manifest(folder)
    with progress_bar(console, "sample") as bar:
        task = bar.add_task(f"verify {folder}", total=manifest.num_samples)
        problems, checked = shards.verify(folder, progress=lambda n: bar.update(task, completed=n))
    if problems:
        for p in problems:
            console.print(f"[red]✗[/] {p}", highlight=False, markup=True)
        raise ShardError(f"{folder}: {len(problems)} problem(s) in {manifest.num_shards} shard(s); re-encode the "
                         "damaged shards by deleting them and rerunning the same `ditpipe encode` command")
    console.print(f"[green]✓[/] {folder}: {manifest.num_shards} shard(s), {checked:,} samples, every sha256 and "
                  "sample checked")
