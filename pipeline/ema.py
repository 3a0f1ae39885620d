"""EMA of the model weights as an fp32 shadow, updated by fused multi-tensor kernels once a step, on the device."""

from __future__ import annotations

import torch


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """With warm-up, min(decay, (1 + step) / (10 + step)): early averages forget the random init quickly, so short
    runs still get a useful EMA. `step` counts optimizer updates already applied to the model."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


CHUNK_ELEMENTS = 1 << 24  # the tensor-weighted update's (param − shadow) temporary: at most 64 MiB of fp32 a chunk


def _chunks(sizes: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) runs of consecutive tensors holding at most CHUNK_ELEMENTS elements together (a larger tensor alone):
    without them the update would hold a second fp32 copy of the whole model (2.7 GB for XL/2) for a moment."""
    runs, lo, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > lo and total + n > CHUNK_ELEMENTS:
            runs.append((lo, i))
            lo, total = i, 0
        total += n
    return runs + [(lo, len(sizes))] if sizes else runs


class EMA:
    def __init__(self, model: torch.nn.Module):
        # A float32 copy of every floating-point entry of the state dict (buffers too, e.g. pos_embed). Of a sharded
        # model (FSDP2), DTensors sharded like its parameters: each rank keeps and updates its shard.
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self._pairs = [(self.shadow[n], p) for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, decay: float, applied: torch.Tensor | None = None) -> None:
        """shadow ← shadow + (1 − decay)·(param − shadow). `applied` (a () bool on the parameters' device) says whether
        the optimizer really updated the parameters this step; where it did not (an fp16 overflow, a non-finite
        loss), the weight is 0 and the shadow stays, decided on the device without a host sync."""
        from ditpipe.pipeline.fsdp import local  # sharded (training.parallel fsdp): the local shards, as views

        shadows, params = ([local(t) for t in x] for x in zip(*self._pairs))
        params = [p.detach().float() for p in params]  # the fp32 master weights themselves, or fp32 copies
        if applied is None:
            torch._foreach_lerp_(shadows, params, 1.0 - decay)  # a Python weight: a kernel argument, no read
            return
        # A () tensor weight must not reach `_foreach_lerp_`: its argument parser turns a 0-dim tensor into a Python
        # number (`.item()`, a host sync every step on CUDA). `_foreach_mul_` takes a device tensor as it is.
        weight = applied.float() * (1.0 - decay)  # () on the device
        for lo, hi in _chunks([s.numel() for s in shadows]):  # the temporary stays small whatever the model's size
            diffs = torch._foreach_sub(params[lo:hi], shadows[lo:hi])  # param − shadow, fp32
            torch._foreach_mul_(diffs, weight)
            torch._foreach_add_(shadows[lo:hi], diffs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for k, v in self.shadow.items():
            v.copy_(state[k])
