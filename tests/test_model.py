"""Tests for pipeline.model: the official DiT layout, its initialisation and forward semantics, and our additions."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ditpipe.pipeline.model as model_mod
from ditpipe.pipeline.model import DIT_PRESETS, DiT, TimestepEmbedder, build_dit, drop_labels, get_2d_sincos_pos_embed

LAYOUT = json.loads((Path(__file__).parent / "data" / "official_dit_state_dict_layout.json").read_text())
PAPER_PARAMS = {"DiT-S/2": 32_963_360, "DiT-B/4": 130_475_648, "DiT-XL/2": 675_129_632}
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def tiny(**kw):
    torch.manual_seed(0)
    return DiT(**{**TINY, **kw})


def perturbed(**kw):
    """A tiny model with every weight randomised, so zero-initialised layers no longer hide bugs."""
    m = tiny(**kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p is not m.pos_embed:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def inputs(n=4, m=None, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, t, y


# ----------------------------------------------------------------------------- official layout


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_state_dict_layout_equals_official_and_loads_strict(name):
    on_meta = name == "DiT-XL/2"  # 675M parameters: check the layout without allocating them
    device = torch.device("meta") if on_meta else torch.device("cpu")
    with device:
        m = build_dit(name, input_size=32, in_channels=4, num_classes=1000)
    ours = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert ours == LAYOUT[name]
    assert list(ours) == list(LAYOUT[name])  # same order too

    g = torch.Generator().manual_seed(0)
    if on_meta:
        sd = {k: torch.empty(shape, device="meta") for k, shape in LAYOUT[name].items()}
    else:
        sd = {k: torch.randn(shape, generator=g) for k, shape in LAYOUT[name].items()}
    result = m.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    if not on_meta:
        loaded = m.state_dict()
        for k in ("pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.bias"):
            assert torch.equal(loaded[k], sd[k])


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_equal_paper(name):
    with torch.device("meta"):
        m = build_dit(name, input_size=32, in_channels=4, num_classes=1000)
    assert sum(p.numel() for p in m.parameters()) == PAPER_PARAMS[name]
    assert m.y_embedder.embedding_table.num_embeddings == 1001  # last row: the null class
    assert m.out_channels == 8


def test_pos_embed_is_fixed_official_sincos():
    m = tiny()
    assert not m.pos_embed.requires_grad
    assert isinstance(m.pos_embed, torch.nn.Parameter)
    assert m.pos_embed.shape == (1, 16, 64)
    # Official (MAE) layout: first half encodes the column (grid[0] holds w), second half the row; [sin | cos].
    r, c, d = 1, 2, 64
    tok = m.pos_embed[0, r * 4 + c]
    assert tok[0].item() == pytest.approx(math.sin(c), abs=1e-6)
    assert tok[d // 4].item() == pytest.approx(math.cos(c), abs=1e-6)
    assert tok[d // 2].item() == pytest.approx(math.sin(r), abs=1e-6)
    assert tok[3 * d // 4].item() == pytest.approx(math.cos(r), abs=1e-6)
    assert tok[1].item() == pytest.approx(math.sin(c / 10000 ** (1 / 16)), abs=1e-6)
    assert torch.equal(m.pos_embed[0], torch.from_numpy(get_2d_sincos_pos_embed(64, 4)).float())


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    assert emb.shape == (3, 256)
    assert torch.allclose(emb[:, 0], torch.cos(t)) and torch.allclose(emb[:, 128], torch.sin(t))
    assert emb[1, 1].item() == pytest.approx(math.cos(3.0 * math.exp(-math.log(10000) / 128)), abs=1e-5)
    assert TimestepEmbedder.timestep_embedding(t, 7).shape == (3, 7)


# ----------------------------------------------------------------------------- initialisation


def test_adaln_zero_init():
    m = tiny()
    for block in m.blocks:
        assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
    assert not m.final_layer.linear.weight.any() and not m.final_layer.linear.bias.any()
    assert not m.final_layer.adaLN_modulation[1].weight.any()
    assert not m.x_embedder.proj.bias.any() and m.x_embedder.proj.weight.std() > 0
    assert not m.blocks[0].attn.qkv.bias.any() and m.blocks[0].attn.qkv.weight.std() > 0
    assert m.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert m.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.blocks[0].mlp.act.approximate == "tanh"
    x, t, y = inputs()
    m.train()
    out = m(x, t, y)
    assert out.shape == (4, 8, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


# ----------------------------------------------------------------------------- forward semantics


def reference_forward(m, x, t, y):
    """An independent, plain re-statement of the official forward, reading the weights from the state dict."""
    sd, D, H, p, C = m.state_dict(), m.hidden_size, m.num_heads, m.patch_size, m.out_channels

    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def mod(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    def ln(h):
        return F.layer_norm(h, (D,), eps=1e-6)

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    tf = torch.cat([torch.cos(t[:, None].float() * freqs), torch.sin(t[:, None].float() * freqs)], -1)
    c = lin(F.silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    N, T, _ = h.shape
    for i in range(m.depth):
        b = f"blocks.{i}."
        s1, sc1, g1, s2, sc2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        a = lin(mod(ln(h), s1, sc1), b + "attn.qkv").reshape(N, T, 3, H, D // H)
        q, k, v = a[:, :, 0].transpose(1, 2), a[:, :, 1].transpose(1, 2), a[:, :, 2].transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(N, T, D), b + "attn.proj")
        f = lin(F.gelu(lin(mod(ln(h), s2, sc2), b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + g2[:, None] * f
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(mod(ln(h), shift, scale), "final_layer.linear")  # (N, T, p*p*C), each token laid out (p, p, C)
    g = m.input_size // p
    out = torch.zeros(N, C, g * p, g * p)
    for tok in range(T):
        r, col = divmod(tok, g)
        out[:, :, r * p:(r + 1) * p, col * p:(col + 1) * p] = h[:, tok].reshape(N, p, p, C).permute(0, 3, 1, 2)
    return out


def test_forward_matches_plain_reference():
    m = perturbed().eval()
    x, t, y = inputs()
    with torch.no_grad():
        out = m(x, t, y)
    assert out.shape == (4, 8, 8, 8)
    torch.testing.assert_close(out, reference_forward(m, x, t, y), rtol=1e-4, atol=1e-4)


def test_learn_sigma_false_output_channels():
    m = perturbed(learn_sigma=False).eval()
    x, t, y = inputs(n=2)
    assert m.out_channels == 4
    assert m(x, t, y).shape == (2, 4, 8, 8)


def test_forward_with_cfg():
    m = perturbed().eval()
    x, t, y = inputs(n=2)
    xc = torch.cat([x, x])
    tc = torch.cat([t, t])
    yc = torch.cat([y, torch.full_like(y, m.null_class)])
    with torch.no_grad():
        plain = m(xc, tc, yc)
        one = m.forward_with_cfg(xc, tc, yc, cfg_scale=1.0)
        # cfg_scale=1 is exactly the conditional output; its eps is duplicated into the second half
        torch.testing.assert_close(one[:2], plain[:2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one[2:, :4], plain[:2, :4], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one[2:, 4:], plain[2:, 4:])  # sigma channels stay per half, as official

        s = 4.0
        cond, uncond = plain[:2], plain[2:]
        guided = uncond + s * (cond - uncond)
        all_ch = m.forward_with_cfg(xc, tc, yc, cfg_scale=s)
        three = m.forward_with_cfg(xc, tc, yc, cfg_scale=s, cfg_channels=3)
    assert all_ch.shape == three.shape == (4, 8, 8, 8)
    assert torch.equal(all_ch[:2, :4], all_ch[2:, :4]) and torch.equal(three[:2, :3], three[2:, :3])
    torch.testing.assert_close(all_ch[2:, 4:], uncond[:, 4:])
    torch.testing.assert_close(three[2:, 3:], uncond[:, 3:])
    # None: all in_channels (4) eps channels guided; the learned-sigma channels are the conditional ones.
    torch.testing.assert_close(all_ch[:2, :4], guided[:, :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_ch[:2, 4:], cond[:, 4:])
    # 3 (official quirk): channels 0-2 guided, channel 3 and sigma left at the conditional output.
    torch.testing.assert_close(three[:2, :3], guided[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(three[:2, 3:], cond[:, 3:])
    assert torch.equal(three[:, :3], all_ch[:, :3])
    assert not torch.allclose(three[:, 3], all_ch[:, 3])

    with pytest.raises(ValueError, match="even"):
        m.forward_with_cfg(xc[:3], tc[:3], yc[:3], cfg_scale=s)


# ----------------------------------------------------------------------------- label dropout


def test_drop_labels_helper():
    y = torch.tensor([3, 1, 4, 1])
    assert drop_labels(y, torch.tensor([True, False, False, True]), 10).tolist() == [10, 1, 4, 10]
    assert drop_labels(y, torch.tensor([0, 1, 0, 0]), 10).tolist() == [3, 10, 4, 1]
    with pytest.raises(ValueError, match="shape"):
        drop_labels(y, torch.tensor([True, False]), 10)


def test_force_drop_ids_drops_exactly_the_masked_labels_without_random_draws():
    m = perturbed(class_dropout_prob=0.5).train()
    x, t, y = inputs()
    mask = torch.tensor([True, False, True, False])
    y_null = torch.where(mask, m.null_class, y)
    assert m.null_class == 10
    with torch.no_grad():
        state = torch.get_rng_state()
        forced = m(x, t, y, force_drop_ids=mask)
        assert torch.equal(torch.get_rng_state(), state)  # no torch.rand: every choice comes from the caller
        forced_int = m(x, t, y, force_drop_ids=mask.long())
        explicit = m(x, t, y_null, force_drop_ids=torch.zeros(4, dtype=torch.bool))
        m.eval()
        forced_eval = m(x, t, y, force_drop_ids=mask)
        explicit_eval = m(x, t, y_null)
        cond_eval = m(x, t, y)
    assert torch.equal(forced, explicit) and torch.equal(forced_int, explicit)
    assert torch.equal(forced_eval, explicit_eval)
    assert not torch.allclose(forced_eval[0], cond_eval[0])  # the dropped sample really changed
    assert torch.equal(forced_eval[1], cond_eval[1])  # the kept one did not


def test_random_dropout_only_in_training_and_drops_once_per_sample(monkeypatch):
    m = perturbed(class_dropout_prob=1.0)
    x, t, y = inputs()
    null = torch.full_like(y, m.null_class)
    calls = []
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: calls.append(a) or real_rand(*a, **k))
    with torch.no_grad():
        m.eval()
        torch.testing.assert_close(m(x, t, y), reference_forward(m, x, t, y), rtol=1e-4, atol=1e-4)
        assert not calls  # eval mode never draws nor drops
        cond_eval = m(x, t, y)
        uncond_eval = m(x, t, null)
        m.train()
        dropped = m(x, t, y)
    assert calls == [(4,)]  # one draw of N values for the whole forward, not one per block
    assert torch.equal(dropped, uncond_eval)
    assert not torch.allclose(cond_eval, uncond_eval)


def test_no_null_class_without_dropout():
    m = perturbed(class_dropout_prob=0.0).train()
    assert m.y_embedder.embedding_table.num_embeddings == 10 and m.null_class is None
    x, t, y = inputs()
    with torch.no_grad():
        base = m(x, t, y)
        assert torch.equal(m(x, t, y, force_drop_ids=torch.zeros(4, dtype=torch.bool)), base)
    with pytest.raises(ValueError, match="null class"):
        m(x, t, y, force_drop_ids=torch.tensor([1, 0, 0, 0]))
    with pytest.raises(ValueError, match="class-conditional"):
        m.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), cfg_scale=2.0)


# ----------------------------------------------------------------------------- unconditional, qk-norm


def test_unconditional_model():
    m = perturbed(num_classes=0).train()
    assert m.y_embedder is None and m.null_class is None
    assert not any(k.startswith("y_embedder") for k in m.state_dict())
    x, t, _ = inputs()
    out = m(x, t)
    assert out.shape == (4, 8, 8, 8) and torch.isfinite(out).all()
    assert torch.equal(m(x, t, y=None), out)  # nothing random in the unconditional path
    with pytest.raises(ValueError, match="None for an unconditional"):
        m(x, t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="must be given"):
        perturbed()(x, t)


def test_qk_norm_adds_only_q_and_k_norm_params():
    base = set(tiny().state_dict())
    m = perturbed(qk_norm=True)
    extra = set(m.state_dict()) - base
    assert base <= set(m.state_dict())
    assert extra == {f"blocks.{i}.attn.{n}_norm.{w}" for i in range(2) for n in "qk" for w in ("weight", "bias")}
    assert m.blocks[0].attn.q_norm.normalized_shape == (16,)  # over head_dim
    x, t, y = inputs()
    out = m(x, t, y, force_drop_ids=torch.zeros(4, dtype=torch.bool))
    assert out.shape == (4, 8, 8, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert m.blocks[0].attn.q_norm.weight.grad is not None


# ----------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_same_outputs_and_grads(monkeypatch):
    plain = perturbed().train()
    ckpt = perturbed(gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real = model_mod.checkpoint
    monkeypatch.setattr(model_mod, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))

    x, t, y = inputs()
    mask = torch.tensor([False, True, False, False])
    results = []
    for m in (plain, ckpt):
        out = m(x, t, y, force_drop_ids=mask)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert calls == [{"use_reentrant": False}] * 2  # one per block, only for the checkpointed model
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)

    calls.clear()
    ckpt.eval()
    with torch.no_grad():
        torch.testing.assert_close(ckpt(x, t, y), plain.eval()(x, t, y), rtol=0, atol=0)
    assert not calls  # training mode only


# ----------------------------------------------------------------------------- presets and build_dit


def test_presets():
    expected = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert set(DIT_PRESETS) == {f"DiT-{s}/{p}" for s in expected for p in (2, 4, 8)}
    for s, (depth, hidden, heads) in expected.items():
        for p in (2, 4, 8):
            assert DIT_PRESETS[f"DiT-{s}/{p}"] == dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=p)


def test_build_dit_overrides():
    m = build_dit("DiT-S/2", input_size=8, in_channels=3, num_classes=5, learn_sigma=False, class_dropout_prob=0.2,
                  qk_norm=True, gradient_checkpointing=True, hidden_size=32, depth=1, num_heads=2, patch_size=4)
    assert (m.hidden_size, m.depth, m.num_heads, m.patch_size) == (32, 1, 2, 4)
    assert (m.in_channels, m.out_channels, m.num_classes, m.class_dropout_prob) == (3, 3, 5, 0.2)
    assert m.gradient_checkpointing and not isinstance(m.blocks[0].attn.q_norm, torch.nn.Identity)
    assert m.x_embedder.num_patches == 4 and m.pos_embed.shape == (1, 4, 32)
    assert m.y_embedder.embedding_table.num_embeddings == 6
    out = m(torch.randn(2, 3, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 4]))
    assert out.shape == (2, 3, 8, 8)
    with torch.device("meta"):
        partial = build_dit("DiT-B/4", input_size=32, in_channels=4, num_classes=1000, depth=3)
    assert (partial.depth, partial.hidden_size, partial.num_heads, partial.patch_size) == (3, 768, 12, 4)


def test_build_dit_errors():
    with pytest.raises(ValueError, match=r"unknown DiT preset 'DiT-M/2'.*DiT-XL/2.*DiT-S/8"):
        build_dit("DiT-M/2", input_size=32, in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="input_size 30 is not divisible by patch_size 4"):
        build_dit("DiT-S/4", input_size=30, in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="hidden_size 384 is not divisible by num_heads 5"):
        build_dit("DiT-S/2", input_size=32, in_channels=4, num_classes=10, num_heads=5)
    with pytest.raises(ValueError, match="expected latents of size 8x8"):
        tiny()(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([1]))
