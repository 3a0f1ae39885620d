"""Our DiT (the official layout) as diffusers' `DiTTransformer2DModel`: the key mapping, the config, and the one
numerical difference between the two.

The mapping is the one diffusers used to convert the official checkpoints (facebook/DiT-XL-2-256): the timestep
and label embedders are copied into every block's `norm1.emb` (diffusers' final layer reads block 0's), `qkv` is
split into `to_q/to_k/to_v`, `proj` → `to_out.0`, `mlp.fc1/fc2` → `ff.net.0.proj/ff.net.2`, `adaLN_modulation.1` →
`norm1.linear`, the final layer's → `proj_out_1/proj_out_2`. diffusers computes the fixed position embedding
itself (the same sin-cos table), so `pos_embed` is not stored.

The difference: diffusers' `CombinedTimestepLabelEmbeddings` builds the sinusoidal timestep features with
`downscale_freq_shift=1`, i.e. frequencies 10000^(-i/127), where official DiT (and ditpipe) use 10000^(-i/128).
The weights convert exactly, but a stock diffusers DiT, facebook/DiT-XL-2-256 included, therefore sees slightly
different timestep features than the model was trained with. `match_official_timesteps` sets the shift to 0 on a
loaded model, after which its outputs equal ours to float precision.
"""

from __future__ import annotations

import torch

from ditpipe.pipeline.model import DiT

_LINEAR = ("weight", "bias")


def diffusers_config(model: DiT) -> dict:
    """`DiTTransformer2DModel(**config)` for our model's architecture."""
    return {
        "num_attention_heads": model.num_heads,
        "attention_head_dim": model.hidden_size // model.num_heads,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "num_layers": model.depth,
        "sample_size": model.input_size,
        "patch_size": model.patch_size,
        "num_embeds_ada_norm": model.num_classes,
        "norm_eps": model.blocks[0].norm2.eps,  # diffusers' default 1e-5 is not DiT's 1e-6
        "activation_fn": "gelu-approximate",
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "attention_bias": True,
        "dropout": 0.0,
        "upcast_attention": False,
    }


def to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our (official-layout) state dict → DiTTransformer2DModel's. Every tensor is used; none is invented."""
    out = {f"pos_embed.proj.{p}": state[f"x_embedder.proj.{p}"] for p in _LINEAR}
    for i in range(depth):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in _LINEAR:
            out[f"{o}norm1.emb.timestep_embedder.linear_1.{p}"] = state[f"t_embedder.mlp.0.{p}"]
            out[f"{o}norm1.emb.timestep_embedder.linear_2.{p}"] = state[f"t_embedder.mlp.2.{p}"]
            out[f"{o}norm1.linear.{p}"] = state[f"{b}adaLN_modulation.1.{p}"]
            q, k, v = state[f"{b}attn.qkv.{p}"].chunk(3, dim=0)  # timm's fused layout: [q; k; v] rows
            out[f"{o}attn1.to_q.{p}"], out[f"{o}attn1.to_k.{p}"], out[f"{o}attn1.to_v.{p}"] = q, k, v
            out[f"{o}attn1.to_out.0.{p}"] = state[f"{b}attn.proj.{p}"]
            out[f"{o}ff.net.0.proj.{p}"] = state[f"{b}mlp.fc1.{p}"]
            out[f"{o}ff.net.2.{p}"] = state[f"{b}mlp.fc2.{p}"]
        out[f"{o}norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
    for p in _LINEAR:
        out[f"proj_out_1.{p}"] = state[f"final_layer.adaLN_modulation.1.{p}"]
        out[f"proj_out_2.{p}"] = state[f"final_layer.linear.{p}"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}  # shared rows → separate tensors


def match_official_timesteps(transformer) -> None:
    """Make a loaded DiTTransformer2DModel compute DiT's own timestep features (frequencies 10000^(-i/128)) instead
    of diffusers' (10000^(-i/127)); see the module docstring. In place; the weights are untouched."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
