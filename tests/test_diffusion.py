"""Objectives and samplers against independent re-derivations of the official DiT / ADM formulas."""

import math

import numpy as np
import pytest
import torch

from ditpipe.pipeline.diffusion import DDPM, Flow, make_objective, space_timesteps

from tiny import TINY_ARCH

T = 1000


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ref_schedule(num_timesteps=T):
    """The linear schedule, recomputed in float64 from its definition."""
    betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return betas, alphas_cumprod


#################################################################################
#                                  Schedule                                     #
#################################################################################

def test_schedule_values():
    d = DDPM()
    betas, ac = ref_schedule()
    assert d.num_timesteps == T and d.betas.dtype == np.float64
    assert d.betas[0] == pytest.approx(1e-4, abs=1e-15) and d.betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_array_equal(d.betas, betas)
    np.testing.assert_allclose(d.alphas_cumprod, ac, rtol=1e-14)
    assert np.all(np.diff(d.alphas_cumprod) < 0) and 0 < d.alphas_cumprod[-1] < d.alphas_cumprod[0] < 1
    # The posterior variance at t=0 is 0, so its log is clipped to t=1's value (official).
    post = betas[1:] * (1 - ac[:-1]) / (1 - ac[1:])
    np.testing.assert_allclose(d.posterior_log_variance_clipped[0], np.log(post[0]), rtol=1e-12)
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(post), rtol=1e-12)
    # FIXED_LARGE (no learn_sigma): betas, with t=0's replaced by the posterior variance at t=1 (official).
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    out = DDPM(learn_sigma=False).p_mean_variance(lambda x, ts: x, x, torch.tensor([0, 1, 999]))
    np.testing.assert_allclose(out["variance"][:, 0, 0, 0].numpy(), [post[0], betas[1], betas[999]], rtol=1e-12)
    np.testing.assert_allclose(out["log_variance"].exp().numpy(), out["variance"].numpy(), rtol=1e-12)


def test_q_sample_formula():
    d = DDPM()
    _, ac = ref_schedule()
    g = gen(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    a = torch.from_numpy(ac[t.numpy()]).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-12, atol=1e-12)
    # float32 inputs give float32 outputs (the schedule is cast to the input's dtype).
    x32 = d.q_sample(x0.float(), t, noise.float())
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32, x_t.float(), rtol=1e-5, atol=1e-6)


def test_sample_timesteps_uniform_and_keyed():
    d = DDPM()
    t = d.sample_timesteps(20000, gen(1), "cpu")
    assert t.dtype == torch.long and t.shape == (20000,)
    assert t.min() >= 0 and t.max() < T and t.min() < 5 and t.max() > 994
    assert abs(t.float().mean().item() - (T - 1) / 2) < 10
    torch.testing.assert_close(d.sample_timesteps(64, gen(5), "cpu"), d.sample_timesteps(64, gen(5), "cpu"))
    assert not torch.equal(d.sample_timesteps(64, gen(5), "cpu"), d.sample_timesteps(64, gen(6), "cpu"))
    with pytest.raises(ValueError, match="Generator"):
        d.sample_timesteps(4, None, "cpu")


#################################################################################
#                   Training losses vs an independent reference                 #
#################################################################################

def _phi(x):
    # The tanh approximation of the normal CDF that the official code uses.
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def ref_losses(x0, noise, t, out, learn_sigma):
    """Per-sample official DiT losses, written out in float64 numpy one sample at a time."""
    betas, ac = ref_schedule()
    x0, noise, out = (a.detach().double().numpy() for a in (x0, noise, out))
    C = x0.shape[1]
    mse, vb = [], []
    for i, ti in enumerate(t.tolist()):
        a, b = ac[ti], betas[ti]
        a_prev = ac[ti - 1] if ti > 0 else 1.0
        x_t = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i]
        eps = out[i, :C]
        mse.append(np.mean((noise[i] - eps) ** 2))
        if not learn_sigma:
            continue
        v = out[i, C:]
        coef1 = b * math.sqrt(a_prev) / (1 - a)
        coef2 = (1 - a_prev) * math.sqrt(1 - b) / (1 - a)
        post_var_t1 = betas[1] * (1 - ac[0]) / (1 - ac[1])
        true_logvar = math.log(post_var_t1 if ti == 0 else b * (1 - a_prev) / (1 - a))
        true_mean = coef1 * x0[i] + coef2 * x_t
        x0_pred = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
        model_mean = coef1 * x0_pred + coef2 * x_t
        frac = (v + 1) / 2
        logvar = frac * math.log(b) + (1 - frac) * true_logvar
        if ti > 0:
            kl = 0.5 * (-1 + logvar - true_logvar + np.exp(true_logvar - logvar)
                        + (true_mean - model_mean) ** 2 * np.exp(-logvar))
            vb.append(np.mean(kl) / math.log(2))
        else:
            inv_std = np.exp(-0.5 * logvar)
            centered = x0[i] - model_mean
            cdf_plus = _phi(inv_std * (centered + 1 / 255))
            cdf_min = _phi(inv_std * (centered - 1 / 255))
            logp = np.where(x0[i] < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                            np.where(x0[i] > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)),
                                     np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))
            vb.append(np.mean(-logp) / math.log(2))
    mse = np.array(mse)
    if not learn_sigma:
        return {"mse": mse, "loss": mse}
    vb = np.array(vb)
    return {"mse": mse, "vb": vb, "loss": mse + vb}


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_losses_match_reference(learn_sigma, dtype):
    d = DDPM(learn_sigma=learn_sigma)
    g = gen(3)
    N, C = 6, 3
    t = torch.tensor([0, 0, 1, 2, 500, 999])
    x0 = 1.5 * torch.randn(N, C, 4, 4, generator=g, dtype=dtype)  # values beyond ±0.999 hit the decoder's edge bins
    noise = torch.randn(N, C, 4, 4, generator=g, dtype=dtype)
    # A model output near the true noise, so the t=0 decoder likelihood is neither saturated nor trivial.
    eps = noise + 0.5 * torch.randn(N, C, 4, 4, generator=g, dtype=dtype)
    out = torch.cat([eps, torch.rand(N, C, 4, 4, generator=g, dtype=dtype) * 2 - 1], 1) if learn_sigma else eps
    seen = []

    def model_fn(x, ts):
        seen.append((x.clone(), ts.clone()))
        return out

    losses = d.training_losses(model_fn, x0, t, noise)
    ref = ref_losses(x0, noise, t, out, learn_sigma)
    assert set(losses) == set(ref)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    for key in ref:
        assert losses[key].shape == (N,) and losses[key].dtype == dtype
        np.testing.assert_allclose(losses[key].double().numpy(), ref[key], **tol, err_msg=key)
    # The model saw x_t and the original (long) timesteps.
    (x_seen, t_seen), = seen
    assert t_seen.dtype == torch.long and torch.equal(t_seen, t)
    torch.testing.assert_close(x_seen, d.q_sample(x0, t, noise))
    if learn_sigma:
        assert torch.all(losses["vb"] > 0)


def test_low_precision_inputs_compute_in_float32():
    # Official looks the schedule up in float32; bf16 would round 1/sqrt(ᾱ_999) ≈ 158 to 3 significant digits.
    g = gen(6)
    x0 = torch.randn(4, 2, 4, 4, generator=g)
    noise = torch.randn(4, 2, 4, 4, generator=g)
    out = torch.randn(4, 4, 4, 4, generator=g)
    t = torch.tensor([0, 5, 500, 999])
    d = DDPM(learn_sigma=True)
    low = d.training_losses(lambda x, ts: out.bfloat16(), x0.bfloat16(), t, noise.bfloat16())
    # The same bf16-rounded values, computed in float32 from the start.
    ref = d.training_losses(lambda x, ts: out.bfloat16().float(), x0.bfloat16().float(), t, noise.bfloat16().float())
    for key in ("mse", "vb", "loss"):
        assert low[key].dtype == torch.float32
        torch.testing.assert_close(low[key], ref[key])
    tf = torch.tensor([0.1, 0.3, 0.5, 0.9])
    assert make_objective("flow", False).training_losses(lambda x, ts: x, x0.bfloat16(), tf, noise.bfloat16())["loss"].dtype == torch.float32


def test_vb_uses_frozen_eps():
    d = DDPM(learn_sigma=True)
    g = gen(4)
    x0 = torch.randn(4, 2, 4, 4, generator=g)
    noise = torch.randn(4, 2, 4, 4, generator=g)
    out = torch.randn(4, 4, 4, 4, generator=g).requires_grad_(True)
    t = torch.tensor([0, 3, 300, 900])
    losses = d.training_losses(lambda x, ts: out, x0, t, noise)
    (vb_grad,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert torch.all(vb_grad[:, :2] == 0)  # the bound cannot move the mean prediction
    assert vb_grad[:, 2:].abs().sum() > 0  # but it trains the variance channels
    (mse_grad,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert torch.all(mse_grad[:, 2:] == 0) and mse_grad[:, :2].abs().sum() > 0


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_perfect_eps_predictor_has_zero_mse(learn_sigma):
    d = DDPM(learn_sigma=learn_sigma)
    g = gen(5)
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    noise = torch.randn(5, 4, 8, 8, generator=g)
    t = d.sample_timesteps(5, g, "cpu")
    extra = [torch.zeros_like(noise)] if learn_sigma else []
    losses = d.training_losses(lambda x, ts: torch.cat([noise, *extra], 1), x0, t, noise)
    assert torch.all(losses["mse"] == 0)


def test_wrong_output_channels_are_refused():
    x0 = torch.zeros(2, 4, 4, 4)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="8 channels"):
        DDPM(learn_sigma=True).training_losses(lambda x, ts: x, x0, t, x0)
    with pytest.raises(ValueError, match="4 channels"):
        DDPM(learn_sigma=False).training_losses(lambda x, ts: torch.cat([x, x], 1), x0, t, x0)


#################################################################################
#                                 Respacing                                     #
#################################################################################

def test_space_timesteps_official_outputs():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))
    assert len(space_timesteps(1000, [10])) == 10 and len(space_timesteps(1000, 10)) == 10
    s250 = space_timesteps(1000, "250")
    assert len(s250) == 250 and min(s250) == 0 and max(s250) == 999
    assert space_timesteps(1000, "1000") == set(range(1000))
    # The docstring's example on 100 steps, derived by hand: sections of 34, 33, 33 steps; section k keeps
    # start + round(j * (size - 1) / (count - 1)) for j < count.
    expected = (
        [0, 4, 7, 11, 15, 18, 22, 26, 29, 33]
        + [34 + x for x in [0, 2, 5, 7, 9, 11, 14, 16, 18, 21, 23, 25, 27, 30, 32]]
        + [67 + x for x in [0, 2, 3, 5, 7, 8, 10, 12, 13, 15, 17, 19, 20, 22, 24, 25, 27, 29, 30, 32]]
    )
    assert space_timesteps(100, [10, 15, 20]) == set(expected)
    assert space_timesteps(100, "10,15,20") == set(expected)
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")  # no integer stride gives exactly 999 steps
    with pytest.raises(ValueError):
        space_timesteps(10, [20])


def test_respaced_betas_reproduce_kept_alphas_cumprod():
    d = DDPM()
    for steps in (250, "50", "ddim25", [10, 5]):
        sp = d.respaced(steps)
        kept = sorted(space_timesteps(T, str(steps) if isinstance(steps, int) else steps))
        assert list(sp.timestep_map) == kept and sp.num_timesteps == len(kept) and sp.original_num_steps == T
        np.testing.assert_allclose(sp.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-12)
        assert sp.learn_sigma == d.learn_sigma
    full = d.respaced(None)
    np.testing.assert_allclose(full.betas, d.betas, rtol=1e-10)
    # Respacing a respaced process composes the maps.
    twice = d.respaced(100).respaced(10)
    assert all(i in set(d.respaced(100).timestep_map) for i in twice.timestep_map)
    np.testing.assert_allclose(twice.alphas_cumprod, d.alphas_cumprod[twice.timestep_map], rtol=1e-12)


def test_respaced_model_sees_original_timesteps():
    d = DDPM(learn_sigma=False)
    sp = d.respaced(10)
    seen = []

    def model_fn(x, ts):
        seen.append(ts.clone())
        return torch.zeros_like(x)

    d.ddim_sample_loop(model_fn, (2, 1, 2, 2), 10, gen(0), "cpu")
    assert [s.tolist() for s in seen] == [[int(i)] * 2 for i in reversed(sp.timestep_map)]
    assert all(s.dtype == torch.long for s in seen)


#################################################################################
#                                  Samplers                                     #
#################################################################################

def oracle(x_star, learn_sigma, v=0.0):
    """ε̂ for a point mass at x_star, from the original schedule at the original timestep the model receives."""
    _, ac = ref_schedule()

    def model_fn(x, ts):
        a = torch.from_numpy(ac[ts.numpy()]).to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x_star) / (1 - a).sqrt()
        return torch.cat([eps, torch.full_like(eps, v)], 1) if learn_sigma else eps

    return model_fn


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_ddim_oracle_lands_on_data_point(learn_sigma):
    x_star = torch.randn(3, 4, 4, 4, generator=gen(7))
    d = DDPM(learn_sigma=learn_sigma)
    out = d.ddim_sample_loop(oracle(x_star, learn_sigma), (3, 4, 4, 4), 50, gen(8), "cpu")
    torch.testing.assert_close(out, x_star, atol=1e-3, rtol=0)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_ancestral_oracle_lands_on_data_point(learn_sigma):
    x_star = torch.randn(3, 4, 4, 4, generator=gen(7))
    d = DDPM(learn_sigma=learn_sigma)
    out = d.p_sample_loop(oracle(x_star, learn_sigma, v=0.3), (3, 4, 4, 4), 100, gen(9), "cpu")
    torch.testing.assert_close(out, x_star, atol=1e-2, rtol=0)


def test_ancestral_is_deterministic_per_seed():
    d = DDPM(learn_sigma=True)

    def model_fn(x, ts):  # an imperfect model, so the injected noise shows in the result
        return torch.cat([0.5 * x, torch.zeros_like(x)], 1)

    shape = (2, 3, 4, 4)
    a = d.p_sample_loop(model_fn, shape, 20, gen(11), "cpu")
    b = d.p_sample_loop(model_fn, shape, 20, gen(11), "cpu")
    c = d.p_sample_loop(model_fn, shape, 20, gen(12), "cpu")
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # The learned variance is used: another v changes the result for the same seed and noise.
    noise = torch.randn(shape, generator=gen(13))
    lo = d.p_sample_loop(lambda x, ts: torch.cat([0.5 * x, -torch.ones_like(x)], 1), shape, 20, gen(1), "cpu",
                         noise=noise)
    hi = d.p_sample_loop(lambda x, ts: torch.cat([0.5 * x, torch.ones_like(x)], 1), shape, 20, gen(1), "cpu",
                         noise=noise)
    assert not torch.allclose(lo, hi)


def ref_ancestral(model_fn, noise, steps, learn_sigma, generator):
    """Respaced ancestral sampling, written out from the official formulas in float64, drawing noise in the same
    order as the official loop (the initial noise, then one draw per step, t=0 included)."""
    _, ac_full = ref_schedule()
    kept = sorted(space_timesteps(T, str(steps)))
    ac = ac_full[kept]
    betas = 1 - ac / np.append(1.0, ac[:-1])
    x = noise.clone()
    C = x.shape[1]
    for i in reversed(range(len(kept))):
        a, b = ac[i], betas[i]
        a_prev = ac[i - 1] if i > 0 else 1.0
        post_var = lambda j: betas[j] * (1 - (ac[j - 1] if j > 0 else 1.0)) / (1 - ac[j])  # noqa: E731
        out = model_fn(x, torch.full((x.shape[0],), kept[i], dtype=torch.long))
        eps = out[:, :C]
        x0_pred = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        mean = (b * math.sqrt(a_prev) / (1 - a)) * x0_pred + ((1 - a_prev) * math.sqrt(1 - b) / (1 - a)) * x
        if learn_sigma:
            min_log = math.log(post_var(1) if i == 0 else post_var(i))
            frac = (out[:, C:] + 1) / 2
            log_var = frac * math.log(b) + (1 - frac) * min_log
        else:
            log_var = torch.full_like(x, math.log(post_var(1) if i == 0 else b))  # FIXED_LARGE
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = mean + (0.0 if i == 0 else 1.0) * torch.exp(0.5 * log_var) * z
    return x


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_ancestral_matches_reference_loop(learn_sigma):
    shape = (2, 2, 3, 3)

    def model_fn(x, ts):
        eps = 0.7 * x + 0.001 * ts.to(x.dtype).view(-1, 1, 1, 1)
        return torch.cat([eps, torch.tanh(x)], 1) if learn_sigma else eps

    noise = torch.randn(shape, generator=gen(21), dtype=torch.float64)
    ours = DDPM(learn_sigma=learn_sigma).p_sample_loop(model_fn, shape, 25, gen(22), "cpu", noise=noise)
    ref = ref_ancestral(model_fn, noise, 25, learn_sigma, gen(22))
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_ddim_is_deterministic_given_noise_and_draws_initial_noise_from_generator():
    d = DDPM(learn_sigma=True)

    def model_fn(x, ts):
        return torch.cat([0.5 * x, torch.zeros_like(x)], 1)

    shape = (2, 3, 4, 4)
    a = d.ddim_sample_loop(model_fn, shape, 10, gen(1), "cpu")
    b = d.ddim_sample_loop(model_fn, shape, 10, gen(1), "cpu", noise=torch.randn(shape, generator=gen(1)))
    assert torch.equal(a, b)
    assert not torch.allclose(a, d.ddim_sample_loop(model_fn, shape, 10, gen(2), "cpu"))


#################################################################################
#                                    Flow                                       #
#################################################################################

def test_flow_logit_normal_timesteps():
    f = make_objective("flow", False)
    t = f.sample_timesteps(20000, gen(0), "cpu")
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert torch.all((t > 0) & (t < 1))
    assert abs(t.median().item() - 0.5) < 0.02
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    assert torch.equal(f.sample_timesteps(16, gen(3), "cpu"), f.sample_timesteps(16, gen(3), "cpu"))
    assert not torch.equal(f.sample_timesteps(16, gen(3), "cpu"), f.sample_timesteps(16, gen(4), "cpu"))


def test_flow_timestep_mean_and_std_shape_the_draws_and_the_defaults_keep_the_old_ones():
    from ditpipe.pipeline.config import DiffusionConfig

    plain = make_objective("flow", False, DiffusionConfig(objective="flow"))
    # The defaults draw exactly sigmoid(N(0, 1)), the draws of every flow run from before the two keys existed.
    assert torch.equal(plain.sample_timesteps(4096, gen(5), "cpu"), torch.sigmoid(torch.randn(4096, generator=gen(5))))
    narrow = make_objective("flow", False, DiffusionConfig(objective="flow", timestep_mean=0.5, timestep_std=0.6))
    t = narrow.sample_timesteps(20000, gen(0), "cpu")
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.03 and abs(logit.std().item() - 0.6) < 0.02
    assert torch.allclose(logit, 0.5 + 0.6 * torch.randn(20000, generator=gen(0)), atol=1e-4)  # the same n, moved
    assert "timestep_std=0.6" in repr(narrow)


def test_flow_training_target():
    f = make_objective("flow", False)
    g = gen(1)
    x0 = torch.randn(4, 3, 4, 4, generator=g)
    noise = torch.randn(4, 3, 4, 4, generator=g)
    t = f.sample_timesteps(4, g, "cpu")
    seen = []

    def perfect(x, ts):
        seen.append((x.clone(), ts.clone()))
        return torch.cat([noise - x0, torch.randn(4, 3, 4, 4, generator=g)], 1)  # extra channels are ignored

    losses = f.training_losses(perfect, x0, t, noise)
    assert set(losses) == {"loss"} and losses["loss"].shape == (4,)
    torch.testing.assert_close(losses["loss"], torch.zeros(4), atol=1e-12, rtol=0)
    (x_seen, t_seen), = seen
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_seen, (1 - tb) * x0 + tb * noise)
    torch.testing.assert_close(t_seen, t * 1000)
    zero = f.training_losses(lambda x, ts: torch.zeros_like(x), x0, t, noise)["loss"]
    torch.testing.assert_close(zero, ((noise - x0) ** 2).mean(dim=(1, 2, 3)))


def point_mass_velocity(x_star):
    def model_fn(x, ts):
        t = (ts / 1000).view(-1, 1, 1, 1)
        eps = (x - (1 - t) * x_star) / t
        return eps - x_star

    return model_fn


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_samplers_land_on_point_mass(sampler):
    x_star = torch.randn(2, 3, 4, 4, generator=gen(2))
    calls = []
    out = make_objective("flow", False).sample(point_mass_velocity(x_star), (2, 3, 4, 4), sampler, 10, gen(3), "cpu",
                        progress=lambda i, n: calls.append((i, n)))
    torch.testing.assert_close(out, x_star, atol=1e-4, rtol=0)
    assert calls == [(i, 10) for i in range(1, 11)]


def gaussian_velocity(mu, s):
    """The exact marginal velocity when x0 ~ N(mu, s²) elementwise: E[ε - x0 | x_t]."""
    def model_fn(x, ts):
        t = (ts.double() / 1000).view(-1, 1, 1, 1)
        a = 1 - t
        var = a ** 2 * s ** 2 + t ** 2
        return ((t - a * s ** 2) / var * (x - a * mu) - mu).to(x.dtype)

    return model_fn


def test_heun_beats_euler_on_curved_field():
    mu, s = 1.0, 0.5
    noise = torch.randn(4, 1, 4, 4, generator=gen(4), dtype=torch.float64)
    exact = mu + s * noise  # the ODE maps z at t=1 to mu + s z at t=0
    f = make_objective("flow", False)
    calls = {"n": 0}
    field = gaussian_velocity(mu, s)

    def counted(x, ts):
        calls["n"] += 1
        return field(x, ts)

    def err(sampler, steps, fn=field):
        return (f.sample(fn, noise.shape, sampler, steps, gen(0), "cpu", noise=noise) - exact).abs().max().item()

    euler16, heun16 = err("euler", 16), err("heun", 16, counted)
    assert calls["n"] == 2 * 16 - 1  # the last step, landing on t=0, falls back to Euler
    assert heun16 < euler16 / 5, (heun16, euler16)
    # Convergence orders: halving the step halves Euler's error (1st order) and quarters Heun's (2nd order).
    assert 1.7 < euler16 / err("euler", 32) < 2.3
    assert 3.5 < heun16 / err("heun", 32) < 4.5


def test_flow_sample_is_deterministic_per_seed():
    f = make_objective("flow", False)
    field = gaussian_velocity(1.0, 0.5)
    a = f.sample(field, (2, 1, 3, 3), "heun", 4, gen(5), "cpu")
    assert torch.equal(a, f.sample(field, (2, 1, 3, 3), "heun", 4, gen(5), "cpu"))
    assert not torch.allclose(a, f.sample(field, (2, 1, 3, 3), "heun", 4, gen(6), "cpu"))


#################################################################################
#                         Randomness and the factory                            #
#################################################################################

def test_global_rng_untouched():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    g = gen(0)
    shape = (2, 2, 4, 4)
    d, f = DDPM(learn_sigma=True), make_objective("flow", False)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    t = d.sample_timesteps(2, g, "cpu")
    d.q_sample(x0, t, noise)
    d.training_losses(lambda x, ts: torch.cat([x, x], 1), x0, t, noise)
    DDPM(learn_sigma=False).training_losses(lambda x, ts: x, x0, t, noise)
    ddpm_model = lambda x, ts: torch.cat([0.5 * x, torch.zeros_like(x)], 1)  # noqa: E731
    d.p_sample_loop(ddpm_model, shape, 5, g, "cpu")
    d.ddim_sample_loop(ddpm_model, shape, 5, g, "cpu")
    for sampler in ("ddpm", "ddim"):
        d.sample(ddpm_model, shape, sampler, 3, g, "cpu")
    tf = f.sample_timesteps(2, g, "cpu")
    f.training_losses(lambda x, ts: x, x0, tf, noise)
    for sampler in ("euler", "heun"):
        f.sample(lambda x, ts: x, shape, sampler, 3, g, "cpu")
    assert torch.equal(torch.get_rng_state(), before)


def test_make_objective_and_sampler_names():
    d = make_objective("ddpm", learn_sigma=True)
    assert isinstance(d, DDPM) and d.learn_sigma and d.name == "ddpm"
    assert d.out_channels_factor == 2 and d.default_sampler == "ddpm"
    d1 = make_objective("ddpm", learn_sigma=False)
    assert d1.out_channels_factor == 1 and not d1.learn_sigma
    f = make_objective("flow", learn_sigma=True)
    assert isinstance(f, Flow) and f.name == "flow" and f.out_channels_factor == 1 and f.default_sampler == "euler"
    with pytest.raises(ValueError, match="ddpm, flow"):
        make_objective("edm", learn_sigma=True)
    model = lambda x, ts: torch.cat([x, x], 1)  # noqa: E731
    with pytest.raises(ValueError, match="ddpm, ddim"):
        d.sample(model, (1, 1, 2, 2), "euler", 2, gen(0), "cpu")
    with pytest.raises(ValueError, match="euler, heun"):
        f.sample(model, (1, 1, 2, 2), "ddim", 2, gen(0), "cpu")
    # The default sampler, with progress reports over the respaced steps.
    calls = []
    d.sample(lambda x, ts: torch.cat([0.5 * x, torch.zeros_like(x)], 1), (1, 1, 2, 2), None, 5, gen(0), "cpu",
             progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 5) for i in range(1, 6)]


def test_with_tiny_dit():
    from ditpipe.pipeline.model import DiT

    torch.manual_seed(0)  # weight init only; the objectives below draw from explicit generators
    for objective in ("ddpm", "flow"):
        obj = make_objective(objective, learn_sigma=True)
        model = DiT(input_size=8, patch_size=4, in_channels=4, **TINY_ARCH,
                    num_classes=0, learn_sigma=obj.out_channels_factor == 2)
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # leave adaLN-Zero's all-zero output
        g = gen(0)
        x0 = torch.randn(3, 4, 8, 8, generator=g)
        noise = torch.randn(3, 4, 8, 8, generator=g)
        t = obj.sample_timesteps(3, g, "cpu")
        loss = obj.training_losses(lambda x, ts: model(x, ts), x0, t, noise)["loss"]
        assert loss.shape == (3,) and torch.isfinite(loss).all()
        loss.mean().backward()
        assert model.final_layer.linear.weight.grad.abs().sum() > 0
        model.eval()
        for sampler in obj.samplers:
            out = obj.sample(lambda x, ts: model(x, ts), (2, 4, 8, 8), sampler, 3, gen(1), "cpu")
            assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
