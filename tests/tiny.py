"""The tiny DiT the CPU tests train, defined once: one block, width 32, two heads (DiT-S/4's patch by default).

A test that needs another model says only how it differs, on top of this one:
`{**TINY_MODEL, "model.name": "DiT-S/2"}` in a config, `tiny_dit("DiT-S/2", ..., depth=2)` for a bare model.
Larger test models (width 64, depth 2, ...) are other models on purpose and stay written where they are used.
"""

from __future__ import annotations

TINY_ARCH = {"hidden_size": 32, "depth": 1, "num_heads": 2}  # build_dit's / DiT's keyword arguments
TINY_MODEL = {"model.name": "DiT-S/4", **{f"model.{k}": v for k, v in TINY_ARCH.items()}}  # load_config overrides
TINY_FLAGS = [a for k, v in TINY_MODEL.items() for a in (f"--{k}", str(v))]  # the same on a ditpipe command line


def tiny_dit(name: str = "DiT-S/4", **kw):
    """build_dit(name, **kw) with the tiny width, depth and heads; `kw` gives the data's shape (input_size,
    in_channels, num_classes) and any deliberate difference (depth=2), which wins."""
    from ditpipe.pipeline.model import build_dit

    return build_dit(name, **{**TINY_ARCH, **kw})
