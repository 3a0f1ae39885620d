"""Fine-tuning (`model.init_from`, `ditpipe train --init-from PATH`): weights from an official DiT checkpoint, one
of our checkpoint or run folders, or an exported safetensors file, loaded into a freshly built model. Not a resume:
the step count, the optimizer, the LR schedule and the EMA start fresh (the EMA from the loaded weights).

Everything loads strictly, except two things a fine-tune is expected to change:
- the label table, when the label space differs (1,000 ImageNet classes against 8 of your own): the class rows start
  from this run's fresh initialisation, and the null-class row (the unconditional embedding that guidance uses) is
  kept, moved to this run's null index. An unconditional run folds the null embedding into the timestep MLP's bias,
  so it starts as the checkpoint's unconditional model;
- the fixed sin-cos position embedding, when the patch grid differs (another image size): this run's is kept.
Any other difference is an error that names every key and both shapes. Files load with torch.load(weights_only=True)
or safetensors: nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditpipe.pipeline import checkpoint
from ditpipe.pipeline.errors import ConfigError, DitpipeError
from ditpipe.pipeline.manifest import Manifest

TABLE = "y_embedder.embedding_table.weight"
POS = "pos_embed"
TIME_BIAS = "t_embedder.mlp.2.bias"  # added to every conditioning vector, as the label embedding is


@dataclass
class InitSource:
    state: dict[str, torch.Tensor]
    description: str
    class_names: list[str] | None = None  # known for our checkpoints and exports
    manifest: dict = field(default_factory=dict)  # codec / labels / latent_norm, when known


def load_init(path: str | Path, weights: str = "ema") -> InitSource:
    """The weights at `path`: an official DiT `.pt` (a state dict, or a training checkpoint's {"ema", "model"}), one
    of our checkpoint folders (or a run folder: its newest valid checkpoint; `weights` picks ema.pt or model.pt),
    or an exported `.safetensors` (or its folder)."""
    path = Path(path)
    if not path.exists():
        raise DitpipeError(f"model.init_from: '{path}' does not exist. Pass an official DiT .pt (e.g. "
                           "DiT-XL-2-256x256.pt), a ditpipe checkpoint or run folder, or an exported .safetensors")
    if path.is_dir() and (path / checkpoint.EXPORT_WEIGHTS).is_file():
        path = path / checkpoint.EXPORT_WEIGHTS  # an export: read as its weights file, whatever its config says
    w = checkpoint.open_weights(path, weights)
    if w.kind == "checkpoint":
        why = "" if w.which == weights or weights != "ema" else f" (it has no {checkpoint.EMA}: use_ema was off)"
        return InitSource(w.state, f"{w.source} ({w.which}.pt, step {w.step}){why}",
                          Manifest.of(w.manifest).class_names, w.manifest)
    if w.kind == "export" or path.suffix == ".safetensors":
        meta = w.meta
        return InitSource(w.state, f"{path} ({meta.get('weights', 'unknown')} weights, step {meta.get('step', '?')})",
                          Manifest.of(w.manifest).class_names, meta.get("manifest") or {})
    return InitSource(w.state, f"{path} ({w.which})")


# ---------------------------------------------------------------------------------------------------- adapting


def adapt(source: InitSource, model: torch.nn.Module, class_names: list[str] | None) -> tuple[dict, list[str]]:
    """The source's state dict made to fit `model` (label table, position embedding; see the module docstring),
    and one note per change. Raises ConfigError naming every other mismatch."""
    target = model.state_dict()
    state, notes = dict(source.state), []
    notes += _label_table(state, target, model, source.class_names, class_names)
    if POS in state and POS in target and state[POS].shape != target[POS].shape:
        grid = lambda t: int(round(t.shape[1] ** 0.5))  # noqa: E731
        state[POS] = target[POS]  # initialize_weights computed the fixed sin-cos embedding for this grid
        notes.append(f"position embedding recomputed for this run's {grid(target[POS])}×{grid(target[POS])} patch "
                     f"grid (the checkpoint's is {grid(source.state[POS])}×{grid(source.state[POS])})")
    _check_strict(state, target, source.description)
    return state, notes


def _label_table(state: dict, target: dict, model, src_names, dst_names) -> list[str]:
    src, dst = state.pop(TABLE, None), target.get(TABLE)
    if src is None and dst is None:
        return []
    src_classes = len(src_names) if src_names else (None if src is None else src.shape[0] - 1)
    src_null = src[-1] if src is not None and src.shape[0] > (src_classes or 0) else None  # (D,), the last row
    if dst is None:  # an unconditional run: c = t_emb + null embedding becomes c = t_emb with the null in the bias
        if src_null is not None and TIME_BIAS in state and src_null.shape == state[TIME_BIAS].shape:
            state[TIME_BIAS] = state[TIME_BIAS] + src_null
            return [f"this run is unconditional: the checkpoint's null-class embedding is folded into {TIME_BIAS}, "
                    "so the model starts as the checkpoint's unconditional model"]
        return ["this run is unconditional: the checkpoint's label table is dropped"]
    same_names = src_names is None or dst_names is None or list(src_names) == list(dst_names)
    if src is not None and src.shape == dst.shape and same_names:
        state[TABLE] = src
        return []
    if src is not None and src.shape[1] != dst.shape[1]:
        state[TABLE] = src  # another width: the strict check reports it with everything else
        return []
    table = dst.clone()  # this run's fresh init (normal, std 0.02, seeded by training.seed), one row per class
    null = model.null_class
    if src is None:
        table.zero_()  # all-zero embeddings: the model starts exactly as the unconditional checkpoint
        state[TABLE] = table
        return [f"label table created for {model.num_classes} classes, all rows zero, so the run starts as the "
                "checkpoint's unconditional model"]
    kept = ""
    if null is not None and src_null is not None:
        table[null] = src_null
        kept = f"; its null-class row (the unconditional embedding guidance uses) is kept, at index {null}"
    state[TABLE] = table
    why = "other class names" if src.shape == dst.shape else \
        f"{src_classes if src_classes is not None else '?'} classes in the checkpoint, {model.num_classes} here"
    return [f"label table re-initialised ({why}): the class rows start fresh{kept}"]


def _check_strict(state: dict, target: dict, description: str) -> None:
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [k for k in target if k in state and state[k].shape != target[k].shape]
    if not (missing or unexpected or shapes):
        return
    problems = [(k, f"checkpoint {tuple(state[k].shape)}, this model {tuple(target[k].shape)}") for k in shapes[:12]]
    problems += [(k, "in this model, not in the checkpoint") for k in missing[:8]]
    problems += [(k, "in the checkpoint, not in this model") for k in unexpected[:8]]
    more = len(shapes) + len(missing) + len(unexpected) - len(problems)
    if more > 0:
        problems.append(("...", f"{more} more"))
    problems.append(("model", f"the checkpoint looks like {describe(state)}; set model.name (or "
                              "model.hidden_size / depth / num_heads / patch_size), model.learn_sigma and "
                              "model.qk_norm to match it"))
    raise ConfigError(problems, header=f"the weights in {description} do not fit the configured model")


def describe(state: dict) -> str:
    """What a DiT state dict is, read off its shapes (for error messages)."""
    proj = state.get("x_embedder.proj.weight")
    if proj is None:
        return "no DiT (it has no x_embedder.proj.weight)"
    hidden, channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    out = state.get("final_layer.linear.weight")
    sigma = out is not None and out.shape[0] == patch * patch * channels * 2
    table = state.get(TABLE)
    classes = f"{table.shape[0] - 1} classes + null" if table is not None else "unconditional"
    return (f"hidden {hidden}, depth {depth}, patch {patch}, {channels} input channels, "
            f"{'learned' if sigma else 'no learned'} sigma, {classes}")


def init_from(model: torch.nn.Module, path: str | Path, weights: str, class_names: list[str] | None,
              manifest: dict) -> list[str]:
    """Load `path` into `model` (see `adapt`); returns the notes to print: where the weights came from, what was
    adapted, and warnings when the checkpoint's latents were another codec's or normalised otherwise."""
    source = load_init(path, weights)
    state, notes = adapt(source, model, class_names)
    model.load_state_dict(state, strict=True)
    notes.insert(0, f"weights from {source.description}; step count and optimizer start fresh")
    manifest, before = Manifest.of(manifest), Manifest.of(source.manifest)
    codec, other = manifest.codec, before.codec
    if other.get("hash") and codec.get("hash") and other["hash"] != codec["hash"]:
        notes.append(f"warning: the checkpoint was trained on latents of codec {other.get('name')!r}, this run uses "
                     f"{codec.get('name')!r}: the model must learn another latent space")
    norm, other_norm = manifest.latent_norm, before.latent_norm
    if norm and other_norm and norm != other_norm:
        notes.append(f"warning: the checkpoint's latents were normalised with {other_norm['kind']!r} constants that "
                     f"differ from this run's {norm['kind']!r} ones; consider the same data.latent_norm")
    return notes
