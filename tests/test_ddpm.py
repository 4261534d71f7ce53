"""Properties of the DDPM math in ddpm.py, checked against independent float64 computations of the paper's formulas
(Ho et al. 2020; cosine schedule: Nichol & Dhariwal 2021) and an analytic oracle for the sampler."""
import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ddpm
from helpers import (MU, ORACLE_SHAPE, REF_AC, SCHEDULE, T_PAPER, Z, S, cumprod_prev, exact_eps_model,
                     is_within_oracle, reference_betas, toy_model)

# Tolerance for a float32 field against its float64 reference: float32 keeps ~6e-8 relative, so 1e-5 is loose
# enough for every rounding on the way and tight enough to catch a wrong formula.
F32_RTOL = 1e-5


def reference_taus(num_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced original timesteps τ_i = round(i (T - 1) / (S - 1)) (Nichol & Dhariwal §4)."""
    if steps == 1:
        return [num_timesteps - 1]
    return [round(i * (num_timesteps - 1) / (steps - 1)) for i in range(steps)]


def as_f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def assert_message_names(excinfo: pytest.ExceptionInfo, name: str, value) -> None:
    """The error message contains the argument's name and its value as a whole token."""
    message = str(excinfo.value)
    assert name in message, message
    assert re.search(r"(?<![\w.])" + re.escape(repr(value)) + r"(?![\w.])", message), message


# --------------------------------------------------------------------------------------------------- schedules

# Why these ranges: ᾱ_{T-1} = Π(1 - β_t) ≈ exp(-Σβ_t). To keep float32 ᾱ a normal number (> 1.2e-38 ≈ e^-87), hence
# > 0 and strictly decreasing, we need Σβ ≈ T (β_start + β_end) / 2 <= 80 (otherwise T = 2000 with β = 0.05 gives
# ᾱ_{T-1} ≈ 3e-45, a float32 denormal: 27 steps repeat their value). β_start >= 1e-5 keeps every step's
# relative decrease of ᾱ (= β_t) far above float32's resolution (6e-8), so consecutive float32 values differ.
# The cosine kind ignores β_start/β_end; its smallest ᾱ (T = 2000) is ~6e-10, well inside float32.
@st.composite
def schedule_args(draw) -> tuple[int, float, float, str]:
    num_timesteps = draw(st.integers(1, 2000))
    beta_start = draw(st.floats(1e-5, 0.05))
    beta_end = draw(st.floats(beta_start, 0.05))
    assume(num_timesteps * (beta_start + beta_end) / 2 <= 80)
    return num_timesteps, beta_start, beta_end, draw(st.sampled_from(["linear", "cosine"]))


@given(args=schedule_args())
def test_schedule_fields_are_valid_float32_vectors(args):
    num_timesteps, beta_start, beta_end, kind = args
    s = ddpm.make_schedule(num_timesteps, beta_start, beta_end, kind)
    assert s.num_timesteps == num_timesteps
    for field in dataclasses.fields(s):
        value = getattr(s, field.name)
        assert value.shape == (num_timesteps,) and value.dtype == torch.float32, (field.name, value.shape, value.dtype)
        assert torch.isfinite(value).all(), field.name
    assert ((s.betas > 0) & (s.betas < 1)).all()
    ac = s.alphas_cumprod
    assert ((ac > 0) & (ac < 1)).all()
    assert (ac[1:] < ac[:-1]).all(), "ᾱ must be strictly decreasing"
    assert s.alphas_cumprod_prev[0] == 1
    assert torch.equal(s.alphas_cumprod_prev[1:], ac[:-1])
    assert (s.posterior_variance >= 0).all() and s.posterior_variance[0] == 0


@given(args=schedule_args())
def test_schedule_fields_match_float64_reference(args):
    num_timesteps, beta_start, beta_end, kind = args
    s = ddpm.make_schedule(num_timesteps, beta_start, beta_end, kind)
    betas = reference_betas(num_timesteps, beta_start, beta_end, kind)
    ac, ac_prev = cumprod_prev(betas)
    post_var = (1 - ac_prev) / (1 - ac) * betas  # β̃_t, eq. 7
    reference = dict(
        betas=betas, alphas=1 - betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1 - ac),
        sqrt_recip_alphas_cumprod=1 / np.sqrt(ac), sqrt_recipm1_alphas_cumprod=np.sqrt(1 / ac - 1),
        posterior_variance=post_var,
    )
    for name, expected in reference.items():
        np.testing.assert_allclose(as_f64(getattr(s, name)), expected, rtol=F32_RTOL, atol=1e-12, err_msg=name)
    if num_timesteps > 1:  # log β̃ with the 0 at t = 0 replaced by β̃ at t = 1
        np.testing.assert_allclose(as_f64(s.posterior_log_variance_clipped),
                                   np.log(np.concatenate([post_var[1:2], post_var[1:]])), rtol=F32_RTOL)


@given(args=schedule_args(), seed=st.integers(0, 2**32 - 1))
def test_posterior_coefficients_reproduce_eq7_on_random_data(args, seed):
    num_timesteps, beta_start, beta_end, kind = args
    s = ddpm.make_schedule(num_timesteps, beta_start, beta_end, kind)
    betas = reference_betas(num_timesteps, beta_start, beta_end, kind)
    ac, ac_prev = cumprod_prev(betas)
    gen = torch.Generator().manual_seed(seed)
    x0, xt = torch.randn(2, num_timesteps, generator=gen, dtype=torch.float64).numpy()  # one pair per t
    # Eq. 7: μ̃ = √ᾱ_{t-1} β_t / (1 - ᾱ_t) x_0 + √α_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t) x_t
    mu_paper = np.sqrt(ac_prev) * betas / (1 - ac) * x0 + np.sqrt(1 - betas) * (1 - ac_prev) / (1 - ac) * xt
    mu = as_f64(s.posterior_mean_coef1) * x0 + as_f64(s.posterior_mean_coef2) * xt
    # Both coefficients lie in [0, 1] and x ~ N(0, 1): float32 rounding is ~1e-7 absolute.
    np.testing.assert_allclose(mu, mu_paper, rtol=F32_RTOL, atol=1e-6)


@given(num_timesteps=st.integers(1, 2000), beta_start=st.floats(1e-5, 0.05), data=st.data())
def test_linear_betas_are_a_float64_linspace_cast_to_float32(num_timesteps, beta_start, data):
    beta_end = data.draw(st.floats(beta_start, 0.05))
    betas = ddpm.make_schedule(num_timesteps, beta_start, beta_end, "linear").betas
    expected = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64).astype(np.float32)
    # numpy's and torch's float64 linspace may differ in the last float64 bit, which can flip a float32 rounding:
    # allow one float32 ulp and nothing more.
    np.testing.assert_array_max_ulp(betas.numpy(), expected, maxulp=1)


@given(num_timesteps=st.integers(1, 2000))
def test_cosine_betas_match_nichol_dhariwal_eq17(num_timesteps):
    betas = ddpm.make_schedule(num_timesteps, kind="cosine").betas
    expected = reference_betas(num_timesteps, 1e-4, 0.02, "cosine")
    np.testing.assert_allclose(as_f64(betas), expected, rtol=F32_RTOL)
    clip = float(np.float32(0.999))
    assert betas.max().item() <= clip
    assert betas[-1].item() == clip, "the last cosine β (f(T) = cos²(π/2) ≈ 0) is clipped"


def test_paper_schedule_golden_values():
    # Ho et al. §4: β_1 = 1e-4, β_T = 0.02, T = 1000; ᾱ_T ≈ 4.04e-5 (so x_T is almost pure noise).
    assert SCHEDULE.num_timesteps == 1000
    assert SCHEDULE.betas[0].item() == float(np.float32(1e-4)) and SCHEDULE.betas[-1].item() == float(np.float32(0.02))
    assert SCHEDULE.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


@pytest.mark.parametrize("kwargs, name, value", [
    (dict(num_timesteps=0), "num_timesteps", 0),
    (dict(num_timesteps=-3), "num_timesteps", -3),
    (dict(num_timesteps=2.5), "num_timesteps", 2.5),
    (dict(beta_start=0), "beta_start", 0),
    (dict(beta_start=0.03, beta_end=0.02), "beta_start", 0.03),
    (dict(beta_start=0.03, beta_end=0.02), "beta_end", 0.02),
    (dict(beta_end=1), "beta_end", 1),
    (dict(beta_start=math.nan), "beta_start", math.nan),
    (dict(beta_end=math.nan), "beta_end", math.nan),
    (dict(kind="quadratic"), "kind", "quadratic"),
])
def test_make_schedule_rejects_bad_arguments_naming_them(kwargs, name, value):
    with pytest.raises(ValueError) as excinfo:
        ddpm.make_schedule(**kwargs)
    assert_message_names(excinfo, name, value)


def test_schedule_to_moves_every_field(device):
    moved = SCHEDULE.to(device)
    assert moved.device.type == device.type
    for field in dataclasses.fields(moved):
        assert getattr(moved, field.name).device.type == device.type, field.name
        assert torch.equal(getattr(moved, field.name).cpu(), getattr(SCHEDULE, field.name))


# ------------------------------------------------------------------------------------------------------ extract

def test_extract_gathers_and_reshapes_for_broadcasting(device):
    t = torch.tensor([0, 999, 5], device=device)
    out = ddpm.extract(SCHEDULE.to(device).betas, t, torch.Size([3, 2, 4, 4]))
    assert out.shape == (3, 1, 1, 1) and out.device.type == device.type
    assert torch.equal(out.flatten().cpu(), SCHEDULE.betas[[0, 999, 5]])


@pytest.mark.parametrize("t, message", [
    (torch.zeros(3, 1, dtype=torch.long), "shape"),                  # (B, 1) would broadcast silently
    (torch.zeros(2, dtype=torch.long), "shape"),                     # wrong batch size
    (torch.zeros(3, dtype=torch.int32), "LongTensor"),
    (torch.zeros(3, dtype=torch.long, device="meta"), "schedule.to"),  # another device, without needing a GPU
])
def test_extract_asserts_on_wrong_t(t, message):
    with pytest.raises(AssertionError, match=message):
        ddpm.extract(SCHEDULE.betas, t, torch.Size([3, 2, 4, 4]))


# ----------------------------------------------------------------------------------------------------- q_sample

@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.integers(1, 6), inner=st.lists(st.integers(1, 5), max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**32 - 1))
def test_q_sample_keeps_shape_dtype_device_and_follows_eq4(device, batch, inner, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *inner)
    x0 = torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1
    noise = torch.randn(shape, generator=gen, dtype=dtype)
    t = torch.randint(0, T_PAPER, (batch,), generator=gen)
    xt = ddpm.q_sample(SCHEDULE.to(device), x0.to(device), t.to(device), noise.to(device))
    # The float32 schedule is cast to x0's dtype: float64 data stays float64.
    assert xt.shape == shape and xt.dtype == dtype and xt.device.type == device.type
    ac = REF_AC[t.numpy()].reshape(batch, *[1] * len(inner))
    expected = np.sqrt(ac) * as_f64(x0) + np.sqrt(1 - ac) * as_f64(noise)  # eq. 4
    np.testing.assert_allclose(as_f64(xt), expected, rtol=F32_RTOL, atol=1e-6)


def test_q_sample_moments_match_eq4():
    n = 20_000  # noise draws at fixed x0 (one row each)
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0], dtype=torch.float64).expand(n, 4)
    gen = torch.Generator().manual_seed(0)
    for t in (0, 10, 250, 999):
        xt = ddpm.q_sample(SCHEDULE, x0, torch.full((n,), t), torch.randn(n, 4, generator=gen, dtype=torch.float64))
        mean, var = math.sqrt(REF_AC[t]) * x0[0].numpy(), 1 - REF_AC[t]  # eq. 4: N(√ᾱ_t x0, (1 - ᾱ_t) I)
        # Standard errors for n iid Gaussian draws: of the mean, √(var / n); of the sample variance, var √(2 / (n - 1)).
        assert np.abs(as_f64(xt.mean(0)) - mean).max() <= Z * math.sqrt(var / n), t
        assert np.abs(as_f64(xt.var(0)) - var).max() <= Z * var * math.sqrt(2 / (n - 1)), t


# --------------------------------------------------------------------------------------------------------- loss

def test_loss_is_zero_for_a_model_that_returns_the_true_noise():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    assert ddpm.loss(SCHEDULE, lambda x_t, t: noise.clone(), x0, noise=noise, generator=gen).item() == 0.0


def test_loss_is_one_for_a_model_that_predicts_zero():
    x0 = torch.rand(4096, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    value = ddpm.loss(SCHEDULE, lambda x_t, t: torch.zeros_like(x_t), x0, generator=torch.Generator().manual_seed(1))
    # The loss is then mean(ε²) over n values of ε ~ N(0, 1): E = 1, standard error √(Var ε² / n) = √(2 / n).
    n = x0.numel()
    assert abs(value.item() - 1.0) <= Z * math.sqrt(2 / n)


def test_loss_draws_gaussian_noise_and_uniform_timesteps():
    # With x0 = 0, x_t = √(1 - ᾱ_t) ε: a spy model recovers loss's own draws of ε and t.
    seen = {}

    def spy(x_t, t):
        seen["eps"] = x_t / ddpm.extract(SCHEDULE.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        seen["t"] = t
        return torch.zeros_like(x_t)

    ddpm.loss(SCHEDULE, spy, torch.zeros(20_000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    eps, t, n = seen["eps"].double().flatten(), seen["t"].double(), 20_000
    # Standard errors for N(0, 1): mean √(1/n), variance √(2/n), kurtosis E[ε⁴]/E[ε²]² (= 3) √(24/n).
    # Uniform noise (the course version's bug) has kurtosis 1.8 whatever its scale: 34 standard errors off.
    assert abs(eps.mean()) <= Z * math.sqrt(1 / n)
    assert abs(eps.var() - 1) <= Z * math.sqrt(2 / n)
    kurtosis = ((eps - eps.mean()) ** 4).mean() / eps.var() ** 2
    assert abs(kurtosis - 3) <= Z * math.sqrt(24 / n)
    # t uniform on {0, ..., T-1}: mean (T - 1)/2, standard error √((T² - 1) / 12 / n).
    assert t.min() >= 0 and t.max() <= T_PAPER - 1
    assert abs(t.mean() - (T_PAPER - 1) / 2) <= Z * math.sqrt((T_PAPER ** 2 - 1) / 12 / n)


def test_loss_is_bitwise_reproducible_for_a_generator_seed():
    x0 = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def run(seed):
        return ddpm.loss(SCHEDULE, toy_model, x0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


@pytest.mark.parametrize("use_cpu_generator", [False, True])
def test_loss_creates_t_and_noise_on_x0s_device(device, use_cpu_generator):
    seen = {}

    def spy(x_t, t):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    x0 = torch.zeros(4, 3, 8, 8, dtype=torch.float64, device=device)
    generator = torch.Generator().manual_seed(0) if use_cpu_generator else None
    ddpm.loss(SCHEDULE.to(device), spy, x0, generator=generator)
    assert seen["t"].device.type == device.type and seen["t"].dtype == torch.long and seen["t"].shape == (4,)
    # x0 = 0, so x_t is the noise up to scale: it was drawn on x0's device in x0's dtype.
    assert seen["x_t"].device.type == device.type and seen["x_t"].dtype == torch.float64
    assert (seen["x_t"] != 0).all()


def test_loss_draws_exactly_what_draw_t_noise_draws():
    # draw_t_noise is Algorithm 1's randomness on its own: the same seed gives loss the same (t, ε).
    x0 = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t, noise = ddpm.draw_t_noise(SCHEDULE, x0.shape, generator=torch.Generator().manual_seed(5), dtype=x0.dtype)
    assert t.shape == (6,) and t.dtype == torch.long and noise.shape == x0.shape and noise.dtype == torch.float64
    drawn = ddpm.loss(SCHEDULE, toy_model, x0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, ddpm.loss(SCHEDULE, toy_model, x0, t=t, noise=noise))


def test_loss_uses_the_given_t_and_checks_the_model_output_shape():
    seen = {}
    t = torch.tensor([3, 0, 999])

    def spy(x_t, t_seen):
        seen["t"] = t_seen
        return torch.zeros_like(x_t)

    ddpm.loss(SCHEDULE, spy, torch.zeros(3, 1, 2, 2), t=t)
    assert torch.equal(seen["t"], t)
    with pytest.raises(AssertionError, match="model returned"):
        ddpm.loss(SCHEDULE, lambda x_t, t: x_t[:, :1], torch.zeros(3, 2, 2, 2))


# ---------------------------------------------------------------------------------------------- p_sample_step

def random_step_inputs(seed: int, t: list[int], scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    shape = (len(t), 2, 3, 3)
    x_t, eps, noise = (torch.randn(shape, generator=gen) * scale for _ in range(3))
    return x_t, eps, noise, torch.tensor(t)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
@pytest.mark.parametrize("clip", [False, True])
def test_p_sample_step_adds_no_noise_at_t0_only(variance, clip):
    x_t, eps, noise, t = random_step_inputs(0, [0, 5, 0, 999])
    step = lambda z: ddpm.p_sample_step(SCHEDULE, eps, x_t, t, z, variance=variance, clip=clip)  # noqa: E731
    with_noise, without = step(noise), step(torch.zeros_like(noise))
    at_zero = t == 0
    assert torch.equal(with_noise[at_zero], without[at_zero])
    assert (with_noise[~at_zero] != without[~at_zero]).all()


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_p_sample_step_noise_scale_is_sigma_t(variance):
    # With x_t = ε = 0 the mean is 0, so the step returns σ_t times the noise.
    t = [1, 10, 500, 999]
    zeros = torch.zeros(len(t), 2, 3, 3)
    sigma = as_f64(ddpm.p_sample_step(SCHEDULE, zeros, zeros, torch.tensor(t), torch.ones_like(zeros),
                                      variance=variance))
    assert (sigma == sigma[:, :1, :1, :1]).all()
    sigma = sigma[:, 0, 0, 0]
    ac, ac_prev = REF_AC[t], np.concatenate([[1.0], REF_AC[:-1]])[t]
    beta = 1 - ac / ac_prev
    expected = beta if variance == "beta" else (1 - ac_prev) / (1 - ac) * beta  # σ² = β_t or β̃_t (eq. 7)
    np.testing.assert_allclose(sigma, np.sqrt(expected), rtol=F32_RTOL)


@given(seed=st.integers(0, 2**32 - 1), t=st.lists(st.integers(0, T_PAPER - 1), min_size=1, max_size=6),
       scale=st.sampled_from([0.1, 1.0, 30.0]))
def test_p_sample_step_clips_predicted_x0(seed, t, scale):
    x_t, eps, _, t_tensor = random_step_inputs(seed, t, scale)
    out = ddpm.p_sample_step(SCHEDULE, eps, x_t, t_tensor, torch.zeros_like(x_t), clip=True)
    ac = REF_AC[t].reshape(-1, 1, 1, 1)
    ac_prev = np.concatenate([[1.0], REF_AC[:-1]])[t].reshape(-1, 1, 1, 1)
    beta = 1 - ac / ac_prev
    x0 = np.clip((as_f64(x_t) - np.sqrt(1 - ac) * as_f64(eps)) / np.sqrt(ac), -1, 1)  # eq. 4 solved for x0
    mean = np.sqrt(ac_prev) * beta / (1 - ac) * x0 + np.sqrt(1 - beta) * (1 - ac_prev) / (1 - ac) * as_f64(x_t)  # eq. 7
    # float32 rounding, amplified by 1/√ᾱ_t (up to ~160) in the unclipped x0, stays below ~5e-7 · scale: allow 1e-5.
    np.testing.assert_allclose(as_f64(out), mean, rtol=F32_RTOL, atol=1e-5 * scale)
    # At t = 0 the posterior mean is x0 itself (coef1 = 1, coef2 = 0), so the clipped prediction is the output.
    assert (out[t_tensor == 0].abs() <= 1 + 1e-6).all()


@given(seed=st.integers(0, 2**32 - 1), t=st.lists(st.integers(0, T_PAPER - 1), min_size=1, max_size=6))
def test_p_sample_step_with_clip_equals_eq11_when_x0_is_in_range(seed, t):
    # Eq. 7 with x0 from eq. 15 is algebraically eq. 11; clipping changes nothing when the predicted x0 is in range.
    gen = torch.Generator().manual_seed(seed)
    shape = (len(t), 2, 3, 3)
    x0 = torch.rand(shape, generator=gen) * 1.8 - 0.9
    eps, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t_tensor = torch.tensor(t)
    x_t = ddpm.q_sample(SCHEDULE, x0, t_tensor, eps)
    clipped, direct = (ddpm.p_sample_step(SCHEDULE, eps, x_t, t_tensor, noise, clip=c) for c in (True, False))
    # The two float32 paths round differently (observed <= 1e-6 apart): allow 1e-5.
    torch.testing.assert_close(clipped, direct, rtol=F32_RTOL, atol=1e-5)


def test_p_sample_step_rejects_unknown_variance():
    x_t, eps, noise, t = random_step_inputs(0, [1])
    with pytest.raises(ValueError) as excinfo:
        ddpm.p_sample_step(SCHEDULE, eps, x_t, t, noise, variance="learned")
    assert_message_names(excinfo, "variance", "learned")


# ------------------------------------------------------------------------------------------------------ respace

def test_respace_to_all_steps_is_the_identity():
    respaced, taus = ddpm.respace(SCHEDULE, T_PAPER)
    assert torch.equal(taus, torch.arange(T_PAPER))
    for field in dataclasses.fields(SCHEDULE):
        assert torch.equal(getattr(respaced, field.name), getattr(SCHEDULE, field.name)), field.name


@pytest.mark.parametrize("steps", [0, -1, T_PAPER + 1])
def test_respace_rejects_steps_outside_1_to_T(steps):
    with pytest.raises(ValueError) as excinfo:
        ddpm.respace(SCHEDULE, steps)
    assert_message_names(excinfo, "steps", steps)


@given(num_timesteps=st.integers(1, 300), data=st.data())
def test_respace_keeps_alphas_cumprod_on_evenly_spaced_timesteps(num_timesteps, data):
    steps = data.draw(st.integers(1, num_timesteps))
    schedule = ddpm.make_schedule(num_timesteps, 1e-4, 0.02)
    respaced, taus = ddpm.respace(schedule, steps)
    expected_taus = reference_taus(num_timesteps, steps)
    assert taus.tolist() == expected_taus and respaced.num_timesteps == steps
    assert taus[-1] == num_timesteps - 1 and (steps == 1 or taus[0] == 0)
    ac = cumprod_prev(reference_betas(num_timesteps, 1e-4, 0.02, "linear"))[0][expected_taus]
    # ᾱ' on the subsequence is ᾱ at τ; β'_i = 1 - ᾱ_{τ_i} / ᾱ_{τ_{i-1}}, with ᾱ before τ_0 = 1.
    np.testing.assert_allclose(as_f64(respaced.alphas_cumprod), ac, rtol=F32_RTOL)
    # respace divides float32 ᾱ values (relative error up to 2^-24 each), so β' is only good to ~1.2e-7 absolute.
    np.testing.assert_allclose(as_f64(respaced.betas), 1 - ac / np.concatenate([[1.0], ac[:-1]]), rtol=F32_RTOL,
                               atol=3e-7)


# ------------------------------------------------------------------------------------------------------- sample

def test_sampler_passes_original_timesteps_to_the_model_when_respaced():
    calls = []

    def spy(x, t):
        assert (t == t[0]).all() and t.dtype == torch.long
        calls.append(t[0].item())
        return torch.zeros_like(x)

    ddpm.sample(SCHEDULE, spy, (2, 1, 4, 4), steps=50, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 50 and calls[0] == T_PAPER - 1 and calls[-1] == 0
    assert all(a > b for a, b in zip(calls, calls[1:]))
    assert calls == reference_taus(T_PAPER, 50)[::-1]
    calls.clear()
    ddpm.sample(ddpm.make_schedule(20), spy, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert calls == list(range(19, -1, -1))


@pytest.mark.parametrize("clip", [False, True])
def test_sample_shape_device_and_range(device, clip):
    # A model whose predictions push x far outside [-1, 1], so that the final clamp has work to do.
    def model(x, t):
        assert x.device.type == t.device.type == device.type
        return -30 * torch.ones_like(x)

    out = ddpm.sample(ddpm.make_schedule(10), model, (3, 2, 4, 4), clip=clip,
                      generator=torch.Generator().manual_seed(0), device=device)
    assert out.shape == (3, 2, 4, 4) and out.dtype == torch.float32 and out.device.type == device.type
    assert out.min() >= -1 and out.max() <= 1
    assert (out == 1).any(), "the model drives samples up: some must reach the clamp"


def test_sample_is_bitwise_reproducible_and_progress_does_not_change_it(capsys):
    schedule = ddpm.make_schedule(30)

    def run(seed, progress=False):
        return ddpm.sample(schedule, toy_model, (4, 3, 8, 8), steps=10, progress=progress,
                           generator=torch.Generator().manual_seed(seed))

    first = run(7)
    assert torch.equal(first, run(7))
    assert not torch.equal(first, run(8))
    assert torch.equal(first, run(7, progress=True))
    assert "sampling" in capsys.readouterr().err  # tqdm's bar was drawn


def test_sample_draws_gaussian_initial_noise():
    seen = []

    def spy(x, t):
        if not seen:
            seen.append(x.double().flatten())  # x_T, drawn by the sampler
        return torch.zeros_like(x)

    ddpm.sample(ddpm.make_schedule(2), spy, (20_000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    x_T, n = seen[0], 20_000
    # Same standard errors as for loss's noise: x_T ~ N(0, I) has mean 0, variance 1, kurtosis 3.
    assert abs(x_T.mean()) <= Z * math.sqrt(1 / n) and abs(x_T.var() - 1) <= Z * math.sqrt(2 / n)
    assert abs(((x_T - x_T.mean()) ** 4).mean() / x_T.var() ** 2 - 3) <= Z * math.sqrt(24 / n)


# ------------------------------------------------------------------- the sampler against an analytic oracle
#
# For data x0 ~ N(μ, s²) per pixel, x_t ~ N(√ᾱ_t μ, ᾱ_t s² + 1 - ᾱ_t) and the exact ε-predictor is
# E[ε | x_t] = √(1 - ᾱ_t) (x_t - √ᾱ_t μ) / (ᾱ_t s² + 1 - ᾱ_t). With it and clip=False each step of the sampler is
# x' = a x + b + σ z, so its output is exactly N(m, v), by a recursion from x_T ~ N(0, 1). Everything below is
# computed in float64 from the paper's formulas, not from ddpm.py (the oracle's parts that test_samplers.py shares
# are in helpers.py: MU, S, ORACLE_SHAPE, exact_eps_model, clamped_normal_moments, is_within_oracle).


def sampler_law(steps: int, variance: str) -> tuple[float, float]:
    """Exact mean and variance of the sampler's output before its final clamp."""
    ac = [REF_AC[tau] for tau in reference_taus(T_PAPER, steps)]
    m, v = 0.0, 1.0  # x_T ~ N(0, 1)
    for i in reversed(range(steps)):
        ab, ab_prev = ac[i], (ac[i - 1] if i > 0 else 1.0)
        beta = 1 - ab / ab_prev  # β'_i of the subsequence; β_t itself when steps = T
        c = math.sqrt(1 - ab) / (ab * S ** 2 + 1 - ab)  # ε̂(x) = c (x - √ᾱ μ)
        k = beta / math.sqrt(1 - ab)
        # Eq. 11: x' = (x - β/√(1 - ᾱ) ε̂(x)) / √α + σ z = a x + b + σ z
        a = (1 - k * c) / math.sqrt(1 - beta)
        b = k * c * math.sqrt(ab) * MU / math.sqrt(1 - beta)
        sigma2 = 0.0 if i == 0 else beta if variance == "beta" else (1 - ab_prev) / (1 - ab) * beta
        m, v = a * m + b, a * a * v + sigma2
    return m, v


def oracle_run(schedule: ddpm.Schedule, steps: int, variance: str) -> torch.Tensor:
    return ddpm.sample(schedule, exact_eps_model, ORACLE_SHAPE, steps=steps, variance=variance, clip=False,
                       generator=torch.Generator().manual_seed(0)).double()


def test_oracle_is_near_the_data_at_T_steps_and_not_at_50():
    n = math.prod(ORACLE_SHAPE)
    for variance in ("beta", "posterior"):
        assert sampler_law(T_PAPER, variance)[1] == pytest.approx(S ** 2, rel=0.03)
        # At 50 steps the output variance is off S² by far more than the test's resolution (standard error ~1%).
        v50 = sampler_law(50, variance)[1]
        assert abs(v50 - S ** 2) > 10 * v50 * math.sqrt(2 / n), variance
    assert sampler_law(50, "beta")[1] > S ** 2 > sampler_law(50, "posterior")[1]


@pytest.mark.parametrize("steps", [T_PAPER, 50])
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_sampler_matches_analytic_oracle(steps, variance):
    assert is_within_oracle(oracle_run(SCHEDULE, steps, variance), sampler_law(steps, variance))


def test_oracle_rejects_the_wrong_variance_and_a_wrong_coefficient():
    # Each sampler result lies > 10 standard errors from the other variance's law at 50 steps.
    for variance, other in (("beta", "posterior"), ("posterior", "beta")):
        assert not is_within_oracle(oracle_run(SCHEDULE, 50, variance), sampler_law(50, other), z=10)
    # A mutant whose eq. 11 uses β_t / (1 - ᾱ_t) instead of β_t / √(1 - ᾱ_t) fails the oracle.
    mutant = dataclasses.replace(SCHEDULE, sqrt_one_minus_alphas_cumprod=1 - SCHEDULE.alphas_cumprod)
    assert not is_within_oracle(oracle_run(mutant, T_PAPER, "beta"), sampler_law(T_PAPER, "beta"))


# ----------------------------------------------------------------------------------------------- pixel ranges

def test_uint8_round_trip_is_exact_on_all_values():
    pixels = torch.arange(256, dtype=torch.uint8)
    for dtype in (torch.float32, torch.float64):
        x = ddpm.from_uint8(pixels, dtype)
        assert x.dtype == dtype and x[0] == -1 and x[-1] == 1
        assert torch.equal(ddpm.to_uint8(x), pixels)
    with pytest.raises(AssertionError):
        ddpm.from_uint8(pixels.float())


def test_to_unit_maps_model_range_into_0_1():
    x = torch.linspace(-3, 3, 601)
    unit = ddpm.to_unit(x)
    assert unit.min() == 0 and unit.max() == 1
    assert (unit[1:] >= unit[:-1]).all()
    inside = x.abs() <= 1
    torch.testing.assert_close(unit[inside], (x[inside] + 1) / 2)
