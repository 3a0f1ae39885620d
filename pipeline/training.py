"""What a training run is made of, derived from the config and the shard manifest: the shards (checked against the
config), the model, its conditioning, and what turns a loader batch into the step's inputs. Shared by `ditpipe
train` and `ditpipe bench train`, and by `sample` / `export` to rebuild a run's model.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import torch

from ditpipe.pipeline import cache, shards
from ditpipe.pipeline.config import TARGET_ALIASES, TARGET_INCEPTION, Config
from ditpipe.pipeline.errors import ConfigError, ShardError
from ditpipe.pipeline.order import BucketOrder, EpochOrder, Plan
from ditpipe.pipeline.remote import is_url
from ditpipe.pipeline.store import open_shards
from ditpipe.pipeline.manifest import Manifest, load_manifest, manifest_header
from ditpipe.pipeline.model import build_dit


def encode_command(cfg: Config) -> str:
    """The `ditpipe encode` command that makes the shards `cfg` trains on, shell-quoted."""
    d = cfg.data
    parts = ["ditpipe", "encode", "--dataset", d.dataset_name]
    if d.dataset_name != "shapes":
        parts += ["--data-path", d.dataset_path]
    if d.dataset_name == "coco":
        parts += ["--split", d.split]
    parts += ["--image-size", str(d.image_size), "--num-samples", str(d.num_samples or "null"), "--vae",
              cfg.vae.name, "--format", cfg.shards.format, "--out", str(cfg.shards_path)]
    return shlex.join(parts)


def check_run(cfg: Config, manifest: Manifest, folder: Path) -> None:
    """Every refusal of a config these shards cannot train, before anything is built: the shards against the
    config (`check_manifest`), then the combinations not built yet (each raised as its own ConfigError)."""
    check_manifest(cfg, manifest, folder)
    if (problem := model_problem(cfg, manifest)) is not None:
        raise ConfigError([problem])
    caption = conditioning_for(cfg, manifest) == "caption"
    if caption and (cfg.validation.shards or cfg.data.val_fraction > 0):  # HeldOut reads labels, not caption records
        raise ConfigError([("validation.shards" if cfg.validation.shards else "data.val_fraction",
                            "the held-out loss is not built for caption models yet; drop the key for this run")])
    if caption and cfg.validation.fid_every_steps:
        raise ConfigError([("validation.fid_every_steps", "caption models are not scored during training; set "
                            "it to 0 and score checkpoints with `ditpipe evaluate --prompts`")])
    if cfg.training.repa.weight > 0:
        repa_problems(cfg, manifest, caption)


def repa_problems(cfg: Config, manifest: Manifest, caption: bool) -> None:
    """REPA (training.repa.weight > 0) needs targets in the shards, on the DiT's token grid (pipeline/targets.py)."""
    t = manifest.targets
    if cfg.data.source == "images":
        raise ConfigError([("training.repa.weight", "REPA reads its targets from the shards, and the online baseline "
                            "(data.source: images) has none; train on shards encoded with --targets")])
    if t is None:
        raise ConfigError([("training.repa.weight", "REPA aligns with representation targets stored in the shards, "
                            "and these hold none; encode them once with `ditpipe encode ... --targets dinov2` (or a "
                            "folder), or set training.repa.weight 0")])
    if caption:
        raise ConfigError([("training.repa.weight", "REPA is built for class and unconditional DiTs; a caption "
                            "model does not align yet; set training.repa.weight 0")])
    if t["model_patch"] != cfg.model.patch:
        raise ConfigError([("model.patch_size", f"the targets were encoded on the token grid of patch "
                            f"{t['model_patch']} (one target a DiT token, as REPA), and this model has patch "
                            f"{cfg.model.patch}; use --model.patch_size {t['model_patch']}, or encode targets for "
                            "this patch")])


def check_manifest(cfg: Config, manifest: Manifest | dict, folder: Path) -> None:
    """Refuse shards that are not what the config asks for, naming both values."""
    manifest = Manifest.of(manifest)
    src, codec = manifest.source, manifest.codec
    problems = []
    if src.get("dataset") != cfg.data.dataset_name:
        problems.append(("data.dataset_name", f"config says {cfg.data.dataset_name!r}, shards hold {src.get('dataset')!r}"))
    if src.get("image_size") != cfg.data.image_size:
        problems.append(("data.image_size", f"config says {cfg.data.image_size}, shards hold {src.get('image_size')}"))
    want = cfg.vae.name if cfg.vae.name == "pixel" else str(Path(cfg.vae.name).resolve()) \
        if Path(cfg.vae.name).exists() else cfg.vae.name
    if codec["name"] != want:
        problems.append(("vae.name", f"config says {cfg.vae.name!r}, shards were encoded with {codec['name']!r}"))
    if cfg.model.conditioning == "class" and not manifest.labels:
        problems.append(("model.conditioning", "config says 'class', but the shards carry no labels"))
    enc = manifest.text_encoder
    if cfg.data.captions and enc and enc["name"] != _encoder_name(cfg.text.encoder):
        problems.append(("text.encoder", f"config says {cfg.text.encoder!r}, shards were encoded with {enc['name']!r}"))
    if cfg.model.conditioning == "caption" and not enc:
        problems.append(("model.conditioning", "config says 'caption', but the shards carry no caption embeddings; "
                                               "encode with `ditpipe encode ... --captions`"))
    problems += _bucket_problems(cfg, manifest)
    problems += _target_problems(cfg, manifest)
    if problems:
        raise ConfigError(problems, header=f"the shards in '{folder}' do not match the config")


def _target_problems(cfg: Config, manifest: Manifest) -> list[tuple[str, str]]:
    """The config's targets.* (when it names an encoder) against the targets the shards hold."""
    want, have = cfg.targets, manifest.targets
    if not want.encoder:
        return []
    if have is None:
        return [("targets.encoder", f"config says {want.encoder!r}, but the shards hold no targets; encode with "
                                    f"`ditpipe encode ... --targets {want.encoder}`")]
    name = want.encoder if want.encoder in TARGET_ALIASES or want.encoder == TARGET_INCEPTION or not \
        Path(want.encoder).exists() else str(Path(want.encoder).resolve())
    problems = []
    for key, ours, theirs in (("targets.encoder", name, have["encoder"]["name"]),
                              ("targets.class_token", want.class_token, have["class_token"]),
                              ("targets.dtype", want.dtype, have["dtype"])):
        if ours != theirs:
            problems.append((key, f"config says {ours!r}, the shards' targets have {theirs!r}"))
    return problems


def _bucket_problems(cfg: Config, manifest: Manifest) -> list[tuple[str, str]]:
    """The config's data.buckets against the shards' (auto is recorded as the list it made), and every bucket's
    latent a whole number of the model's patches."""
    have = manifest.source.get("buckets")
    want = cfg.data.buckets
    if (want == "square") != (have is None) or (isinstance(want, list) and [list(b) for b in want] != have):
        return [("data.buckets", f"config says {want!r}, shards hold {'square crops' if have is None else have}; "
                                 "encode with the same data.buckets")]
    if have is None:
        return []
    problems = []
    step = manifest.codec["downsample"] * cfg.model.patch
    bad = [f"{w}x{h}" for w, h in manifest.sizes if w % step or h % step]
    if bad:
        problems.append(("model.patch_size", f"patch {cfg.model.patch} does not tile the latents of bucket(s) "
                                             f"{', '.join(bad)} (sides must be multiples of {step}); encode with "
                                             "this model's patch, or pick a patch that divides them"))
    if cfg.data.val_fraction or cfg.validation.shards:
        problems.append(("data.val_fraction" if cfg.data.val_fraction else "validation.shards",
                         "the held-out loss is not built for aspect-ratio buckets yet; drop the key for this run"))
    return problems


def epoch_order(cfg: Config, manifest: Manifest | dict, counts: list[int], exclude, global_batch: int):
    """The run's data order (a pure function of training.seed, the epoch and the position): EpochOrder over the
    shards, or with aspect-ratio buckets a BucketOrder, whose global batches are one bucket each."""
    t, manifest = cfg.training, Manifest.of(manifest)
    if manifest.bucketed:
        return BucketOrder(counts, [s["bucket"] for s in manifest.entries], len(manifest.buckets), t.seed,
                           cfg.data.shuffle_window, global_batch, exclude)
    return EpochOrder(counts, t.seed, cfg.data.shuffle_window, exclude=exclude)


def make_plan(cfg: Config, manifest: Manifest | dict, num_excluded: int, world: int) -> Plan:
    """The run's Plan. An epoch has floor(N / G) global batches G; with buckets, every bucket's floor(n_b / G)."""
    t, manifest = cfg.training, Manifest.of(manifest)
    n = manifest.num_samples - num_excluded
    if manifest.bucketed:
        g = t.batch_size * t.gradient_accumulation_steps * world
        n = epoch_order(cfg, manifest, [s["samples"] for s in manifest.entries], None, g).usable
        if n == 0:
            counts = ", ".join(f"{b['size'][0]}x{b['size'][1]}: {b['samples']}" for b in manifest.buckets)
            raise ConfigError([("training.batch_size", f"no bucket holds a whole global batch of {g} (batch × "
                                                       f"accumulation × {world} processes); samples per bucket: "
                                                       f"{counts}. A global batch comes from one bucket")])
    return Plan(n, t.batch_size, t.gradient_accumulation_steps, world)


def _encoder_name(spec: str) -> str:
    """text.encoder as the manifest records it: an alias as is, a local folder resolved."""
    from ditpipe.pipeline.text import ALIASES

    return spec if spec == "minilm" or spec in ALIASES or not Path(spec).exists() else str(Path(spec).resolve())


def shard_folders(cfg: Config) -> list[Path]:
    """The local shard folders a run reads (its shards, the held-out ones), which it holds a shared lock on
    (pipeline/lock.py) from start to end, so that `encode` cannot rewrite them under it. A URL cannot be locked."""
    folders = [] if cfg.data.source == "images" or is_url(cfg.shards.path or "") else [cfg.shards_path]
    held_out = cfg.validation.shards
    if held_out and not is_url(str(held_out)) and Path(held_out).resolve() not in [f.resolve() for f in folders]:
        folders.append(Path(held_out))
    return folders


def open_data(cfg: Config, device: torch.device):
    """(manifest, shard folder, store, (source, codec) or None): shards for a normal run; for the online-VAE baseline
    (`data.source: images`) the source and the codec, on the run's `device` (the Accelerator's), with the manifest
    encode would have written (minus the shards)."""
    folder = cfg.shards.path if is_url(cfg.shards.path or "") else cfg.shards_path  # a URL stays a string
    cache.configure(cfg.storage)  # storage.*: objstore's endpoint and retries, the shard cache (pipeline/cache.py)
    if cfg.data.source == "images":
        if cfg.data.buckets != "square":
            raise ConfigError([("data.buckets", "the online baseline (data.source: images) takes square crops only; "
                                                "encode shards with these buckets and train on those")])
        if cfg.model.conditioning == "caption":
            raise ConfigError([("model.conditioning", "the online baseline (data.source: images) embeds no captions; "
                                                      "encode shards with --captions and train on those")])
        from ditpipe.pipeline.codec import load_codec, tune_for_device
        from ditpipe.pipeline.sources import make_source

        source = make_source(cfg.data)
        codec = load_codec(cfg.vae.name, cfg.vae.dtype, device, use_slicing=cfg.vae.use_slicing)
        # tuned as encode tunes it, so the baseline is a fair one; cuDNN's timing is a choice deterministic forbids
        tune_for_device(codec, cfg.vae.cudnn_benchmark and not cfg.training.deterministic)
        header = manifest_header(source, codec, cfg.shards.samples_per_shard, codec.slices("mean_std", False),
                                 flip_at_load=cfg.shards.flip)
        return Manifest({**header, "num_samples": len(source)}), Path(f"{cfg.data.dataset_name} images (online {cfg.vae.name})"), None, (source, codec)
    if not is_url(folder) and not (folder / shards.MANIFEST).is_file():
        raise missing_shards(cfg, folder)
    store, manifest = open_shards(folder)
    check_run(cfg, manifest, folder)
    return manifest, folder, store, None


def missing_shards(cfg: Config, folder: Path) -> ShardError:
    """No shards where `cfg` looks: the error names the folders beside it that hold shards of the same dataset (a
    `-5000` beside an `-all`, another image size or codec, a custom folder's shards under the older name without the
    folder's), each with the overrides that train on it, then the encode command that makes the missing ones."""
    near = [f"'{where}' (add {shlex.join(args)})" for where, args in nearby_shards(cfg, folder)]
    found = f"; other {cfg.data.dataset_name} shards are at {', '.join(near)}" if near else ""
    return ShardError(f"no shards at '{folder}'{found}. Or make these first with:\n  {encode_command(cfg)}")


MAX_SIBLINGS = 256  # folders looked at beside a missing shard folder (a pointer, not a search)


def nearby_shards(cfg: Config, folder: Path, limit: int = 3) -> list[tuple[Path, list[str]]]:
    """(folder, the override arguments that select it) for at most `limit` sibling folders of `folder` that hold a
    manifest of the same dataset, fewest overrides first. Read-only: links are not followed, and a folder whose
    manifest is damaged, or whose shards no override can select, is passed over in silence."""
    import itertools

    try:
        siblings = sorted(itertools.islice(folder.parent.iterdir(), MAX_SIBLINGS))
    except OSError:
        return []
    found = []
    for sibling in siblings:
        try:
            args = _selecting(cfg, sibling) if sibling != folder else None
        except Exception:  # noqa: BLE001 — a damaged neighbour only means no pointer to it
            args = None
        if args is not None:
            found.append((sibling, args))
    return sorted(found, key=lambda f: len(f[1]))[:limit]


def _selecting(cfg: Config, sibling: Path) -> list[str] | None:
    """The overrides that make `cfg` train on the shards in `sibling` (keys that rename the default folder, or
    `--shards.path` and the keys `check_manifest` compares), or None when it holds none of this dataset's."""
    import os
    import stat

    from ditpipe.pipeline.config import override_args, validate_tree

    if sibling.is_symlink() or not sibling.is_dir() or not stat.S_ISREG(os.lstat(sibling / shards.MANIFEST).st_mode):
        return None  # never through a link
    manifest = load_manifest(sibling)  # the checked reader: a damaged one raises, and is passed over
    src, d = manifest.source, cfg.data
    if src.get("dataset") != d.dataset_name:
        return None
    have = {"data.image_size": src.get("image_size"), "vae.name": manifest.codec["name"]}
    if d.dataset_name != "shapes" and src.get("path") != str(Path(d.dataset_path).resolve()):
        have["data.dataset_path"] = src.get("path")
    if d.dataset_name == "coco":
        have["data.split"] = src.get("split")
    have |= {"data.num_samples": src.get("num_samples"), "data.seed": src.get("seed")}
    enc = manifest.text_encoder
    have["data.captions"] = bool(enc)
    if enc:
        have["text.encoder"] = enc["name"]
    tree, keys = cfg.to_dict(), {}
    for key, value in have.items():
        section, name = key.split(".")
        if value is None and key != "data.num_samples":
            continue  # not recorded (an older manifest): nothing to say about it
        same = value == tree[section][name] or (key == "vae.name" and value == str(Path(cfg.vae.name).resolve())) \
            or (key == "text.encoder" and value == _encoder_name(cfg.text.encoder))
        if not same:
            keys[key] = tree[section][name] = value
    buckets = src.get("buckets")  # auto is recorded as the list it made: either names the shards' crops
    if bool(buckets) != (d.buckets != "square") or (isinstance(d.buckets, list) and
                                                   buckets != [list(b) for b in d.buckets]):
        keys["data.buckets"] = tree["data"]["buckets"] = buckets or "square"
    if (named := validate_tree(tree)).shards_path == sibling:
        chosen = keys
    else:
        if buckets and keys.get("data.buckets") == buckets and \
                validate_tree({**tree, "data": {**tree["data"], "buckets": "auto"}}).shards_path == sibling:
            return override_args({**keys, "data.buckets": "auto"})
        checked = ("data.image_size", "vae.name", "data.captions", "text.encoder", "data.buckets")
        chosen = {"shards.path": str(sibling), **{k: v for k, v in keys.items() if k in checked}}
        named = validate_tree({**tree, "shards": {**tree["shards"], "path": str(sibling)}})
    check_manifest(named, manifest, sibling)  # train would accept them: else no pointer
    return override_args(chosen)


def precomputed_latents(device: torch.device):
    """batch → (mean, std or None) on `device`, fp16 as stored (the step draws ε and normalises there)."""

    def posterior(batch: dict):
        std = batch.get("std")
        return (batch["mean"].to(device, non_blocking=True),  # (B, C, H, W)
                None if std is None else std.to(device, non_blocking=True))

    return posterior


def online_latents(codec):
    """The baseline's per-step encode: batch → the codec's (mean, std or None), float32 on its device (the run's)."""
    return lambda batch: codec.encode(batch["pixels"])  # (B, C, h, w) each


def conditioning_for(cfg: Config, manifest: Manifest | dict) -> str:
    """model.conditioning with `auto` resolved from the manifest: caption embeddings → caption (encoding them is
    opt-in, so they win over labels the source also has, as shapes' do), else labels → class, else none."""
    if cfg.model.conditioning != "auto":
        return cfg.model.conditioning
    manifest = Manifest.of(manifest)
    if manifest.text_encoder:
        return "caption"
    return "class" if manifest.labels else "none"


def num_classes_for(cfg: Config, manifest: Manifest | dict) -> int:
    if conditioning_for(cfg, manifest) != "class":
        return 0
    return int(Manifest.of(manifest).labels["num_classes"])


def model_problem(cfg: Config, manifest: Manifest | dict) -> tuple[str, str] | None:
    """A caption model (model.name) for shards or a conditioning that is not captions, or None."""
    from ditpipe.pipeline.model_text import CAPTION_PRESETS

    m = cfg.model
    if conditioning_for(cfg, manifest) != "caption" and m.name in CAPTION_PRESETS:
        return ("model.name", f"{m.name} is a caption model; it needs shards with caption embeddings "
                              f"(encode --captions) and model.conditioning caption or auto, or use "
                              f"{m.name.replace('DiT-T-', 'DiT-')} for a class model")
    return None


def build_model(cfg: Config, manifest: Manifest | dict, num_classes: int) -> torch.nn.Module:
    """The official-layout DiT for class / unconditional runs, the caption DiT (model_text.py) for caption runs. It
    takes latents of any size its patches tile (every bucket's, and `sample --size`); its pos_embed parameter stays
    the square grid's of data.image_size, so checkpoints keep the official layout. `bucket_grids` lists every
    bucket's patch grid (none for square shards): build_step makes their position embeddings before it compiles."""
    from ditpipe.pipeline.model_text import build_caption_dit

    manifest = Manifest.of(manifest)
    _, channels, size, _ = manifest.latent_shape()
    m = cfg.model
    caption = conditioning_for(cfg, manifest) == "caption"
    if (problem := model_problem(cfg, manifest)) is not None:  # check_run raised it for a run; sample and export too
        raise ConfigError([problem])
    arch = dict(input_size=size, in_channels=channels, learn_sigma=m.learn_sigma and cfg.diffusion.objective == "ddpm",
                qk_norm=m.qk_norm, gradient_checkpointing=m.gradient_checkpointing, hidden_size=m.hidden_size,
                depth=m.depth, num_heads=m.num_heads, patch_size=m.patch_size)
    try:
        if caption:
            model = build_caption_dit(m.name, text_dim=manifest.text_encoder["dim"],
                                      caption_dropout_prob=m.class_dropout_prob, **arch)
        else:
            model = build_dit(m.name, num_classes=num_classes,
                              class_dropout_prob=m.class_dropout_prob if num_classes else 0.0, **arch)
    except ValueError as e:
        raise ConfigError([("model", str(e))]) from None
    model.any_grid = True
    p, sizes = model.patch_size, [b["latent_shape"] for b in manifest.buckets]  # (1, C, H, W) each
    model.bucket_grids = [(h // p, w // p) for *_, h, w in sizes]
    return model


def batch_condition(conditioning: str, device: torch.device):
    """batch → the model's `y`: class labels, a Caption, or None (unconditional). Chosen once per run."""
    from ditpipe.pipeline.text import Caption

    if conditioning == "caption":
        return lambda batch: Caption(batch["caption"]["tokens"], batch["caption"]["mask"],
                                     batch["caption"]["pooled"]).to(device)
    return lambda batch: batch["labels"].to(device, non_blocking=True)  # (B,); unused when unconditional


def training_batches(cfg: Config, manifest: Manifest | dict, store, online, plan, rank: int, conditioning: str, exclude,
                     start_step: int, end_step: int, device: torch.device, num_workers: int):
    """(DataLoader, posterior): this rank's micro-batches from optimizer step `start_step` to `end_step`, read from
    the shards (or, for the online baseline, decoded images), and the function that turns one into the posterior's
    (mean, std or None) on `device`. The order is EpochOrder's: a pure function of (training.seed, epoch,
    position)."""
    from ditpipe.pipeline.loader import ImageBatches, MicroBatches, make_loader

    t, manifest = cfg.training, Manifest.of(manifest)
    spp, total = manifest.samples_per_shard, manifest.num_samples
    counts = store.counts if store is not None else [min(spp, total - i) for i in range(0, total, spp)]
    order = epoch_order(cfg, manifest, counts, exclude, plan.global_batch)
    if store is not None:
        dataset = MicroBatches(store, order, plan, rank, t.seed, captions=conditioning == "caption",
                               targets=t.repa.weight > 0)
        posterior = precomputed_latents(device)
    else:
        source, codec = online
        dataset = ImageBatches(source, order, plan, rank, t.seed, cfg.shards.flip)
        posterior = online_latents(codec)
    loader = make_loader(dataset, plan, start_step, end_step, num_workers, pin_memory=device.type == "cuda")
    return loader, posterior
