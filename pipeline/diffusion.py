"""Training objectives and samplers: DDPM-ε (official DiT / ADM GaussianDiffusion) and rectified flow.

`DDPM` is the GaussianDiffusion that DiT's `create_diffusion` builds for training and sampling: linear betas,
ε-prediction, MSE loss, and with learn_sigma the LEARNED_RANGE variance trained by the variational bound on a frozen
ε. Schedules are float64 numpy arrays, as official; they are indexed, then cast to the input's device and dtype
(float32 for fp16/bf16 inputs, like official's float32 lookups). Respacing is the official `space_timesteps` +
`SpacedDiffusion`: betas are recomputed from the kept alphas_cumprod, and the model always sees original timesteps
(rescale_timesteps=False).

`Flow` is rectified flow with velocity prediction: x_t = (1 - t) x0 + t ε, target ε - x0, logit-normal t, and the
model sees t * 1000 so its timestep embedding covers the same range as DDPM's.

Every random draw takes an explicit torch.Generator (docs/design.md, Randomness); nothing here touches the global RNG.
Classifier-free guidance is the caller's job: samplers only call model_fn(x, t).
"""

import math

import numpy as np
import torch

from ditpipe.pipeline.config import DiffusionConfig
from ditpipe.pipeline.samplers import SAMPLERS

OBJECTIVES = ("ddpm", "flow")


#################################################################################
#                    Gaussian helpers (official diffusion_utils)                 #
#################################################################################

def mean_flat(tensor):
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats; arguments broadcast."""
    tensor = next((obj for obj in (mean1, logvar1, mean2, logvar2) if isinstance(obj, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    # Scalars must be tensors for torch.exp; broadcasting does the rest.
    logvar1, logvar2 = [x if isinstance(x, torch.Tensor) else torch.tensor(x).to(tensor) for x in (logvar1, logvar2)]
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by the official code."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood (nats, elementwise) of x under a Gaussian discretized to 8-bit bins of [-1, 1], as official."""
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    # The outermost bins extend to ±infinity.
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )  # like x


#################################################################################
#                                 Respacing                                     #
#################################################################################

def space_timesteps(num_timesteps, section_counts):
    """
    The timesteps to keep from a process of num_timesteps steps, exactly as official `space_timesteps`.

    section_counts: an int (one section), a list of ints (one count per equal-sized section), a string of
    comma-separated counts ("250", "10,15,20"), or "ddimN" for the DDIM paper's fixed integer stride.
    For 300 steps and [10, 15, 20], the first 100 steps are strided to 10 steps, the next 100 to 15, the last 100 to 20.
    Returns a set of original timestep indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {desired_count} steps out of {num_timesteps} "
                             "with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def linear_beta_schedule(num_timesteps, beta_start, beta_end):
    """Ho et al.'s linear betas in float64 (official get_beta_schedule("linear"))."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def _require_generator(generator):
    # A draw from the global RNG would make the run depend on whatever else consumed it (docs/design.md, Randomness).
    if not isinstance(generator, torch.Generator):
        raise ValueError("pass an explicit torch.Generator for random draws; the global RNG is never used")
    return generator


def _randn(shape, generator, device, dtype=torch.float32):
    if hasattr(generator, "randn"):  # per-sample keyed streams (pipeline.generate.SampleNoise)
        return generator.randn(tuple(shape), device, dtype)
    return torch.randn(tuple(shape), generator=_require_generator(generator), device=device, dtype=dtype)


def _compute_dtype(x):
    """float32/float64 inputs compute in their own dtype; fp16/bf16 ones in float32, as official's float32 tables."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _bcast(values, ndim):
    """(N,) -> (N, 1, ..., 1) with ndim dimensions in all."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def at_level(model_fn, level: float):
    """The model function for a call at noise `level` (0 data, 1 noise), known on the host by the sampler loop: one
    that depends on the level (guidance intervals, pipeline.generate.ByLevel) says which function, any other is
    itself."""
    pick = getattr(model_fn, "at_level", None)
    return model_fn if pick is None else pick(level)


def _unknown_sampler(sampler, valid):
    return ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(valid)}")


#################################################################################
#                                     DDPM                                      #
#################################################################################

class DDPM:
    """
    Official DiT GaussianDiffusion (ADM): ε-prediction, MSE loss, LEARNED_RANGE variance trained with the vb term when
    learn_sigma, FIXED_LARGE variance otherwise. A respaced copy (see `respaced`) has fewer steps and maps its
    timestep indices back to the original process through `timestep_map` before calling the model.
    """

    name = "ddpm"
    samplers = tuple(SAMPLERS["ddpm"])
    default_sampler = samplers[0]

    def __init__(self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, learn_sigma=True):
        self._setup(linear_beta_schedule(num_timesteps, beta_start, beta_end), learn_sigma,
                    np.arange(num_timesteps), num_timesteps)

    @classmethod
    def from_betas(cls, betas, learn_sigma=True, timestep_map=None, original_num_steps=None):
        """A process with the given float64 betas; timestep_map[i] is the timestep the model sees for index i."""
        obj = cls.__new__(cls)
        betas = np.asarray(betas, dtype=np.float64)
        timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        obj._setup(betas, learn_sigma, timestep_map, len(betas) if original_num_steps is None else original_num_steps)
        return obj

    def _setup(self, betas, learn_sigma, timestep_map, original_num_steps):
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array of values in (0, 1]")
        if len(timestep_map) != len(betas):
            raise ValueError(f"timestep_map has {len(timestep_map)} entries for {len(betas)} betas")
        self.learn_sigma = bool(learn_sigma)
        self.out_channels_factor = 2 if self.learn_sigma else 1
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = np.asarray(timestep_map, dtype=np.int64)
        self.original_num_steps = int(original_num_steps)
        self._tables = {}  # (name, device) -> tensor, so a step does not re-upload the schedule

        # Float64 throughout, as official, so the schedule is the same on every device.
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0, so its log is clipped to the value at t = 1.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(betas) > 1 else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # FIXED_LARGE: betas, with the first one replaced by the posterior variance for a better decoder likelihood.
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:]) if len(betas) > 1 else betas
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    def __repr__(self):
        return (f"DDPM(num_timesteps={self.num_timesteps}, original_num_steps={self.original_num_steps}, "
                f"learn_sigma={self.learn_sigma})")

    def noise_level(self, t_model: float) -> float:
        """The model-time argument (an original timestep, a host number) as a noise level in [0, 1]: 0 is data, 1
        pure noise."""
        return float(t_model) / (self.original_num_steps - 1)

    # -- schedule lookup -------------------------------------------------------------------------------------------

    def _table(self, name, device):
        key = (name, str(device))
        if key not in self._tables:
            table = torch.from_numpy(np.ascontiguousarray(getattr(self, name)))
            if table.dtype == torch.float64 and torch.device(device).type == "mps":
                table = table.float()  # MPS has no float64
            self._tables[key] = table.to(device)
        return self._tables[key]

    def _extract(self, name, t, like):
        """Index the float64 schedule `name` at t (N,) and broadcast to like's shape, in like's dtype (float32 for
        fp16/bf16 inputs: official casts to float32, and 1/sqrt(ᾱ) ≈ 158 at t = 999 needs more than bf16's bits)."""
        values = self._table(name, t.device)[t]  # (N,)
        return _bcast(values.to(_compute_dtype(like)), like.ndim).expand(like.shape)  # like's shape

    # -- respacing -------------------------------------------------------------------------------------------------

    def respaced(self, steps):
        """
        The official SpacedDiffusion for `steps` (int, list, "250", "10,15,20", "ddimN"; None or "" keeps all):
        betas recomputed from the kept alphas_cumprod, and `timestep_map` giving the original timestep of each index.
        """
        if steps is None or steps == "":
            steps = [self.num_timesteps]
        if isinstance(steps, (int, np.integer)):
            steps = str(int(steps))  # the official sample.py passes str(num_sampling_steps)
        use_timesteps = space_timesteps(self.num_timesteps, steps)
        last_alpha_cumprod = 1.0
        new_betas, kept = [], []
        for i, alpha_cumprod in enumerate(self.alphas_cumprod):
            if i in use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                kept.append(i)
        # Compose with our own map, so respacing a respaced process still reaches original timesteps.
        return DDPM.from_betas(np.array(new_betas), self.learn_sigma, self.timestep_map[kept], self.original_num_steps)

    def _model(self, model_fn, x, t):
        """Call the model with original timesteps (official _WrappedModel; rescale_timesteps=False)."""
        map_tensor = self._table("timestep_map", t.device)  # (T,) long
        return model_fn(x, map_tensor[t].to(t.dtype))  # (N, C * factor, H, W)

    # -- forward process and training ------------------------------------------------------------------------------

    def sample_timesteps(self, n, generator, device):
        """Uniform timestep indices in [0, T): (n,) long."""
        return torch.randint(0, self.num_timesteps, (n,), generator=_require_generator(generator), device=device)

    def fixed_timesteps(self, k, device):
        """k evenly spaced timestep indices, the midpoints of k equal bins of [0, T): (k,) long (50, 150, ..., 950
        for k = 10). The held-out loss evaluates at these, so its curve has no timestep sampling noise."""
        return ((torch.arange(k, dtype=torch.float64) + 0.5) * self.num_timesteps / k).long().to(device)  # (k,)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, x0 has {tuple(x0.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x0) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)  # (N, C, H, W)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x0
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)  # (N, C, H, W)
        variance = self._extract("posterior_variance", t, x_t)  # (N, C, H, W)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t)  # (N, C, H, W)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)  # (N, C, H, W)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))  # (N, C, H, W)

    def _check_output(self, model_output, x):
        channels = x.shape[1] * self.out_channels_factor
        if model_output.shape != (x.shape[0], channels, *x.shape[2:]):
            raise ValueError(f"model output has shape {tuple(model_output.shape)}; expected {channels} channels "
                             f"for {x.shape[1]}-channel inputs with learn_sigma={self.learn_sigma}")

    def p_mean_variance_from_output(self, model_output, x, t, clip_denoised=False):
        """p(x_{t-1} | x_t) from a raw model output, as official p_mean_variance (ε-prediction)."""
        self._check_output(model_output, x)
        model_output = model_output.to(_compute_dtype(x))
        if self.learn_sigma:
            eps, model_var_values = torch.split(model_output, x.shape[1], dim=1)  # 2 x (N, C, H, W)
            min_log = self._extract("posterior_log_variance_clipped", t, x)  # (N, C, H, W)
            max_log = self._extract("log_betas", t, x)  # (N, C, H, W)
            # v in [-1, 1] spans [posterior variance, beta] in log space (LEARNED_RANGE).
            frac = (model_var_values + 1) / 2  # (N, C, H, W)
            log_variance = frac * max_log + (1 - frac) * min_log  # (N, C, H, W)
            variance = torch.exp(log_variance)  # (N, C, H, W)
        else:
            eps = model_output  # (N, C, H, W)
            variance = self._extract("fixed_large_variance", t, x)  # (N, C, H, W)
            log_variance = self._extract("fixed_large_log_variance", t, x)  # (N, C, H, W)
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)  # (N, C, H, W)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)  # (N, C, H, W)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model_fn, x, t, clip_denoised=False):
        return self.p_mean_variance_from_output(self._model(model_fn, x, t), x, t, clip_denoised)

    def _vb_terms_bpd(self, model_output, x0, x_t, t):
        """Official _vb_terms_bpd (clip_denoised=False): KL in bits per dim for t > 0, decoder NLL for t = 0. (N,)"""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])  # (N, C, H, W)
        kl = mean_flat(kl) / math.log(2.0)  # (N,)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"])  # (N, C, H, W)
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)  # (N,)
        return torch.where(t == 0, decoder_nll, kl)  # (N,)

    def training_losses(self, model_fn, x0, t, noise):
        """
        Per-sample losses (N,) for timestep indices t: "mse" on ε, and with learn_sigma "vb" (the variational bound for
        the variance channels, on a frozen ε so it cannot move the mean); "loss" = mse (+ vb).
        """
        x_t = self.q_sample(x0, t, noise)  # (N, C, H, W)
        model_output = self._model(model_fn, x_t, t)  # (N, C * factor, H, W)
        self._check_output(model_output, x_t)
        model_output = model_output.to(_compute_dtype(x0))  # fp32 losses even for autocast outputs
        terms = {}
        if self.learn_sigma:
            eps, model_var_values = torch.split(model_output, x0.shape[1], dim=1)  # 2 x (N, C, H, W)
            # Learn the variance with the bound, but don't let the bound affect the mean prediction.
            frozen_out = torch.cat([eps.detach(), model_var_values], dim=1)  # (N, 2C, H, W)
            terms["vb"] = self._vb_terms_bpd(frozen_out, x0, x_t, t)  # (N,)
        else:
            eps = model_output  # (N, C, H, W)
        terms["mse"] = mean_flat((noise - eps) ** 2)  # (N,)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]  # (N,)
        return terms

    # -- samplers --------------------------------------------------------------------------------------------------

    def p_sample(self, model_fn, x, t, generator, clip_denoised=False):
        """One ancestral step x_t -> x_{t-1} (official p_sample: noise is drawn every step but not added at t = 0)."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised)
        noise = _randn(x.shape, generator, x.device, x.dtype)  # (N, C, H, W)
        nonzero_mask = _bcast((t != 0).to(x.dtype), x.ndim)  # (N, 1, 1, 1)
        return out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise  # (N, C, H, W)

    def ddim_step(self, model_fn, x, t, generator=None, clip_denoised=False, eta=0.0):
        """One DDIM step (official ddim_sample, eq. 12 of the DDIM paper)."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised)
        # Re-derive ε from x0, as official, so clipping is reflected in it.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])  # (N, C, H, W)
        alpha_bar = self._extract("alphas_cumprod", t, x)  # (N, C, H, W)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)  # (N, C, H, W)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        if eta > 0:  # with eta = 0 the step is deterministic, so no draw is spent
            noise = _randn(x.shape, generator, x.device, x.dtype)  # (N, C, H, W)
            sample = sample + _bcast((t != 0).to(x.dtype), x.ndim) * sigma * noise
        return sample  # (N, C, H, W)

    def _loop(self, step_fn, model_fn, shape, steps, generator, device, noise, progress):
        spaced = self.respaced(steps)
        x = noise.to(device) if noise is not None else _randn(shape, generator, device)  # (N, C, H, W)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(x.shape)}, expected {tuple(shape)}")
        total = spaced.num_timesteps
        with torch.no_grad():
            for k, i in enumerate(reversed(range(total))):
                t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)  # (N,)
                fn = at_level(model_fn, spaced.noise_level(spaced.timestep_map[i]))  # the level from the host
                x = step_fn(spaced, fn, x, t)  # (N, C, H, W)
                if progress is not None:
                    progress(k + 1, total)
        return x

    def p_sample_loop(self, model_fn, shape, steps, generator, device, noise=None, clip_denoised=False,
                      progress=None):
        """Ancestral sampling over the official respacing of `steps` (DiT samples with 250 and clip_denoised=False)."""
        return self._loop(lambda sp, fn, x, t: sp.p_sample(fn, x, t, generator, clip_denoised),
                          model_fn, shape, steps, generator, device, noise, progress)

    def ddim_sample_loop(self, model_fn, shape, steps, generator, device, noise=None, clip_denoised=False,
                         progress=None, eta=0.0):
        """DDIM (eta 0 by default: deterministic given the initial noise) over the same respacing."""
        return self._loop(lambda sp, fn, x, t: sp.ddim_step(fn, x, t, generator, clip_denoised, eta),
                          model_fn, shape, steps, generator, device, noise, progress)

    def sample(self, model_fn, shape, sampler, steps, generator, device, noise=None, progress=None):
        """Run the named sampler: ancestral ("ddpm") or DDIM (pipeline/samplers.py); None means the default."""
        return _dispatch(self, sampler or self.default_sampler, model_fn, shape, steps, generator, device, noise,
                         progress)


#################################################################################
#                                Rectified flow                                 #
#################################################################################

class Flow:
    """Rectified flow: x_t = (1 - t) x0 + t ε, the model predicts v = ε - x0; t = 1 is noise, t = 0 data."""

    name = "flow"
    samplers = tuple(SAMPLERS["flow"])
    default_sampler = samplers[0]
    out_channels_factor = 1
    learn_sigma = False

    def __init__(self, timestep_mean: float, timestep_std: float, time_scale=1000.0):
        self.timestep_mean, self.timestep_std = float(timestep_mean), float(timestep_std)
        # The model's timestep embedding was designed for DDPM's [0, 1000) range; t * 1000 reuses it.
        self.time_scale = float(time_scale)

    def __repr__(self):
        return (f"Flow(timestep_mean={self.timestep_mean}, timestep_std={self.timestep_std}, "
                f"time_scale={self.time_scale})")

    def noise_level(self, t_model: float) -> float:
        """The model-time argument (a host number) as a noise level in [0, 1]: 0 is data, 1 pure noise."""
        return float(t_model) / self.time_scale

    def _model(self, model_fn, x, t):
        """The velocity from the first C output channels; extra channels (a learn_sigma head) are ignored."""
        return model_fn(x, t * self.time_scale)[:, : x.shape[1]]  # (N, C, H, W)

    def sample_timesteps(self, n, generator, device):
        """Logit-normal t = sigmoid(m + s·n), n ~ N(0, 1): (n,) float32 in (0, 1), around sigmoid(m). (m, s) = (0, 1)
        gives exactly sigmoid(n), the draws of runs from before the two keys existed."""
        return torch.sigmoid(self.timestep_mean + self.timestep_std * _randn((n,), generator, device))  # (n,)

    def fixed_timesteps(self, k, device):
        """k evenly spaced times, the midpoints of k equal bins of (0, 1): (k,) float32 (0.05, ..., 0.95 for k = 10)."""
        return ((torch.arange(k, dtype=torch.float64) + 0.5) / k).float().to(device)  # (k,)

    def interpolate(self, x0, t, noise):
        t = _bcast(t.to(_compute_dtype(x0)), x0.ndim)  # (N, 1, 1, 1)
        return (1 - t) * x0 + t * noise  # (N, C, H, W)

    def training_losses(self, model_fn, x0, t, noise):
        """Per-sample MSE (N,) between the predicted and the true velocity ε - x0."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, x0 has {tuple(x0.shape)}")
        x_t = self.interpolate(x0, t, noise)  # (N, C, H, W)
        v = self._model(model_fn, x_t, t).to(x_t.dtype)  # (N, C, H, W)
        return {"loss": mean_flat((noise - x0 - v) ** 2)}  # (N,)

    def _integrate(self, model_fn, shape, steps, generator, device, noise, progress, heun):
        steps = int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        x = noise.to(device) if noise is not None else _randn(shape, generator, device)  # (N, C, H, W)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(x.shape)}, expected {tuple(shape)}")
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()  # uniform, noise -> data
        with torch.no_grad():
            for k in range(steps):
                t_cur, t_next = grid[k], grid[k + 1]
                dt = t_next - t_cur  # negative: we integrate towards the data
                t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=_compute_dtype(x))  # (N,)
                v = self._model(at_level(model_fn, t_cur), x, t).to(x.dtype)  # (N, C, H, W)
                x_next = x + dt * v  # (N, C, H, W)
                # Heun's correction needs v at t_next, which is not defined at t = 0: the last step stays Euler.
                if heun and t_next > 0:
                    t2 = torch.full((x.shape[0],), t_next, device=x.device, dtype=_compute_dtype(x))  # (N,)
                    v2 = self._model(at_level(model_fn, t_next), x_next, t2).to(x.dtype)  # (N, C, H, W)
                    x_next = x + dt * 0.5 * (v + v2)  # (N, C, H, W)
                x = x_next
                if progress is not None:
                    progress(k + 1, steps)
        return x

    def euler_sample(self, model_fn, shape, steps, generator, device, noise=None, progress=None):
        """Euler from t = 1 to t = 0 in `steps` uniform steps (one model call per step)."""
        return self._integrate(model_fn, shape, steps, generator, device, noise, progress, heun=False)

    def heun_sample(self, model_fn, shape, steps, generator, device, noise=None, progress=None):
        """Heun (2nd order) from t = 1 to t = 0; 2 * steps - 1 model calls."""
        return self._integrate(model_fn, shape, steps, generator, device, noise, progress, heun=True)

    def sample(self, model_fn, shape, sampler, steps, generator, device, noise=None, progress=None):
        """Run the named sampler: Euler or Heun (pipeline/samplers.py); None means the default."""
        return _dispatch(self, sampler or self.default_sampler, model_fn, shape, steps, generator, device, noise,
                         progress)


def _dispatch(objective, sampler, model_fn, shape, steps, generator, device, noise, progress):
    """Run the objective's loop that pipeline/samplers.py names for `sampler`, or say which names are valid."""
    loops = SAMPLERS[objective.name]
    if sampler not in loops:
        raise _unknown_sampler(sampler, tuple(loops))
    return getattr(objective, loops[sampler])(model_fn, shape, steps, generator, device, noise=noise, progress=progress)


def micro_loss(model, objective, x0, labels, conditional: bool, t, noise, drop, tokens: list | None = None):
    """Per-sample loss (N,) of a DiT on x0 (N, C, H, W) at timesteps t (N,), with the given noise and dropout mask
    (N,): the training step and the held-out loss both go through here. `labels` is the model's `y` (class labels
    or a Caption), used when `conditional`. With `tokens`, the model is REPA's `Aligned` (pipeline/repa.py): it
    returns (output, projected tokens), and the tokens (N, T, Z) are appended to the list."""
    call = (lambda xt, tt: model(xt, tt, labels, force_drop_ids=drop)) if conditional else (  # noqa: E731
        lambda xt, tt: model(xt, tt))

    def model_fn(xt, tt):
        out = call(xt, tt)
        if tokens is None:
            return out
        tokens.append(out[1])
        return out[0]

    return objective.training_losses(model_fn, x0, t, noise)["loss"]  # (N,)


def make_objective(name, learn_sigma, diffusion: DiffusionConfig | None = None):
    """The objective for diffusion.objective: "ddpm" (DiT's default; learn_sigma applies) or "flow", whose training
    times follow `diffusion` (the run's config section; None: its defaults, where only sampling is done)."""
    if name == "ddpm":
        return DDPM(learn_sigma=learn_sigma)
    if name == "flow":
        d = diffusion or DiffusionConfig()
        return Flow(d.timestep_mean, d.timestep_std)
    raise ValueError(f"unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}")
