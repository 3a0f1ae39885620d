"""The caption-conditioned DiT: a documented extension beside the official-layout class model (model.py, untouched).

PixArt-α's recipe on DiT's blocks:
  - each block is DiT's adaLN-Zero block with a cross-attention over the caption's token embeddings inserted after
    self-attention (PixArt-α: ungated, its output projection zero-initialised, so every block starts as identity;
    we add a parameter-free LayerNorm on the query side, as DiT normalises before every other sub-layer);
  - the pooled caption embedding is projected and added to the timestep embedding, so it drives adaLN;
  - caption dropout swaps in a learned null caption (one token and one pooled vector, in the text encoder's space,
    projected like a real one), which gives classifier-free guidance. A caption whose mask has no token at all
    (an image without captions) is the null caption too, so attention never sees an empty key set.
Presets are DiT's sizes with a `T` for text: DiT-T-S/2 ... DiT-T-XL/8 (same depth, width and heads as DiT-S/2 ...).
Shapes: x (N, C, H, W), t (N,), y = Caption(tokens (N, L, E), mask (N, L), pooled (N, E)) with E the encoder's width.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ditpipe.pipeline.config import MAX_TEXT_DIM
from ditpipe.pipeline.model import (DIT_PRESETS, DiT, DiTBlock, FinalLayer, PatchEmbed, TimestepEmbedder, check_size,
                            get_2d_sincos_pos_embed, grid_pos_embed, modulate, patch_grid)

from ditpipe.pipeline.text import Caption

CAPTION_PRESETS = {name.replace("DiT-", "DiT-T-"): arch for name, arch in DIT_PRESETS.items()}


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; padded caption tokens are masked out."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, context, mask):
        N, T, D = x.shape
        L = context.shape[1]
        q = self.q(x).reshape(N, T, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, T, Dh)
        k, v = self.kv(context).reshape(N, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # (N, H, T, Dh), (N, H, L, Dh)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (N, H, T, Dh)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))  # (N, T, D)


class CaptionDiTBlock(DiTBlock):
    """DiT's adaLN-Zero block, plus cross-attention to the caption after self-attention."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm)
        self.norm_cross = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm=qk_norm)

    def forward(self, x, c, context, mask):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + self.cross_attn(self.norm_cross(x), context, mask)  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


def _projection(text_dim, hidden_size):
    """PixArt-α's caption projection: two linears with a tanh-GELU between."""
    return nn.Sequential(nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"),
                         nn.Linear(hidden_size, hidden_size))


class CaptionEmbedder(nn.Module):
    """Caption → (context tokens (N, L, D), pooled conditioning (N, D)); caption dropout to the learned null."""

    def __init__(self, text_dim, hidden_size, dropout_prob):
        super().__init__()
        self.tokens = _projection(text_dim, hidden_size)
        self.pooled = _projection(text_dim, hidden_size)
        self.null_tokens = nn.Parameter(torch.randn(1, text_dim) / text_dim ** 0.5)  # PixArt-α's null init
        self.null_pooled = nn.Parameter(torch.randn(text_dim) / text_dim ** 0.5)
        self.dropout_prob = dropout_prob

    def forward(self, y: Caption, train: bool, force_drop_ids=None):
        dtype = self.tokens[0].weight.dtype
        tokens, mask, pooled = y.tokens.to(dtype), y.mask.bool(), y.pooled.to(dtype)  # (N, L, E), (N, L), (N, E)
        if force_drop_ids is not None:  # the caller's keyed draw, as the class model's label dropout
            drop = torch.as_tensor(force_drop_ids, device=mask.device).bool()  # (N,)
            if self.dropout_prob <= 0 and bool(drop.any()):
                raise ValueError("force_drop_ids drops captions, but class_dropout_prob=0 trained no null caption")
        elif train and self.dropout_prob > 0:
            drop = torch.rand(len(mask), device=mask.device) < self.dropout_prob  # (N,)
        else:
            drop = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
        drop = drop | ~mask.any(dim=1)  # no token at all: the null caption
        first = torch.zeros_like(mask)
        first[:, 0] = True  # (N, L): the null caption is one token long
        null_tokens = torch.where(first.unsqueeze(-1), self.null_tokens.to(dtype), 0.0)  # (N, L, E)
        tokens = torch.where(drop[:, None, None], null_tokens, tokens)  # (N, L, E)
        mask = torch.where(drop[:, None], first, mask)  # (N, L)
        pooled = torch.where(drop[:, None], self.null_pooled.to(dtype), pooled)  # (N, E)
        return self.tokens(tokens), mask, self.pooled(pooled)  # (N, L, D), (N, L), (N, D)


class CaptionDiT(nn.Module):
    """DiT conditioned on a caption instead of a class label (see the module docstring)."""

    unpatchify = DiT.unpatchify  # the same token → image layout

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, text_dim=384, caption_dropout_prob=0.1, learn_sigma=True, qk_norm=False,
                 gradient_checkpointing=False):
        super().__init__()
        if not isinstance(text_dim, int) or not 1 <= text_dim <= MAX_TEXT_DIM:
            raise ValueError(f"text_dim {text_dim!r} is not an encoder width in 1..{MAX_TEXT_DIM:,}")
        check_size(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
                   depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, per_block=4 * hidden_size ** 2,
                   extra=2 * (text_dim + hidden_size) * hidden_size)  # cross-attention; caption projections
        if input_size % patch_size or hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"need input_size % patch_size == 0, hidden_size % num_heads == 0 and hidden_size % 4 "
                             f"== 0; got {input_size}, {patch_size}, {hidden_size}, {num_heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size, self.depth, self.num_heads, self.text_dim = hidden_size, depth, num_heads, text_dim
        self.class_dropout_prob, self.learn_sigma = caption_dropout_prob, learn_sigma
        self.gradient_checkpointing = gradient_checkpointing
        self.num_classes = 0

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = CaptionEmbedder(text_dim, hidden_size, caption_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([CaptionDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        null = [self.y_embedder.null_tokens.detach().clone(), self.y_embedder.null_pooled.detach().clone()]

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        if not self.pos_embed.is_meta:
            pos = get_2d_sincos_pos_embed(self.hidden_size, self.x_embedder.grid_size)  # (T, D)
            self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        for mlp in (self.t_embedder.mlp, self.y_embedder.tokens, self.y_embedder.pooled):  # as DiT's t / PixArt's y
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        with torch.no_grad():
            self.y_embedder.null_tokens.copy_(null[0])
            self.y_embedder.null_pooled.copy_(null[1])
        for block in self.blocks:  # adaLN-Zero, and a zero cross-attention output (PixArt-α): blocks start as identity
            for layer in (block.adaLN_modulation[-1], block.cross_attn.proj):
                nn.init.constant_(layer.weight, 0)
                nn.init.constant_(layer.bias, 0)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)

    def forward(self, x, t, y: Caption, force_drop_ids=None):
        grid = patch_grid(self, x)  # any size with `any_grid` (aspect-ratio buckets), as DiT
        if not isinstance(y, Caption):
            raise ValueError("a caption model needs y = Caption(tokens, mask, pooled), not class labels")
        x = self.x_embedder(x) + grid_pos_embed(self, grid)  # (N, T, D)
        context, mask, pooled = self.y_embedder(y, self.training, force_drop_ids)  # (N, L, D), (N, L), (N, D)
        c = self.t_embedder(t) + pooled  # (N, D)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = (checkpoint(block, x, c, context, mask, use_reentrant=False) if use_checkpoint
                 else block(x, c, context, mask))  # (N, T, D)
        return self.unpatchify(self.final_layer(x, c), grid)  # (N, out_channels, H, W)

    def null_condition(self, y: Caption) -> Caption | None:
        """The unconditional half for guidance: the null caption (an empty mask), or None without caption dropout."""
        if self.class_dropout_prob <= 0:
            return None
        return Caption(torch.zeros_like(y.tokens), torch.zeros_like(y.mask, dtype=torch.bool),
                       torch.zeros_like(y.pooled))

    def forward_with_cfg(self, x, t, y: Caption, cfg_scale):
        """As DiT.forward_with_cfg: y's first half is the prompts, its second half null; all eps channels guided."""
        half = x[: len(x) // 2]  # (N/2, C, H, W)
        out = self.forward(torch.cat([half, half]), t, y)  # (N, C_out, H, W)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond, uncond = eps.chunk(2)  # 2 x (N/2, C, H, W)
        guided = uncond + cfg_scale * (cond - uncond)  # (N/2, C, H, W)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)  # (N, C_out, H, W)


def build_caption_dit(name, *, input_size, in_channels, text_dim, learn_sigma=True, caption_dropout_prob=0.1,
                      qk_norm=False, gradient_checkpointing=False, hidden_size=None, depth=None, num_heads=None,
                      patch_size=None):
    """A CaptionDiT from a preset such as "DiT-T-B/2"; explicit hidden_size/depth/num_heads/patch_size win."""
    if name not in CAPTION_PRESETS:
        hint = f" (the caption model of {name} is {name.replace('DiT-', 'DiT-T-')})" if name in DIT_PRESETS else ""
        raise ValueError(f"unknown caption-DiT preset {name!r}{hint}; known: {', '.join(CAPTION_PRESETS)}")
    overrides = dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=patch_size)
    arch = {**CAPTION_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return CaptionDiT(input_size=input_size, in_channels=in_channels, text_dim=text_dim, learn_sigma=learn_sigma,
                      caption_dropout_prob=caption_dropout_prob, qk_norm=qk_norm,
                      gradient_checkpointing=gradient_checkpointing, **arch)
