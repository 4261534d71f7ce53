"""DDPM math as pure functions (Ho et al. 2020, arXiv:2006.11239): no nn.Module, no I/O, no globals.

Timesteps are 0-indexed: `t` in [0, T), where t = 0 is the paper's t = 1. Randomness is injected
(`noise`, `generator`) so every function here is deterministic given its arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from typing import Callable

import torch
from torch import Tensor

Model = Callable[[Tensor, Tensor], Tensor]  # model(x_t (B, C, H, W), t (B,) long) -> predicted eps


@dataclass(frozen=True)
class Schedule:
    """Every per-timestep constant of the forward and reverse process: 1-D float32 tensors of length T."""
    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor                    # ᾱ_t
    alphas_cumprod_prev: Tensor               # ᾱ_{t-1}, with ᾱ_{-1} = 1
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor         # 1 / sqrt(ᾱ_t)
    sqrt_recipm1_alphas_cumprod: Tensor       # sqrt(1 / ᾱ_t - 1)
    posterior_variance: Tensor                # β̃_t, eq. 7
    posterior_log_variance_clipped: Tensor    # log β̃_t, with β̃_0 (= 0) replaced by β̃_1
    posterior_mean_coef1: Tensor              # eq. 7: coefficient of x_0
    posterior_mean_coef2: Tensor              # eq. 7: coefficient of x_t

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> "Schedule":
        return Schedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def schedule_from_betas(betas: Tensor, dtype: torch.dtype = torch.float32) -> Schedule:
    """All derived quantities from float64 betas, computed in float64 and cast once to `dtype` (float32, or
    float64 for reference computations)."""
    assert betas.dtype == torch.float64 and betas.ndim == 1, (betas.dtype, betas.shape)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # β̃_0 = 0: its log is clipped to β̃_1 (never used, as no noise is added at t = 0).
    post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]) if len(betas) > 1 else betas)
    fields64 = dict(
        betas=betas, alphas=alphas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=ac.sqrt(), sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
        sqrt_recip_alphas_cumprod=ac.rsqrt(), sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1.0).sqrt(),
        posterior_variance=post_var, posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * ac_prev.sqrt() / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    )
    return Schedule(**{k: v.to(dtype) for k, v in fields64.items()})


def make_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                  kind: str = "linear") -> Schedule:
    """The noise schedule: "linear" (paper §4: β linear from 1e-4 to 0.02 over T = 1000) or "cosine"
    (Nichol & Dhariwal 2021, eq. 17, β clipped at 0.999; beta_start and beta_end do not apply)."""
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    if not 0 < beta_start <= beta_end < 1:  # also rejects NaN
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start!r}, beta_end={beta_end!r}")
    if kind == "linear":
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    elif kind == "cosine":
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1.0 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"kind must be 'linear' or 'cosine', got kind={kind!r}")
    return schedule_from_betas(betas)


def extract(field: Tensor, t: Tensor, x_shape: torch.Size) -> Tensor:
    """`field[t]` reshaped to (B, 1, 1, 1) so it broadcasts over x of shape (B, C, H, W); never silently."""
    assert t.ndim == 1 and t.shape[0] == x_shape[0], f"t must have shape ({x_shape[0]},), got {tuple(t.shape)}"
    assert t.dtype == torch.long, f"t must be a LongTensor, got {t.dtype}"
    assert field.device == t.device, f"schedule is on {field.device} but t is on {t.device}: use schedule.to(device)"
    return field[t].reshape(t.shape[0], *([1] * (len(x_shape) - 1)))


def q_sample(schedule: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Forward process, eq. 4: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""
    assert noise.shape == x0.shape, (noise.shape, x0.shape)
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape).to(x0.dtype) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape).to(x0.dtype) * noise)


def _randn(shape: tuple, generator: torch.Generator | None, device: torch.device, dtype=torch.float32) -> Tensor:
    """Standard normal noise drawn on the generator's device, returned on `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def draw_t_noise(schedule: Schedule, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Algorithm 1's randomness for a batch of `shape`: t ~ Uniform{0..T-1} of shape (B,), then ε ~ N(0, I)."""
    device = torch.device(device)
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, schedule.num_timesteps, (shape[0],), generator=generator, device=gen_device).to(device)
    return t, _randn(tuple(shape), generator, device, dtype)


def snr(schedule: Schedule) -> Tensor:
    """The signal-to-noise ratio of x_t, SNR(t) = ᾱ_t / (1 - ᾱ_t) (Kingma et al. 2021, eq. 1), length T. From the
    square roots, which were computed in float64: 1 - ᾱ_t of a float32 ᾱ_t loses digits where ᾱ_t is near 1."""
    return (schedule.sqrt_alphas_cumprod / schedule.sqrt_one_minus_alphas_cumprod) ** 2


def min_snr_weights(schedule: Schedule, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-γ loss weights for ε-prediction (Hang et al. 2023, arXiv:2303.09556, eq. 9 with ε's target):
    w_t = min(SNR(t), γ) / SNR(t), shape (B,). 1 at the noisy end, γ / SNR(t) where the image is nearly clean."""
    if not gamma > 0:  # also rejects NaN
        raise ValueError(f"gamma must be > 0, got gamma={gamma!r}")
    assert t.ndim == 1 and t.dtype == torch.long, (t.shape, t.dtype)
    s = snr(schedule)[t]
    return s.clamp(max=gamma) / s


def loss(schedule: Schedule, model: Model, x0: Tensor, *, t: Tensor | None = None, noise: Tensor | None = None,
         generator: torch.Generator | None = None, snr_gamma: float | None = None) -> Tensor:
    """L_simple (Algorithm 1, eq. 14): E_{t, ε} ||ε - ε_θ(x_t, t)||², t uniform in [0, T), ε ~ N(0, I). With
    `snr_gamma`, each image's squared error is weighted by `min_snr_weights` (Min-SNR-γ) before the mean."""
    if t is None or noise is None:
        t_drawn, noise_drawn = draw_t_noise(schedule, x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = t_drawn if t is None else t
        noise = noise_drawn if noise is None else noise
    eps = model(q_sample(schedule, x0, t, noise), t)
    assert eps.shape == x0.shape, f"model returned {tuple(eps.shape)}, expected {tuple(x0.shape)}"
    if snr_gamma is None:
        return torch.mean((eps.float() - noise.float()) ** 2)
    per_image = ((eps.float() - noise.float()) ** 2).flatten(1).mean(1)  # (B,)
    return torch.mean(min_snr_weights(schedule, t, snr_gamma) * per_image)


def predict_x0(schedule: Schedule, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """x_0 from x_t and ε: eq. 4 solved for x_0 (the x_0 of eq. 15, DDIM's "predicted x_0" of its eq. 12),
    x_0 = x_t / sqrt(ᾱ_t) - sqrt(1 / ᾱ_t - 1) ε."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)


def p_sample_step(schedule: Schedule, eps: Tensor, x_t: Tensor, t: Tensor, noise: Tensor, *,
                  variance: str = "beta", clip: bool = True) -> Tensor:
    """One reverse step x_t -> x_{t-1} (Algorithm 2). With `clip`, predict x_0 from ε (eq. 15 inverted),
    clamp it to [-1, 1] and take the posterior mean (eq. 7); without, the mean of eq. 11 directly.
    σ² = β_t ("beta", the paper's CIFAR-10 choice) or β̃_t ("posterior"). No noise at t = 0."""
    assert eps.shape == x_t.shape == noise.shape, (eps.shape, x_t.shape, noise.shape)
    shape = x_t.shape
    if clip:
        x0 = predict_x0(schedule, eps, x_t, t).clamp(-1.0, 1.0)
        mean = extract(schedule.posterior_mean_coef1, t, shape) * x0 + extract(schedule.posterior_mean_coef2, t, shape) * x_t
    else:  # eq. 11
        mean = (x_t - extract(schedule.betas / schedule.sqrt_one_minus_alphas_cumprod, t, shape) * eps) \
            * extract(schedule.alphas.rsqrt(), t, shape)
    if variance == "beta":
        std = extract(schedule.betas.sqrt(), t, shape)
    elif variance == "posterior":
        std = extract((0.5 * schedule.posterior_log_variance_clipped).exp(), t, shape)
    else:
        raise ValueError(f"variance must be 'beta' or 'posterior', got variance={variance!r}")
    nonzero = (t != 0).reshape(-1, *([1] * (len(shape) - 1))).to(x_t.dtype)
    return mean + nonzero * std * noise


def _check_eta(eta: float) -> None:
    # Beyond η = 1 the variance left for ε in eq. 12, 1 - ᾱ_{t-1} - σ², can be negative.
    if not 0.0 <= eta <= 1.0:  # also rejects NaN
        raise ValueError(f"eta must be in [0, 1], got eta={eta!r}")


def ddim_step(schedule: Schedule, eps: Tensor, x_t: Tensor, t: Tensor, noise: Tensor, *, eta: float = 0.0,
              clip: bool = True) -> Tensor:
    """One DDIM step x_t -> x_{t-1} (Song et al. 2021, arXiv:2010.02502, eq. 12; their α is our ᾱ):
        x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 - ᾱ_{t-1} - σ_t²) ε + σ_t z,
        σ_t = η sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1})                     (eq. 16),
    with x̂_0 = `predict_x0` and z = `noise`: η = 0 is deterministic, η = 1 has DDPM's σ² = β̃. `t` indexes
    `schedule` (respaced or not) and ᾱ_{t-1} is `schedule.alphas_cumprod_prev[t]`, so at t = 0 (ᾱ_{-1} = 1) the
    step returns x̂_0. With `clip`, x̂_0 is clamped to [-1, 1] and ε re-derived from it (improved-diffusion's
    ddim_sample; diffusers' DDIMScheduler with use_clipped_model_output=True)."""
    assert eps.shape == x_t.shape == noise.shape, (eps.shape, x_t.shape, noise.shape)
    _check_eta(eta)
    shape = x_t.shape
    ab, ab_prev = extract(schedule.alphas_cumprod, t, shape), extract(schedule.alphas_cumprod_prev, t, shape)
    x0 = predict_x0(schedule, eps, x_t, t)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (extract(schedule.sqrt_recip_alphas_cumprod, t, shape) * x_t - x0) \
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t, shape)
    sigma = eta * ((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)).sqrt()
    direction = (1.0 - ab_prev - sigma ** 2).clamp(min=0.0).sqrt()  # >= 0 for η <= 1; the clamp absorbs rounding
    return ab_prev.sqrt() * x0 + direction * eps + sigma * noise


def _alpha_sigma(schedule: Schedule, k: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """(α_k, σ_k) = (sqrt(ᾱ_k), sqrt(1 - ᾱ_k)) for k >= -1, each (B, 1, 1, 1), from the fields computed in float64
    (1 - ᾱ in float32 loses 3 digits where ᾱ ≈ 1). k = -1 is ᾱ_{-1} = 1: (1, 0)."""
    before_first = (k < 0).reshape(-1, *([1] * (len(shape) - 1)))
    k = k.clamp(min=0)
    alpha = extract(schedule.sqrt_alphas_cumprod, k, shape)
    sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, k, shape)
    return alpha.masked_fill(before_first, 1.0), sigma.masked_fill(before_first, 0.0)


def _dpmpp_2m_data(schedule: Schedule, eps: Tensor, x_t: Tensor, t: Tensor, x0_prev: Tensor | None,
                   clip: bool) -> tuple[Tensor, Tensor]:
    """(x̂_0, D) for DPM-Solver++(2M)'s step t -> t - 1 (Lu et al. 2022, Algorithm 2; the same D in its SDE variant,
    §5): x̂_0 = `predict_x0` (clamped to [-1, 1] with `clip`) and D = x̂_0 + (h / 2h') (x̂_0 - x0_prev) with
    h = λ_{t-1} - λ_t, h' = λ_t - λ_{t+1} (Algorithm 2's r = h' / h), λ = log(α / σ); first order, D = x̂_0,
    without `x0_prev` and at t = 0 (h = ∞)."""
    assert eps.shape == x_t.shape, (eps.shape, x_t.shape)
    shape = x_t.shape
    x0 = predict_x0(schedule, eps, x_t, t)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    if x0_prev is None:
        return x0, x0
    assert x0_prev.shape == shape, (x0_prev.shape, shape)
    assert (t + 1 < schedule.num_timesteps).all(), "x0_prev is the prediction at t + 1, which must exist"
    lam_from, lam, lam_to = (a.log() - s.log() for a, s in (_alpha_sigma(schedule, k, shape) for k in (t + 1, t, t - 1)))
    second = x0 + (lam_to - lam) / (2 * (lam - lam_from)) * (x0 - x0_prev)  # not finite at t = 0 (λ_{-1} = ∞)
    return x0, torch.where(t.reshape(-1, *([1] * (len(shape) - 1))) > 0, second, x0)


def dpmpp_2m_step(schedule: Schedule, eps: Tensor, x_t: Tensor, t: Tensor, x0_prev: Tensor | None = None, *,
                  clip: bool = True) -> tuple[Tensor, Tensor]:
    """One step x_t -> x_{t-1} of DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2). Returns
    (x_{t-1}, x̂_0): x̂_0 is this step's data prediction, the `x0_prev` of the step from t - 1.
    With α = sqrt(ᾱ), σ = sqrt(1 - ᾱ), λ = log(α / σ) (half the log-SNR) and h = λ_{t-1} - λ_t, Algorithm 2's update
    (the exact solution of the ODE in data-prediction form, x_{t-1} = (σ_{t-1} / σ_t) x_t + σ_{t-1} ∫ e^λ x_0(λ) dλ
    over [λ_t, λ_{t-1}], with x_0(λ) extrapolated linearly in λ from the last two predictions) is
        x_{t-1} = (σ_{t-1} / σ_t) x_t - α_{t-1} (e^{-h} - 1) D  =  α_{t-1} D + σ_{t-1} (x_t - α_t D) / σ_t,
        D = x̂_0 + (h / 2h') (x̂_0 - x0_prev),   h' = λ_t - λ_{t+1}   (Algorithm 2: r = h' / h),
    i.e. DDIM's deterministic step (Song et al. 2021, eq. 12 with σ = 0) with x̂_0 replaced by D. The second form is
    the one computed: it has no e^{-h} - 1 to lose digits in when h is small, and it holds at λ_{t-1} = ∞.
    First order (D = x̂_0, DDIM's step exactly) when `x0_prev` is None (the first step) and at t = 0, the final step,
    which goes to ᾱ_{-1} = 1 (σ = 0, λ = ∞) and so returns x̂_0 (diffusers' final_sigmas_type="zero"; there h = ∞
    and the second order is undefined).
    `t` indexes `schedule` (respaced or not): the chain visits its timesteps t + 1, t, t - 1, and `x0_prev` is the
    x̂_0 of the step from t + 1. x̂_0 = `predict_x0` (eq. 4 solved for x_0). With `clip`, x̂_0 is clamped to [-1, 1]
    before it is used: that clamped x̂_0 enters D, is returned, and is extrapolated from at the next step; D itself
    is not clamped (it may leave [-1, 1] by h / 2h' times the change). diffusers' DPMSolverMultistepScheduler has no
    clip option; its `thresholding=True` with the default `sample_max_value=1.0` reduces to this same clamp (the
    dynamic threshold s is clamped to [1, sample_max_value] = 1, and x̂_0 is clamped to [-s, s] and divided by s)."""
    x0, d = _dpmpp_2m_data(schedule, eps, x_t, t, x0_prev, clip)
    alpha, sigma = _alpha_sigma(schedule, t, x_t.shape)
    alpha_to, sigma_to = _alpha_sigma(schedule, t - 1, x_t.shape)
    return alpha_to * d + sigma_to * (x_t - alpha * d) / sigma, x0


def dpmpp_2m_sde_step(schedule: Schedule, eps: Tensor, x_t: Tensor, t: Tensor, noise: Tensor,
                      x0_prev: Tensor | None = None, *, clip: bool = True) -> tuple[Tensor, Tensor]:
    """One step x_t -> x_{t-1} of SDE-DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, §5 and App. B, eq. for
    the second-order multistep SDE solver in data-prediction form; diffusers' algorithm_type="sde-dpmsolver++",
    solver_type="midpoint"). Returns (x_{t-1}, x̂_0) as `dpmpp_2m_step` does, with the same D (`_dpmpp_2m_data`):
        x_{t-1} = (σ_{t-1} / σ_t) e^{-h} x_t + α_{t-1} (1 - e^{-2h}) D + σ_{t-1} sqrt(1 - e^{-2h}) z,
    e^{-h} = α_t σ_{t-1} / (σ_t α_{t-1}). With D = x̂_0 (the first step, and t = 0) this is the mean and variance of
    the posterior q(x_{t-1} | x_t, x_0 = x̂_0) (Ho et al. 2020, eqs. 6-7) on the (respaced) schedule: exactly the
    ancestral step with σ² = β̃ (`p_sample_step(..., variance="posterior")`); the solver replaces x̂_0 in the
    posterior mean by the extrapolated D. At t = 0 it goes to ᾱ = 1 (σ = 0, e^{-h} = 0) and returns x̂_0; `noise`
    (z ~ N(0, I), x's shape) is unused there. `clip` as in `dpmpp_2m_step`."""
    assert noise.shape == x_t.shape, (noise.shape, x_t.shape)
    x0, d = _dpmpp_2m_data(schedule, eps, x_t, t, x0_prev, clip)
    alpha, sigma = _alpha_sigma(schedule, t, x_t.shape)
    alpha_to, sigma_to = _alpha_sigma(schedule, t - 1, x_t.shape)
    decay = alpha * sigma_to / (sigma * alpha_to)  # e^{-h}; 0 at t = 0
    keep = 1.0 - decay ** 2  # 1 - e^{-2h} in (0, 1]
    return decay * (sigma_to / sigma) * x_t + alpha_to * keep * d + sigma_to * keep.sqrt() * noise, x0


SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde")
SPACINGS = ("uniform", "quadratic", "leading", "trailing")
VARIANCES = ("auto", "beta", "posterior")


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> Tensor:
    """The `steps` original timesteps τ_0 < τ_1 < ... < τ_{S-1} in [0, T) that a respaced sampler visits
    (S = steps, T = num_timesteps), a CPU LongTensor. S = T gives every timestep, whatever the spacing.
      uniform    τ_i = round(i (T - 1) / (S - 1)) from 0 to T - 1 (Nichol & Dhariwal 2021, §4); diffusers'
                 "linspace". S = 1 gives [T - 1].
      quadratic  τ_i = max(i, floor(c i²)), c = (T - 1) / (S - 1)², from 0 to T - 1: DDIM's quadratic selection
                 (Song et al. 2021, App. D.2) exactly while S <= 1 + sqrt(T - 1) (32 for T = 1000); beyond, its
                 floor(c i²) repeats the first timesteps and the max keeps them one apart. S = 1 gives [T - 1].
                 (DDIM's code ends at 0.8 T for CIFAR-10; here it ends at T - 1, as uniform does.)
      leading    τ_i = i floor(T / S) from 0 (diffusers' "leading", steps_offset 0; DDIM's "linear" selection):
                 ends at (S - 1) floor(T / S), below T - 1 unless S = T. S = 1 gives [0].
      trailing   τ_i = round((i + 1) T / S) - 1, ending at T - 1 (diffusers' "trailing"; Lin et al. 2024, Table 2).
    Rounding is half to even, of the exact fractions."""
    T = num_timesteps
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got num_timesteps={T!r}")
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got steps={steps!r}")
    S = steps
    if spacing == "uniform":
        taus = [round(Fraction(i * (T - 1), S - 1)) for i in range(S)] if S > 1 else [T - 1]
    elif spacing == "quadratic":
        taus = [max(i, (T - 1) * i * i // (S - 1) ** 2) for i in range(S)] if S > 1 else [T - 1]
    elif spacing == "leading":
        taus = [i * (T // S) for i in range(S)]
    elif spacing == "trailing":
        taus = [round(Fraction((i + 1) * T, S)) - 1 for i in range(S)]
    else:
        hint = " (diffusers' 'linspace' is 'uniform')" if spacing == "linspace" else ""
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got spacing={spacing!r}{hint}")
    return torch.tensor(taus, dtype=torch.long)


def respace(schedule: Schedule, steps: int, spacing: str = "uniform") -> tuple[Schedule, Tensor]:
    """A schedule on the timesteps τ = `spaced_timesteps(T, steps, spacing)` (Nichol & Dhariwal 2021, §4): β
    recomputed from ᾱ on the subsequence, β'_i = 1 - ᾱ_{τ_i} / ᾱ_{τ_{i-1}}, with ᾱ before τ_0 = 1. Returns it
    (in the schedule's dtype and on its device) and τ (on its device)."""
    T = schedule.num_timesteps
    taus = spaced_timesteps(T, steps, spacing)
    if steps == T:
        return schedule, taus.to(schedule.device)
    ac = schedule.alphas_cumprod.cpu().double()[taus]
    betas = 1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
    return schedule_from_betas(betas, schedule.betas.dtype).to(schedule.device), taus.to(schedule.device)


def resolve_variance(variance: str, steps: int | None, num_timesteps: int) -> str:
    """The ancestral sampler's σ² for `steps` of T (None: all): "auto" is β ("beta", the paper's choice for
    CIFAR-10) on all T steps and β̃ ("posterior") when respaced, where σ² = β is far worse (Nichol & Dhariwal
    2021, §4); "beta" and "posterior" pass through."""
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {', '.join(VARIANCES)}, got variance={variance!r}")
    if variance != "auto":
        return variance
    return "beta" if steps is None or steps >= num_timesteps else "posterior"


@dataclass(frozen=True)
class Sampling:
    """How `sample` runs the reverse process; the defaults are config.yaml's sample.* defaults (config.Sample makes
    one from its section, sample.py from its flags). `steps`: None is all T, fewer respaces the schedule to
    `spaced_timesteps(T, steps, spacing)`; `sampler`: "ddpm" (Algorithm 2, σ² from `resolve_variance`), "ddim"
    (`ddim_step` with `eta`), "dpm++2m" (`dpmpp_2m_step`) or "dpm++2m-sde" (`dpmpp_2m_sde_step`: σ² = β̃ whatever
    `variance` says); `eta` applies to DDIM only and `variance` to ancestral
    sampling only; `clip` clamps the predicted x_0 to [-1, 1]. `sampler` and `eta` are checked when made, the
    others where they are used (`spaced_timesteps`, `resolve_variance`)."""
    steps: int | None = None
    sampler: str = "ddpm"
    eta: float = 0.0
    spacing: str = "uniform"
    variance: str = "auto"
    clip: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got sampler={self.sampler!r}")
        _check_eta(self.eta)
        if self.sampler != "ddim" and self.eta != 0:
            raise ValueError(f"eta applies to sampler 'ddim' only, got eta={self.eta!r} with sampler {self.sampler!r}")


@torch.no_grad()
def sample(schedule: Schedule, model: Model, shape: tuple[int, ...], settings: Sampling = Sampling(), *,
           generator: torch.Generator | None = None, device: torch.device | str | None = None,
           progress: bool = False, **overrides) -> Tensor:
    """Images in [-1, 1] on `device` (default: the schedule's) from x_T ~ N(0, I), drawn as `settings` says, with
    any of its fields replaced by `overrides` (`sample(..., sampler="ddim", steps=50)`). On a respaced schedule the
    model still receives the original timestep indices. DDIM with η = 0 and DPM-Solver++(2M) draw nothing after
    x_T; ancestral sampling and SDE-DPM-Solver++(2M) draw one noise tensor per step (the last one unused)."""
    s = replace(settings, **overrides)
    steps, sampler, eta, clip = s.steps, s.sampler, s.eta, s.clip
    device = torch.device(device) if device is not None else schedule.device
    variance = resolve_variance(s.variance, steps, schedule.num_timesteps)
    sched, taus = respace(schedule.to(device), steps if steps is not None else schedule.num_timesteps, s.spacing)
    x = _randn(shape, generator, device)
    x0 = None  # DPM-Solver++(2M)'s previous data prediction: the one state a step hands to the next
    indices = range(len(taus) - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        indices = tqdm(indices, desc="sampling", unit="step", leave=False)
    for i in indices:
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        eps = model(x, taus[t]).to(x.dtype)
        if sampler == "ddim":
            noise = _randn(shape, generator, device) if eta > 0 else torch.zeros_like(x)
            x = ddim_step(sched, eps, x, t, noise, eta=eta, clip=clip)
        elif sampler == "dpm++2m":
            x, x0 = dpmpp_2m_step(sched, eps, x, t, x0, clip=clip)
        elif sampler == "dpm++2m-sde":
            x, x0 = dpmpp_2m_sde_step(sched, eps, x, t, _randn(shape, generator, device), x0, clip=clip)
        else:
            x = p_sample_step(sched, eps, x, t, _randn(shape, generator, device), variance=variance, clip=clip)
    return x.clamp(-1.0, 1.0)


def to_unit(x: Tensor) -> Tensor:
    """Model range [-1, 1] -> floats in [0, 1] (for image grids)."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(x: Tensor) -> Tensor:
    """Model range [-1, 1] -> uint8 pixels in [0, 255], rounded."""
    return (to_unit(x) * 255.0).round().to(torch.uint8)


def from_uint8(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels in [0, 255] -> model range [-1, 1]; exact inverse of `to_uint8` on uint8 input."""
    assert images.dtype == torch.uint8, images.dtype
    return images.to(dtype) / 127.5 - 1.0
