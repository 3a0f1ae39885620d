"""REPA (Yu et al. 2024, sihyun-yu/REPA): align a DiT block's tokens with a frozen encoder's, read from the shards.

The alignment is the official one: the output of block `training.repa.depth` (1-based, before the final layer)
goes through a 3-layer SiLU MLP (`build_mlp`, hidden → projector_dim → projector_dim → the targets' width), and the
loss is the negative cosine similarity between each projected token and its target token, averaged over tokens,
then over the batch (SILoss's projection loss; tests/test_repa.py holds it to the official numbers). The total is
`denoising + weight · alignment`, as `loss.mean() + proj_coeff * proj_loss` in their train.py.

The targets come from the shards (pipeline/targets.py), one token a DiT patch, on the DiT's grid: the encoder never
runs in a training process. A flipped latent is aligned with the targets of the flipped image (encoded as such).

`Aligned` wraps the DiT and the projector into the one module the step trains (DDP all-reduces both); the
checkpoint keeps the DiT's state dict in `model.pt` (the official layout, what sample and export read) and the
projector's in `projector.pt`. The EMAs track the DiT alone: sampling never runs the projector.
"""

from __future__ import annotations

import torch
from torch import nn


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """The official projector (REPA models/sit.py `build_mlp`); its state dict names are `0.weight` … `4.bias`."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def alignment_loss(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample (N,): the mean over tokens of −cos(z, target); z (N, T, Z) projected tokens, target (N, T, Z).
    The official loop (per sample: F.normalize each, −(z·z̃).sum(-1), mean over tokens; then / batch) is this."""
    z = nn.functional.normalize(z.float(), dim=-1)  # (N, T, Z)
    target = nn.functional.normalize(target.float(), dim=-1)  # (N, T, Z)
    return -(z * target).sum(dim=-1).mean(dim=-1)  # (N,)


class Aligned(nn.Module):
    """The DiT and its REPA projector, trained together: forward returns (the DiT's output, the projected tokens of
    block `depth`)."""

    def __init__(self, dit: nn.Module, depth: int, projector_dim: int, z_dim: int):
        super().__init__()
        self.dit, self.depth = dit, depth
        self.projector = build_mlp(dit.pos_embed.shape[-1], projector_dim, z_dim)
        for layer in self.projector:  # SiT's _basic_init, which REPA applies to its projectors
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.constant_(layer.bias, 0)

    def forward(self, x, t, y=None, force_drop_ids=None):
        out, hidden = self.dit(x, t, y, force_drop_ids=force_drop_ids, hidden_at=self.depth)  # hidden (N, T, D)
        return out, self.projector(hidden)  # (N, C', H, W), (N, T, Z)


def check_depth(model: nn.Module, depth: int) -> None:
    """training.repa.depth names one of the model's blocks."""
    from ditpipe.pipeline.errors import ConfigError

    blocks = len(model.blocks)
    if not 1 <= depth <= blocks:
        raise ConfigError([("training.repa.depth", f"{depth}, but the model has {blocks} blocks; align one of blocks "
                                                   f"1..{blocks} (REPA: 8 of DiT-XL's 28)")])
