"""The peak GPU memory of a training step, per GPU, predicted before any step: the preflight's `memory` row.

Persistent state is read off the real objects' sizes: fp32 weights, fp32 gradients, fused AdamW's two fp32 moments
and step, the EMA's and each post-hoc EMA's fp32 shadow of the state dict, and DDP's gradient buckets (none with
`gradient_as_bucket_view`, where the gradients are views into the buckets). Activations are an analytic count of
what autograd saves in a DiT block (`block_saved_bytes`), checked on the CPU against the saved tensors of a real
forward under autocast (tests/test_memory.py: within 15 %). Under autocast the fp32 weights stay and each matmul
weight gets a half copy, cached until the forward ends and saved for backward by the matmul that used it.

REPA (training.repa.weight > 0, pipeline/repa.py) adds its projector (hidden → projector_dim → projector_dim →
the targets' width, fp32: weights, gradients, AdamW's moments, DDP's buckets; no EMA tracks it), its half copies and
saved activations over the micro-batch's image tokens (`projector_saved_bytes`, checked the same way), and the
micro-batch's targets on the device ((B, T, D) fp16, a class token included where stored).

Validation and training FID run between steps (gradients are freed by zero_grad(set_to_none=True) then, activations
too) and bring an fp32 eval copy of the model, the decoder and their forward's transients.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ditpipe.pipeline.manifest import Manifest

GIB = 2 ** 30
FREQ_DIM = 256  # TimestepEmbedder's frequency embedding width
# The SD-VAE's decoder (AutoencoderKL, 128-256-512-512): 49.5 M parameters, and its widest activations are 128
# channels at full resolution, about four of them alive at once in a resnet block.
VAE_DECODER_PARAMS = 49_490_000
VAE_DECODER_LIVE = 4 * 128
HALF = {"fp16": 2, "bf16": 2, "no": 4}  # bytes of the matmul operands under each training.mixed_precision


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU at the peak of a step, and what validation / training FID adds between steps."""

    weights: int
    gradients: int
    optimizer: int  # AdamW's exp_avg and exp_avg_sq (fp32) and the fused kernel's step count per tensor
    ema: int
    posthoc_ema: int
    ddp_buckets: int
    autocast: int  # half copies of the matmul weights alive at the activation peak
    activations: int  # what autograd saves for backward (the part checked against torch on the CPU)
    workspace: int  # backward's transient gradients of one block, and the loss
    evaluation: int  # validation / FID only: the eval model, its half copies, the decoder, their transients
    targets: int = 0  # REPA: the micro-batch's stored targets on the device, (B, T, D) fp16

    @property
    def step(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "evaluation")

    @property
    def validation(self) -> int:
        """Between steps: no gradients, no activations; the evaluation copies instead."""
        return self.step - self.gradients - self.autocast - self.activations - self.workspace + self.evaluation

    @property
    def total(self) -> int:
        return max(self.step, self.validation)

    def describe(self) -> str:
        """`9.8 GiB per GPU at the peak (step 9.8 GiB: activations 6.9 GiB, optimizer 1.0 GiB, …)`: the 4 largest."""
        parts = sorted(((getattr(self, f.name), f.name) for f in fields(self) if f.name != "evaluation"),
                       reverse=True)
        main = ", ".join(f"{name} {size(n)}" for n, name in parts[:4] if n)
        evaluation = f"; validation {size(self.validation)}" if self.evaluation else ""
        return f"{size(self.total)} per GPU at the peak (step {size(self.step)}: {main}{evaluation})"


def size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"

# ---------------------------------------------------------------------------------------------------- activations


def block_saved_bytes(batch: int, tokens: int, hidden: int, heads: int, mlp_ratio: float, half: int,
                      context: int = 0) -> int:
    """Bytes autograd saves in one DiT block (model.py DiTBlock; with `context` caption tokens, model_text.py's
    block with its cross-attention). `half`: bytes of a matmul's operands (2 under fp16/bf16 autocast, 4 in fp32).
    The residual stream x stays fp32 (x + half → fp32), so LayerNorm and modulate save fp32; matmuls save their
    inputs in half; fused SDPA (flash / memory-efficient) saves q, k, v, its output and an fp32 logsumexp, never
    the T×T scores."""
    a = batch * tokens * hidden  # elements of one (N, T, D) tensor
    r = mlp_ratio
    fp32 = 4
    per_token = (
        2 * fp32 * a  # norm1: its input x; modulate's mul: norm1's output
        + half * a  # qkv's input (modulate's output in half)
        + 3 * half * a  # q, k, v (views of qkv's output), saved by SDPA
        + half * a  # SDPA's output = proj's input (its transpose-reshape is a view)
        + half * a  # proj's output, saved by the gate's mul
        + 2 * fp32 * a  # norm2's input and output, as norm1
        + half * a  # fc1's input
        + 2 * r * half * a  # fc1's output (saved by GELU) and GELU's (saved by fc2)
        + half * a  # fc2's output, saved by the gate's mul
    )
    small = (
        2 * 2 * fp32 * batch * tokens  # the LayerNorms' mean and rstd
        + fp32 * batch * heads * tokens  # SDPA's logsumexp
        + half * batch * hidden * (1 + 6 + 2)  # adaLN: SiLU(c) in half, its 6·D output (gates are views), 1+scale ×2
    )
    if context:  # cross-attention after self-attention (ungated: its output is added, not saved)
        per_token += fp32 * a + 3 * half * a  # norm_cross's input; q's input (no modulate here), q, SDPA's output
        small += 2 * half * batch * context * hidden  # k, v of the caption tokens
        small += 2 * fp32 * batch * tokens + fp32 * batch * heads * tokens  # norm_cross's statistics, logsumexp
    return int(per_token + small)


def outside_saved_bytes(batch: int, tokens: int, hidden: int, half: int, patch_in: int, context: int = 0,
                        text_dim: int = 0) -> int:
    """Bytes saved outside the blocks: the patch embedding's and timestep MLP's inputs, the conditioning c (fp32,
    one tensor every block's SiLU saves), the final layer (its LayerNorm, modulate and linear, as in a block), and
    for a caption model its two caption projections (input, hidden, GELU output; the context every block reads).
    `patch_in`: p²·C_in, the values per token the patch embedding reads."""
    a = batch * tokens * hidden
    embed = half * batch * (tokens * patch_in + FREQ_DIM + 2 * hidden) + 4 * batch * hidden + 8 * batch
    final = 2 * 4 * a + half * a + 2 * 4 * batch * tokens + 2 * half * batch * hidden
    captions = half * batch * (context + 1) * (text_dim + 3 * hidden) if context else 0
    return int(embed + final + captions)


def saved_bytes(batch: int, tokens: int, hidden: int, heads: int, depth: int, mlp_ratio: float, half: int,
                patch_in: int, checkpointing: bool, context: int = 0, text_dim: int = 0) -> int:
    """What autograd holds at the end of the forward. With gradient checkpointing (model.py: each block under
    non-reentrant `checkpoint`) a block keeps only its input x (fp32; c is one shared tensor); the backward then
    recomputes one block at a time, which `activation_bytes` adds."""
    block = block_saved_bytes(batch, tokens, hidden, heads, mlp_ratio, half, context)
    held = 4 * batch * tokens * hidden if checkpointing else block
    return depth * held + outside_saved_bytes(batch, tokens, hidden, half, patch_in, context, text_dim)


def activation_bytes(batch: int, tokens: int, hidden: int, heads: int, depth: int, mlp_ratio: float, half: int,
                     patch_in: int, checkpointing: bool, context: int = 0, text_dim: int = 0) -> int:
    """Saved activations at their peak: the end of the forward, plus (checkpointing) the one block recomputed."""
    extra = block_saved_bytes(batch, tokens, hidden, heads, mlp_ratio, half, context) if checkpointing else 0
    return extra + saved_bytes(batch, tokens, hidden, heads, depth, mlp_ratio, half, patch_in, checkpointing,
                               context, text_dim)


def backward_workspace(batch: int, tokens: int, hidden: int, mlp_ratio: float, half: int, patch_out: int) -> int:
    """Transients of the backward of one block: the gradients of the MLP's hidden (two, in half) and of the fp32
    residual stream (two), and the loss's fp32 tensors of the output's size (about four). An estimate, not measured."""
    a = batch * tokens * hidden
    return int(2 * mlp_ratio * half * a + 2 * 4 * a + 4 * 4 * batch * tokens * patch_out)


def forward_workspace(batch: int, tokens: int, hidden: int, mlp_ratio: float, half: int) -> int:
    """The live set of a no-grad forward (sampling, the held-out loss): x and its normalised copy (fp32) and the
    MLP's input, hidden and GELU output (half). An estimate."""
    a = batch * tokens * hidden
    return int(2 * 4 * a + (1 + 2 * mlp_ratio) * half * a)


def projector_params(hidden: int, projector_dim: int, z_dim: int) -> int:
    """Parameters of REPA's projector (repa.build_mlp): three Linear layers with biases."""
    return (hidden + 1) * projector_dim + (projector_dim + 1) * projector_dim + (projector_dim + 1) * z_dim


def projector_saved_bytes(batch: int, tokens: int, hidden: int, projector_dim: int, z_dim: int, half: int) -> int:
    """Bytes autograd saves for REPA's projector and alignment loss (repa.Aligned, repa.alignment_loss) over
    `tokens` image tokens: the block's output cast to half (the first Linear's input), the two hidden layers' outputs
    and their SiLUs' (half; the last Linear's output is only cast to fp32, which saves nothing), the projected tokens
    in fp32 (normalize's input, saved by its norm and division) and the normalised targets (fp32, saved by the
    product), and the per-token norms (fp32, two). Measured exact on the CPU (tests/test_bench_repa.py)."""
    n = batch * tokens
    return int(n * (half * (hidden + 4 * projector_dim) + 2 * 4 * z_dim + 2 * 4))


def projector_workspace(batch: int, tokens: int, projector_dim: int, z_dim: int, half: int) -> int:
    """Transients of the projector's backward: the gradient of the projected tokens (fp32, and its half cast) and of
    one hidden layer (half, two). An estimate, not measured."""
    n = batch * tokens
    return int(n * ((4 + half) * z_dim + 2 * half * projector_dim))


# ---------------------------------------------------------------------------------------------------- the model


def _matmul_params(model: torch.nn.Module, blocks_only: int | None = None) -> int:
    """Elements of the Linear and Conv weights and biases autocast casts (embedding tables it leaves alone);
    `blocks_only`: of one block of `model.blocks` instead."""
    root = model.blocks[blocks_only] if blocks_only is not None else model
    mods = [m for m in root.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return sum(p.numel() for m in mods for p in m.parameters(recurse=False))


def predict(model: torch.nn.Module, *, batch_size: int, tokens: int, precision: str, checkpointing: bool,
            use_ema: bool, posthoc_sigmas: int, world_size: int, bucket_view: bool, context: int = 0,
            eval_batch: int = 0, eval_tokens: int = 0, decoder: int = 0, projector_dim: int = 0, target_dim: int = 0,
            target_tokens: int = 0, fsdp: bool = False) -> Memory:
    """The peak of one training step of `model` (a DiT or caption DiT, on any device, meta included) per GPU at
    micro-batch `batch_size` and `tokens` image tokens. `precision`: training.mixed_precision. `posthoc_sigmas`:
    the number of post-hoc EMAs. `bucket_view`: DDP's gradient_as_bucket_view. `context`: caption tokens.
    `eval_batch`: the largest evaluation forward (0: no validation or FID) at `eval_tokens`; `decoder`: the
    decoder's weights and activations (`decoder_bytes`). `projector_dim` > 0: REPA's projector to `target_dim`
    (training.repa), trained beside the model, and the micro-batch's targets of `target_tokens` tokens a sample
    (default `tokens`; one more with a stored class token). `fsdp` (training.parallel fsdp): the parameters,
    gradients, optimizer state and EMAs are sharded over the `world_size` GPUs (activations are not), plus the
    gathered full parameters in flight (`_gathered`)."""
    half = HALF[precision]
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params) + sum(b.nbytes for b in model.buffers())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    shadow = 4 * sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    hidden, depth, heads = model.hidden_size, model.depth, model.num_heads
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / hidden
    patch_in = model.patch_size ** 2 * model.in_channels
    patch_out = model.patch_size ** 2 * model.out_channels
    text_dim = getattr(model, "text_dim", 0) if context else 0
    act = activation_bytes(batch_size, tokens, hidden, heads, depth, mlp_ratio, half, patch_in, checkpointing, context,
                           text_dim)
    copies = 2 * _matmul_params(model) if half == 2 else 0
    extra = 0  # REPA's projector: its fp32 parameters (and so gradients, moments), none of it in an EMA
    workspace = backward_workspace(batch_size, tokens, hidden, mlp_ratio, half, patch_out)
    if projector_dim:
        extra = 4 * projector_params(hidden, projector_dim, target_dim)
        act += projector_saved_bytes(batch_size, tokens, hidden, projector_dim, target_dim, half)
        copies += extra // 2 if half == 2 else 0  # every projector parameter is a Linear's, cast to half
        # its backward runs first (its nodes are the forward's last), while every DiT activation is still held
        workspace = max(workspace, projector_workspace(batch_size, tokens, projector_dim, target_dim, half))
    if checkpointing and copies:
        # The forward ends holding every half copy (autocast's cache) and only the blocks' inputs; the backward of
        # the last block holds the copies outside the blocks, that block's, and its recomputed activations.
        block = block_saved_bytes(batch_size, tokens, hidden, heads, mlp_ratio, half, context)
        block_copies = 2 * _matmul_params(model, 0)
        in_backward = copies - (depth - 1) * block_copies
        if copies > in_backward + block:
            act = act - block
        else:
            copies = in_backward
    evaluation = 0
    if eval_batch:
        evaluation = (4 * sum(p.numel() for p in params) + (2 * _matmul_params(model) if half == 2 else 0)
                      + forward_workspace(eval_batch, eval_tokens or tokens, hidden, mlp_ratio, half) + decoder)
    tensors = len(trainable) + (6 if projector_dim else 0)  # the fused AdamW's step count: one float a tensor
    shards, gathered = (world_size, _gathered(model, half)) if fsdp else (1, 0)
    if fsdp:
        copies = 0  # FSDP's gathered parameters are already in the compute dtype: autocast makes no copies
    return Memory(
        weights=(weights + extra) // shards + gathered,
        gradients=(grads + extra) // shards,
        optimizer=2 * (grads + extra) // shards + 4 * tensors,
        ema=shadow // shards if use_ema else 0,
        posthoc_ema=shadow // shards * posthoc_sigmas,
        ddp_buckets=grads + extra if world_size > 1 and not bucket_view and not fsdp else 0,
        autocast=copies,
        activations=act,
        workspace=workspace,
        evaluation=evaluation,
        targets=2 * batch_size * (target_tokens or tokens) * target_dim if projector_dim else 0,
    )


def _gathered(model: torch.nn.Module, half: int) -> int:
    """FSDP's full parameters in flight, in the compute dtype (`half` bytes, 4 for fp32): the root's (its
    embedders and final layer stay gathered through the step) and two blocks' (the one running and the next,
    prefetched)."""
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - block * len(model.blocks)
    return (half or 4) * (root + 2 * block)


# ---------------------------------------------------------------------------------------------------- a run


def decoder_bytes(codec: dict, images: int, pixels: int) -> int:
    """A VAE decoder's weights and widest activations decoding `images` images of `pixels` pixels at once in its
    dtype (the SD-VAE's figures; TAESD is far smaller); 0 for the pixel codec."""
    if codec.get("kind") != "vae":
        return 0
    size = 2 if codec.get("dtype") == "bf16" else 4
    return size * (VAE_DECODER_PARAMS + images * pixels * VAE_DECODER_LIVE)


def max_tokens(manifest: Manifest | dict, patch: int) -> int:
    """Image tokens of the largest latent the run trains on: every bucket's, or the one square shape."""
    manifest = Manifest.of(manifest)
    shapes = [b["latent_shape"] for b in manifest.buckets] or [manifest.latent_shape()]
    return max((h // patch) * (w // patch) for *_, h, w in shapes)


def predict_run(cfg, manifest: Manifest | dict, model: torch.nn.Module, world_size: int, *, batch_size: int | None = None,
                checkpointing: bool | None = None) -> Memory:
    """The prediction for a configured run of `model` (the built one, any device); `batch_size` and `checkpointing`
    override the config's, for the preflight's suggestions."""
    from ditpipe.pipeline.device import ddp_options
    from ditpipe.pipeline.validation import EVAL_BATCH_FACTOR

    t, v = cfg.training, cfg.validation
    batch = batch_size or t.batch_size
    ckpt = cfg.model.gradient_checkpointing if checkpointing is None else checkpointing
    manifest = Manifest.of(manifest)
    tokens = max_tokens(manifest, model.patch_size)
    context = (manifest.captions or {}).get("max_tokens_seen", 0) if hasattr(model, "text_dim") else 0
    guided = 2 if (model.num_classes or context) and v.cfg_scale != 1.0 else 1  # CFG doubles a sampling batch
    evals = [v.num_samples * guided if v.every_steps and v.grid else 0,
             EVAL_BATCH_FACTOR * batch if v.every_steps else 0, batch * guided if v.fid_every_steps else 0]
    images = max(v.num_samples if v.every_steps and v.grid else 0, batch if v.fid_every_steps else 0)
    bucket_view = ddp_options(t.deterministic, world_size)["gradient_as_bucket_view"]  # what the run's DDP gets
    targets = manifest.targets if t.repa.weight > 0 else None  # check_run refuses REPA without them
    return predict(model, batch_size=batch, tokens=tokens, precision=t.mixed_precision, checkpointing=ckpt,
                   use_ema=t.use_ema, posthoc_sigmas=len(t.posthoc_ema_sigmas) if t.posthoc_ema else 0,
                   world_size=world_size, bucket_view=bucket_view,
                   context=context, eval_batch=max(evals), eval_tokens=tokens,
                   decoder=decoder_bytes(manifest.codec, images, cfg.data.image_size ** 2) if images else 0,
                   projector_dim=t.repa.projector_dim if targets else 0,
                   target_dim=targets["encoder"]["dim"] if targets else 0,
                   target_tokens=tokens + int(targets["class_token"]) if targets else 0,
                   fsdp=t.parallel == "fsdp")


def fix(cfg, manifest: dict, model: torch.nn.Module, world_size: int, device_bytes: int) -> str:
    """What makes the run fit `device_bytes`, concretely: gradient checkpointing, and/or the largest micro-batch that
    fits with more accumulation at the same global batch (batch × accumulation unchanged)."""
    t, on = cfg.training, cfg.model.gradient_checkpointing
    per_rank = t.batch_size * t.gradient_accumulation_steps  # samples per rank per optimizer step
    options = []
    for ckpt in sorted({on, True}, reverse=True):  # checkpointing first: it keeps the batch
        key = "model.gradient_checkpointing: true" if ckpt and not on else ""
        m = predict_run(cfg, manifest, model, world_size, checkpointing=ckpt)
        if key and m.total <= device_bytes:
            options.append(f"{key} (predicted {size(m.total)})")
            continue
        for b in range(t.batch_size - 1, 0, -1):  # the largest micro-batch that fits: the fewest extra passes
            if per_rank % b:
                continue
            m = predict_run(cfg, manifest, model, world_size, batch_size=b, checkpointing=ckpt)
            if m.total <= device_bytes:
                change = f"training.batch_size: {b} and training.gradient_accumulation_steps: {per_rank // b}"
                options.append(f"{key} with {change}" if key else change)
                options[-1] += f" (the same global batch; predicted {size(m.total)})"
                break
    if not options:
        return ("not even batch 1 with gradient checkpointing fits: a smaller model, or the model split over more "
                "GPUs (not built)")
    return "; or ".join(options)


def preflight(cfg, manifest: dict, model: torch.nn.Module, world_size: int, device: torch.device,
              device_bytes: int | None = None) -> tuple[str, str | None]:
    """(the preflight's `memory` row, a warning when the prediction exceeds the device's memory, naming the fix).
    `device_bytes`: the device's memory; None reads a CUDA device's, and a CPU has none to compare."""
    m = predict_run(cfg, manifest, model, world_size)
    if device_bytes is None and device.type == "cuda":
        device_bytes = torch.cuda.get_device_properties(device).total_memory
    if device_bytes is None:
        return f"predicted for a GPU: {m.describe()} (a CPU has no device memory to compare)", None
    row = f"{m.describe()} of {size(device_bytes)}"
    if m.total <= device_bytes:
        return row, None
    return row, (f"the step is predicted to need {size(m.total)} per GPU, more than the device's "
                 f"{size(device_bytes)}: it would run out of memory. Set "
                 f"{fix(cfg, manifest, model, world_size, device_bytes)}")


# ---------------------------------------------------------------------------------------- the table in docs/gpu.md


def table(device_gib: float = 80.0) -> str:
    """DiT-B/2 and DiT-XL/2 at 256 px (latent 4×32×32, 256 tokens), bf16, EMA on, one GPU, without validation,
    at micro-batch 32, 128 and 256, with and without gradient checkpointing: docs/gpu.md's "Memory per GPU" table.
    The models are built on the meta device, so XL/2 costs nothing."""
    from ditpipe.pipeline.model import build_dit

    rows = ["| model | batch | checkpointing | activations (saved) | step peak | fits 80 GB? |",
            "|---|---:|---|---:|---:|---|"]
    limit = device_gib * 1e9  # "80 GB": the H100's 80 GB (79.6 GiB usable)
    for name in ("DiT-B/2", "DiT-XL/2"):
        with torch.device("meta"):
            model = build_dit(name, input_size=32, in_channels=4, num_classes=1000)
        for batch in (32, 128, 256):
            for ckpt in (False, True):
                m = predict(model, batch_size=batch, tokens=256, precision="bf16", checkpointing=ckpt, use_ema=True,
                            posthoc_sigmas=0, world_size=1, bucket_view=True)
                rows.append(f"| {name} | {batch} | {'yes' if ckpt else 'no'} | {m.activations / GIB:.1f} GiB | "
                            f"{m.step / GIB:.1f} GiB | {'yes' if m.step <= limit else 'no'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
