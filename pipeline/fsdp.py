"""training.parallel: fsdp — PyTorch's FSDP2 (`fully_shard`) for models one GPU cannot hold.

What changes against DDP, and only here (pipeline/step.py gains a branch, pipeline/checkpoint.py a writer and a
reader):
- `shard`: every DiT block is its own FSDP unit, then the DiT (its embedders, final layer and pos_embed) is the
  root; REPA's projector is a root of its own (the DiT must stay a whole FSDP model: the preflight runs it alone). Parameters, gradients and AdamW's moments are DTensors sharded on dim 0 over the
  processes; one unit's full parameters exist only while it runs. Mixed precision is FSDP's: bf16 parameters for
  the compute and fp32 gradient reduction (fp16 is refused: GradScaler's unscale of DTensor gradients is not
  wired here); the root's inputs are not cast (the timesteps stay fp32: 999 is 1000 in bf16), and its forward runs
  under the Accelerator's autocast as a DDP model's does.
- Gradient accumulation reduce-scatters every micro-batch: gradients then stay sharded (fp32) between micro-batches.
  Syncing only on the last would hold the whole model's unsharded fp32 gradients on every GPU, the memory FSDP is
  there to save; the sum is the same, rounded in another order.
- `clip_grad_norm_`: the global norm over the DTensor gradients (one all-reduce), then the clipping; the result is
  a plain () tensor on the device, so the step's found_inf / EMA decisions stay on the device.
- The EMAs' shadows are DTensors made from the sharded parameters (pipeline/ema.py updates their local shards).
- Checkpoints: every rank writes its own shards through torch.distributed.checkpoint's HuggingFace storage
  (safetensors files with the DCP offsets in their JSON headers: no pickle anywhere), and loads them back resharded
  for any number of processes. `consolidate` reads them back as one full state dict without a process group
  (`ditpipe export`, `sample`: checkpoint.open_weights).

One process runs fsdp too (a one-rank mesh: a process group of one is made when torchrun made none), so a run
resumes on 1 process and an fsdp checkpoint written by 2.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ditpipe.pipeline.errors import ConfigError

# The files a rank writes: torch's HF writer names them `shard-<rank+1>-model-00001-of-00001.safetensors`.
SHARD_FILE = re.compile(r"^shard-(\d{5})-model-\d{5}-of-\d{5}\.safetensors$")
# Prefixes of the one flat state dict a checkpoint holds (every value a tensor: safetensors holds nothing else).
MODEL, EMA, PHEMA, PROJECTOR, OPTIMIZER = "model.", "ema.", "phema.", "projector.", "optimizer."


def shard_file(rank: int) -> str:
    return f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"


def check(precision: str, offload: bool, device: torch.device) -> None:
    """One-line refusals of what fsdp does not do here."""
    if precision == "fp16":
        raise ConfigError([("training.mixed_precision", "fp16 is not supported with training.parallel fsdp (its loss "
                                                        "scaler does not unscale sharded gradients here); use bf16")])
    if offload and device.type != "cuda":
        raise ConfigError([("training.fsdp_cpu_offload", f"needs a CUDA device; this run's is {device.type}, where "
                                                         "the parameters are in CPU memory already")])


def _mesh(acc):
    """A 1-D mesh over every process; with one process and no process group, a group of one is made first."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():  # one process, not under torchrun: a group of one, in memory
        backend = "nccl" if acc.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(acc.device.type, (dist.get_world_size(),))


def shard(acc, model: torch.nn.Module, trained: torch.nn.Module, precision: str, offload: bool) -> None:
    """`fully_shard` the DiT `model` per block, then as a whole, and REPA's projector (when `trained` is the Aligned
    pair), in place; `trained`'s forward runs under autocast in mixed precision. `precision`: what the run uses
    ("no" or "bf16")."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    check(precision, offload, acc.device)
    mesh = _mesh(acc)
    param_dtype = torch.bfloat16 if precision == "bf16" else None  # None: the fp32 parameters themselves
    inner = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    outer = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    kw = {"mesh": mesh, "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    for block in model.blocks:
        fully_shard(block, mp_policy=inner, **kw)
    if trained is not model:  # REPA: the projector is a root of its own beside the DiT, so the DiT alone stays a
        fully_shard(trained.projector, mp_policy=inner, **kw)  # whole FSDP model (the preflight times it alone)
    fully_shard(model, mp_policy=outer, **kw)
    if acc.native_amp:  # as accelerate's prepare does for DDP: the forward under autocast, its outputs in fp32
        from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

        autocast = get_mixed_precision_context_manager(acc.native_amp, acc.autocast_handler)
        trained.forward = convert_outputs_to_fp32(autocast(trained.forward))


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: in-place ops on it change the DTensor); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The gradients' global L2 norm before clipping (a plain () tensor on the device, the same on every rank), and
    the gradients scaled to `max_norm` when it is exceeded: one all-reduce of the local norms, no host read."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    grads = [p.grad for p in params if p.grad is not None]
    norm = get_total_norm(grads, 2.0)  # a DTensor over sharded gradients
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # () the all-reduced norm
    if max_norm != math.inf:
        clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return norm


# ---------------------------------------------------------------------------------------------------- checkpoints


def _optimizer_names(step) -> dict[int, str]:
    """{id(parameter): its name in the checkpoint}: the DiT's under model., the projector's under projector."""
    names = {id(p): MODEL + n for n, p in step.raw.named_parameters()}
    if step.projector is not None:
        names.update({id(p): PROJECTOR + n for n, p in step.projector.named_parameters()})
    return names


def _init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """AdamW's state for every parameter that has none yet (a fresh optimizer, about to be loaded): what its first
    step would make, so a load has tensors of the right sharding to read into."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.requires_grad and not opt.state.get(p):  # a frozen one (pos_embed) never gets state
                step = torch.zeros((), dtype=torch.float32, device=local(p).device if group.get("fused") else "cpu")
                opt.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def state_dict(step, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The one flat {name: tensor} a checkpoint holds (DTensors sharded as in training; the optimizer's step counts
    plain tensors, the same on every rank). AdamW's param_groups are the config's and the LR is set every step, so
    they are not saved."""
    out = {MODEL + k: v for k, v in step.raw.state_dict().items()}
    if step.projector is not None:
        out.update({PROJECTOR + k: v for k, v in step.projector.state_dict().items()})
    if step.ema is not None:
        out.update({EMA + k: v for k, v in step.ema.shadow.items()})
    if step.phema is not None:
        for i, ema in enumerate(step.phema.emas):
            out.update({f"{PHEMA}{i}.{k}": v for k, v in ema.shadow.items()})
    names = _optimizer_names(step)
    _init_optimizer_state(opt)
    for p in (p for group in opt.param_groups for p in group["params"] if p in opt.state):  # parameter order
        out.update({f"{OPTIMIZER}{names[id(p)]}.{k}": v for k, v in opt.state[p].items()
                    if isinstance(v, torch.Tensor)})
    return out


def save(step, folder: Path) -> None:
    """Every rank's shards of `step` (a pipeline.step.Step) into `folder` (a collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    import torch.distributed as dist

    from ditpipe.pipeline.phema import sort_metadata

    dcp.save(state_dict(step, step.opt.optimizer), storage_writer=HuggingFaceStorageWriter(
        str(folder), save_distributed=True))
    sort_metadata(Path(folder) / shard_file(dist.get_rank()))  # safetensors orders its metadata by hash: sorted,
    # the same state gives the same bytes (a bitwise resume is checked by the files' sha256)


def load(ckpt: Path, step) -> None:
    """A checkpoint's shards into `step`'s sharded model, EMAs, projector and optimizer, resharded for this run's
    number of processes (a collective). `step` needs raw, projector, ema, phema (pipeline.step.Step's fields) and
    an `opt` (the bare optimizer)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    flags = {k: step.opt.defaults[k] for k in ("fused",) if k in step.opt.defaults}
    wanted = state_dict(step, step.opt)
    dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(ckpt)))
    for p, state in step.opt.state.items():  # the step counts of a fused AdamW live on the parameters' device
        if flags.get("fused"):
            state["step"] = state["step"].to(local(p).device, torch.float32)


def shard_files(files: dict | list) -> list[str]:
    """The shard files among a checkpoint's recorded file names."""
    return sorted(f for f in files if SHARD_FILE.match(f))


def consolidate(ckpt: Path, files: list[str], prefix: str) -> dict[str, torch.Tensor]:
    """{name: full tensor} of every entry under `prefix` (MODEL, EMA, ...) of the shard files `files` in the
    checkpoint folder `ckpt`, on the CPU, without a process group: each shard's tensors are placed at the offsets
    its header records (DCP's sharding info). Nothing is unpickled (safetensors, JSON)."""
    from safetensors import safe_open
    from torch.distributed.checkpoint._hf_utils import CUSTOM_METADATA_KEY, SAVED_OFFSETS_KEY

    pieces: dict[str, list] = {}
    for name in files:
        with safe_open(str(Path(ckpt) / name), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get(CUSTOM_METADATA_KEY, "{}"))
            for key in [k for k in info if k in f.keys()] or f.keys():  # the saved state dict's order (official)
                if key.startswith(prefix):
                    t = f.get_tensor(key)
                    offsets = (info.get(key) or {}).get(SAVED_OFFSETS_KEY, [0] * t.dim())
                    pieces.setdefault(key[len(prefix):], []).append((offsets, t))
    full = {}
    for key, parts in pieces.items():
        size = [max(o[d] + t.shape[d] for o, t in parts) for d in range(parts[0][1].dim())]
        out = torch.empty(size, dtype=parts[0][1].dtype)  # (full shape)
        if sum(t.numel() for _, t in parts) != out.numel():  # DCP writes each element once: anything else is a hole
            raise ValueError(f"the shards of '{ckpt}' do not cover {prefix}{key} {tuple(size)} exactly")
        for offsets, t in parts:
            out[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
        full[key] = out
    return full


def refuse_unbuilt(cfg) -> None:
    """What fsdp does not run yet, refused before anything is built: validation grids, the held-out loss and
    training FID read the whole model on one rank (an fsdp model's state dict is sharded); a run folder in object
    storage gathers every rank's files on rank 0 before rank 0 writes (pipeline/run_store.py), where the shards'
    save is a collective every rank must join at the same point."""
    from ditpipe.pipeline.run_store import is_remote

    if is_remote(cfg.logging.output_dir):
        raise ConfigError([("logging.output_dir", f"{cfg.logging.output_dir} is in object storage, where fsdp "
                                                  "checkpoints are not built yet; write the run to a folder every "
                                                  "node sees (and copy it to the bucket after)")])
    v = cfg.validation
    for key, value in (("validation.every_steps", v.every_steps), ("validation.fid_every_steps", v.fid_every_steps)):
        if value:
            raise ConfigError([(key, "is not built for training.parallel fsdp yet (it reads the whole model on one "
                                     "process); set it to 0 and evaluate checkpoints with `ditpipe sample` / "
                                     "`ditpipe evaluate`")])
