"""DiT: the diffusion transformer of Peebles & Xie (2023), as in facebookresearch/DiT's models.py, without timm.

The module names and parameter shapes equal the official ones, so official checkpoints load with strict=True.
Additions, all off by default (the default layout and numerics stay official): QK-norm, gradient checkpointing,
an unconditional mode (num_classes=0), label dropout driven by a caller-given mask, CFG on all eps channels, and
latents of any size (`any_grid`, for aspect-ratio buckets): the sin-cos position embedding of another patch grid is
computed as `get_2d_sincos_pos_embed` does for any size and cached per grid, while the `pos_embed` parameter keeps
the square grid's, so official checkpoints still load strictly.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ditpipe.pipeline.config import (MAX_CHANNELS, MAX_CLASSES, MAX_DEPTH, MAX_HEADS, MAX_HIDDEN, MAX_PARAMETERS,
                                     MAX_PATCH, MAX_TOKENS)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def drop_labels(y, drop_mask, null_class):
    """Replace the labels where drop_mask is true (bool or 0/1, shape (N,)) by null_class. No random draw."""
    drop_mask = torch.as_tensor(drop_mask, device=y.device)
    if drop_mask.shape != y.shape:
        raise ValueError(f"drop mask has shape {tuple(drop_mask.shape)}, labels have {tuple(y.shape)}")
    return torch.where(drop_mask == 1, null_class, y)  # (N,)


#################################################################################
#               Embedding Layers for Patches, Timesteps and Class Labels        #
#################################################################################

class PatchEmbed(nn.Module):
    """Image to patch tokens: a strided conv (timm's PatchEmbed with flatten=True, no norm)."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D), row-major over the patch grid


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoidal embeddings of (possibly fractional) timesteps t of shape (N,): [cos | sin], as official."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
        )  # (half,)
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (N, dim)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, F)
        # Cast so a model converted to bf16/fp16 without autocast still runs; a no-op in fp32.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; also does the label dropout for classifier-free guidance (once per sample)."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0  # the extra last row is the null ("no class") embedding
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train, force_drop_ids=None):
        if force_drop_ids is not None:
            # The caller decided which labels to drop (keyed generators): no random draw here.
            if self.dropout_prob <= 0 and bool(torch.as_tensor(force_drop_ids).any()):
                raise ValueError("force_drop_ids drops labels, but class_dropout_prob=0 means no null class")
            labels = drop_labels(labels, force_drop_ids, self.num_classes)  # (N,)
        elif train and self.dropout_prob > 0:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (N,), as official
            labels = drop_labels(labels, drop_ids, self.num_classes)  # (N,)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with timm's layout (fused qkv, proj), through PyTorch's fused SDPA."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        # Identity has no parameters, so the default state dict stays the official one.
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, Dh), timm's order
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, Dh)
        q, k = self.q_norm(q), self.k_norm(k)  # (N, H, T, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh), scale Dh ** -0.5
        x = x.transpose(1, 2).reshape(N, T, D)  # (N, T, D)
        return self.proj(x)  # (N, T, D)


class Mlp(nn.Module):
    """timm's Mlp with the tanh-approximated GELU (official DiT), no dropout."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # (N, T, D)


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN, then a linear map from tokens to patches."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p * p * C_out)


def check_size(*, input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes=0, mlp_ratio=4.0,
               per_block=0, extra=0) -> None:
    """Raise ValueError, naming the value, for a model beyond the bounds of pipeline/config.py (checked before
    anything is allocated). `per_block` and `extra`: parameters a variant adds to each block and in all (the caption
    model's cross-attention and caption projections)."""
    sizes = {"input_size": input_size, "patch_size": patch_size, "in_channels": in_channels,
             "hidden_size": hidden_size, "depth": depth, "num_heads": num_heads}
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    bounds = {"hidden_size": (hidden_size, MAX_HIDDEN), "depth": (depth, MAX_DEPTH),
              "num_heads": (num_heads, MAX_HEADS), "patch_size": (patch_size, MAX_PATCH),
              "in_channels": (in_channels, MAX_CHANNELS), "num_classes": (num_classes, MAX_CLASSES)}
    for key, (value, bound) in bounds.items():
        if value > bound:
            raise ValueError(f"{key} {value:,} is over the bound of {bound:,} (pipeline/config.py)")
    tokens = (input_size // patch_size) ** 2
    if tokens > MAX_TOKENS:
        raise ValueError(f"input_size {input_size} at patch_size {patch_size} makes {tokens:,} tokens, over the bound "
                         f"of {MAX_TOKENS:,} (pipeline/config.py); the latent shape is wrong, or the patch too small")
    d, io = hidden_size, patch_size ** 2 * in_channels * 3  # patch embedding in, eps + sigma out
    block = int(2 * mlp_ratio * d * d) + 10 * d * d + per_block  # qkv, proj, MLP, adaLN
    params = depth * block + tokens * d + (num_classes + 1) * d + io * d + 256 * d + 3 * d * d + extra
    if params > MAX_PARAMETERS:
        raise ValueError(f"about {params:,} parameters (hidden_size {d}, depth {depth}), over the bound of "
                         f"{MAX_PARAMETERS:,} (pipeline/config.py)")


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        qk_norm=False,
        gradient_checkpointing=False,
        any_grid=False,
    ):
        super().__init__()
        check_size(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
                   depth=depth, num_heads=num_heads, num_classes=num_classes, mlp_ratio=mlp_ratio)
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 (2D sin-cos position embedding)")
        if num_classes < 0 or not 0 <= class_dropout_prob <= 1:
            raise ValueError(f"need num_classes >= 0 and 0 <= class_dropout_prob <= 1, "
                             f"got {num_classes} and {class_dropout_prob}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.learn_sigma = learn_sigma
        self.gradient_checkpointing = gradient_checkpointing
        self.any_grid = any_grid  # latents of any size the patch divides; off: input_size² only, as official

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # num_classes=0: unconditional, no label embedder at all (so no y_embedder keys in the state dict).
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Will use fixed sin-cos embedding; a Parameter (not a buffer) so the state dict matches official.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm) for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_class(self):
        """The label index of the null class used for classifier-free guidance, or None if there is none."""
        return self.num_classes if self.y_embedder is not None and self.class_dropout_prob > 0 else None

    def initialize_weights(self):
        # Initialize transformer layers:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Initialize (and freeze) pos_embed by sin-cos embedding (skipped on the meta device: no data there):
        if not self.pos_embed.is_meta:
            pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
            self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Initialize patch_embed like nn.Linear (instead of nn.Conv2d):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Initialize label embedding table:
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

        # Initialize timestep embedding MLP:
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Zero-out adaLN modulation layers in DiT blocks (each block starts as the identity):
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero-out output layers (the model starts by predicting zeros):
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x, grid=None):
        """(N, T, p * p * C) -> (N, C, H, W) for the patch grid (h, w) (default: the square one)."""
        c, p = self.out_channels, self.patch_size
        h, w = grid or (self.x_embedder.grid_size,) * 2
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def forward(self, x, t, y=None, force_drop_ids=None, hidden_at=None):
        """
        x: (N, C, H, W) latents; t: (N,) diffusion timesteps; y: (N,) class labels, or None when num_classes=0.
        force_drop_ids: optional (N,) bool/0-1 mask of labels to replace by the null class (no random draw);
        if None, labels are dropped at random with class_dropout_prob in training mode only, as official.
        hidden_at: a block number (1-based): also return that block's output tokens (N, T, D), for REPA
        (pipeline/repa.py), as (output, tokens).
        """
        grid = patch_grid(self, x)
        if (y is None) != (self.y_embedder is None):
            raise ValueError("y must be given for a class-conditional model and None for an unconditional one"
                             f" (num_classes={self.num_classes})")
        x = self.x_embedder(x) + grid_pos_embed(self, grid)  # (N, T, D), where T = H * W / patch_size ** 2
        c = self.t_embedder(t)  # (N, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        hidden = None
        for i, block in enumerate(self.blocks):
            # Checkpointing trades compute for memory: activations are recomputed in backward.
            x = checkpoint(block, x, c, use_reentrant=False) if use_checkpoint else block(x, c)  # (N, T, D)
            if i + 1 == hidden_at:
                hidden = x  # (N, T, D): REPA's `zs` are taken here, inside the loop
        x = self.final_layer(x, c)  # (N, T, patch_size ** 2 * out_channels)
        out = self.unpatchify(x, grid)  # (N, out_channels, H, W)
        return out if hidden_at is None else (out, hidden)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=None):
        """
        Forward pass with classifier-free guidance, batching the unconditional pass with the conditional one.
        The first half of the batch is conditional (x, t, labels), the second half the same x and t with the null
        class as label. The guided channels are duplicated into both halves; the other channels (learned sigma,
        unguided eps) are each half's own output, as official. cfg_channels=None guides all in_channels eps
        channels; cfg_channels=3 reproduces the official code, which guides only the first 3 channels.
        """
        if self.null_class is None:
            raise ValueError("classifier-free guidance needs a class-conditional model with class_dropout_prob > 0")
        if len(x) % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (conditional + unconditional), got {len(x)}")
        cfg_channels = self.in_channels if cfg_channels is None else cfg_channels
        if not 1 <= cfg_channels <= self.out_channels:
            raise ValueError(f"cfg_channels must be in [1, {self.out_channels}], got {cfg_channels}")
        half = x[: len(x) // 2]  # (N/2, C, H, W)
        combined = torch.cat([half, half], dim=0)  # (N, C, H, W)
        model_out = self.forward(combined, t, y)  # (N, C_out, H, W)
        eps, rest = model_out[:, :cfg_channels], model_out[:, cfg_channels:]  # (N, g, H, W), (N, C_out - g, H, W)
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)  # 2 x (N/2, g, H, W)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # (N/2, g, H, W)
        eps = torch.cat([half_eps, half_eps], dim=0)  # (N, g, H, W)
        return torch.cat([eps, rest], dim=1)  # (N, C_out, H, W)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Returns pos_embed of shape (h * w, embed_dim) for grid_size g (a g × g grid, as official, no cls token) or
    (h, w): row-major over the grid, as PatchEmbed flattens it."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first; each (h, w)
    grid = np.stack(grid, axis=0)  # (2, h, w)
    grid = grid.reshape([2, 1, gh, gw])
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid)


def patch_grid(model, x) -> tuple[int, int]:
    """The patch grid (h, w) of latents x (N, C, H, W) for `model` (a DiT or the caption DiT), refusing what it
    cannot take: any size the patch divides with `any_grid`, else its one input_size² (as official)."""
    H, W = x.shape[-2:]
    p = model.patch_size
    if not getattr(model, "any_grid", False) and (H, W) != (model.input_size, model.input_size):
        raise ValueError(f"expected latents of size {model.input_size}x{model.input_size}, got {tuple(x.shape)}")
    if H % p or W % p:
        raise ValueError(f"latents of size {H}x{W} are not whole {p}x{p} patches")
    if (H // p) * (W // p) > MAX_TOKENS:
        raise ValueError(f"latents of size {H}x{W} at patch {p} make {(H // p) * (W // p):,} tokens, over the bound "
                         f"of {MAX_TOKENS:,} (pipeline/config.py)")
    return H // p, W // p


def grid_pos_embed(model, grid: tuple[int, int]) -> torch.Tensor:
    """(1, h·w, D) position embedding of a patch grid: the `pos_embed` parameter for the square grid the model was
    built for (what official checkpoints carry), else a table made once per grid, device and dtype and kept on the
    model (not part of the state dict: it is a pure function of the grid). A compiled forward must only look the
    table up: made in it (numpy, a dict filled on a shape), every bucket recompiled and those past torch's recompile
    limit ran eager. So the step makes its buckets' tables before it compiles (prepare_grids)."""
    g = model.x_embedder.grid_size
    if tuple(grid) == (g, g):
        return model.pos_embed
    ref = model.pos_embed
    key = (tuple(grid), ref.device, ref.dtype)
    table = model.__dict__.get("_grid_pos_embeds", {}).get(key)
    if table is None:  # a grid nobody prepared (eager sampling at a new size): made now, numpy's exact values
        table = get_2d_sincos_pos_embed(ref.shape[-1], tuple(grid))  # (h·w, D)
        table = torch.from_numpy(table).float().unsqueeze(0).to(ref.device, ref.dtype)  # (1, h·w, D)
        model.__dict__.setdefault("_grid_pos_embeds", {})[key] = table
    return table


def prepare_grids(model, grids) -> None:
    """Make the position embedding of each patch grid (h, w) in `grids` now, on the device and in the dtype of the
    model's pos_embed: call it once the model is on its device and before torch.compile, so that the compiled
    forward only looks each table up (grid_pos_embed)."""
    for grid in grids:
        grid_pos_embed(model, tuple(grid))


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0
    # use half of dimensions to encode grid_h (the official code's naming; grid[0] holds the w coordinates)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """embed_dim: output dimension for each position; pos: positions to be encoded, size (M,)."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega  # (D/2,)
    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

DIT_PRESETS = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in {
        "XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
    }.items()
    for patch in (2, 4, 8)
}


def build_dit(
    name,
    *,
    input_size,
    in_channels,
    num_classes,
    learn_sigma=True,
    class_dropout_prob=0.1,
    qk_norm=False,
    gradient_checkpointing=False,
    hidden_size=None,
    depth=None,
    num_heads=None,
    patch_size=None,
    any_grid=False,
):
    """Build a DiT from a preset name such as "DiT-XL/2"; explicit hidden_size/depth/num_heads/patch_size win."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; known presets: {', '.join(DIT_PRESETS)}")
    overrides = dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=patch_size)
    arch = {**DIT_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return DiT(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        qk_norm=qk_norm,
        gradient_checkpointing=gradient_checkpointing,
        any_grid=any_grid,
        **arch,
    )
