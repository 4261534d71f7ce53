"""DDIM, timestep spacings and variance auto (issue 14): every DDIM step against diffusers' DDIMScheduler.step, the
DDIM map against the exact Gaussian oracle, properties of the spacings, and the options reaching the sampler from
config.yaml (training grids, resume), sample.py and evaluate.py."""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import checkpoint
import config
import ddpm
import evaluate as ev
import sample
import train
from helpers import (MU, ORACLE_SHAPE, REF_AC, SCHEDULE, T_PAPER, Z, S, TinyExtractor, assert_same_training,
                     clamped_normal_moments, decode_png, exact_eps_model, is_within_oracle, make_checkpoint,
                     one_error_line, tiny_config, toy_model)

F64 = torch.float64
SPACING_OF_DIFFUSERS = {"leading": "leading", "trailing": "trailing", "linspace": "uniform"}


def paper_schedule64() -> ddpm.Schedule:
    """The paper's schedule with float64 fields, for comparisons at 1e-6 and below."""
    return ddpm.schedule_from_betas(torch.linspace(1e-4, 0.02, T_PAPER, dtype=F64), F64)


def ddim_scheduler(ac64: torch.Tensor, *, spacing: str = "leading", clip: bool, set_alpha_to_one: bool = True):
    """diffusers' DDIMScheduler on the schedule whose ᾱ is `ac64`. It builds its tensors in float32: they are
    replaced by the float64 ones, so both sides compute in float64."""
    DDIMScheduler = pytest.importorskip("diffusers.schedulers.scheduling_ddim", reason="needs diffusers").DDIMScheduler
    s = DDIMScheduler(num_train_timesteps=len(ac64), beta_schedule="linear", clip_sample=clip,
                      set_alpha_to_one=set_alpha_to_one, timestep_spacing=spacing)
    s.alphas_cumprod = ac64
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=F64) if set_alpha_to_one else ac64[0]
    return s


def with_final_alpha(schedule: ddpm.Schedule, final: torch.Tensor) -> ddpm.Schedule:
    """diffusers' set_alpha_to_one=False: ᾱ before the first timestep is ᾱ_0 instead of 1, i.e. our
    alphas_cumprod_prev[0]."""
    prev = schedule.alphas_cumprod_prev.clone()
    prev[0] = final
    return dataclasses.replace(schedule, alphas_cumprod_prev=prev)


def compare_chain(ours: ddpm.Schedule, taus: list[int], theirs, *, eta: float, clip: bool, seed: int = 0) -> int:
    """Every step of the chain τ_{S-1} -> ... -> τ_0 -> x_0 on fresh random inputs (x_t, ε, z): our ddim_step at
    index i against diffusers' step at timestep τ_i, within 1e-6. Returns how many elements had |x̂_0| > 1."""
    g = torch.Generator().manual_seed(seed)
    clipped = 0
    for i in reversed(range(len(taus))):
        x, eps, z = (torch.randn(2, 3, 4, 4, generator=g, dtype=F64) for _ in range(3))
        t = torch.full((2,), i, dtype=torch.long)
        mine = ddpm.ddim_step(ours, eps, x, t, z, eta=eta, clip=clip)
        out = theirs.step(eps, taus[i], x, eta=eta, use_clipped_model_output=clip, variance_noise=z)
        assert (mine - out.prev_sample).abs().max() <= 1e-6, (i, taus[i], (mine - out.prev_sample).abs().max())
        clipped += int((ddpm.predict_x0(ours, eps, x, t).abs() > 1).sum())
    return clipped


# ------------------------------------------------------------------------------------- DDIM against diffusers

@pytest.mark.parametrize("spacing, steps", [("leading", 10), ("leading", 37), ("trailing", 20), ("leading", 1000)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_every_ddim_step_equals_diffusers(spacing: str, steps: int, eta: float, clip: bool,
                                          set_alpha_to_one: bool) -> None:
    """On diffusers' own timesteps (timestep_spacing, set_timesteps): our respaced schedule and ddim_step.
    diffusers' step goes from τ_i to τ_i - T // S, which is τ_{i-1} for "leading" and, when S divides T, for
    "trailing" (diffusers issue #12633); "linspace" is compared below."""
    base = paper_schedule64()
    theirs = ddim_scheduler(base.alphas_cumprod, spacing=spacing, clip=clip, set_alpha_to_one=set_alpha_to_one)
    theirs.set_timesteps(steps)
    taus = theirs.timesteps.flip(0).tolist()
    assert taus == ddpm.spaced_timesteps(T_PAPER, steps, spacing).tolist()
    ours, ours_taus = ddpm.respace(base, steps, spacing)
    assert ours_taus.tolist() == taus and ours.alphas_cumprod.dtype == F64
    if not set_alpha_to_one:
        ours = with_final_alpha(ours, base.alphas_cumprod[0])
    clipped = compare_chain(ours, taus, theirs, eta=eta, clip=clip)
    assert 0 < clipped < 2 * 3 * 4 * 4 * steps  # the clip has work to do, and not everywhere


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_on_the_uniform_chain_equals_diffusers(eta: float, clip: bool) -> None:
    """Our "uniform" is diffusers' "linspace" (same timesteps), but diffusers' step does not follow that list
    (issue #12633). So diffusers steps the respaced chain itself: as a T' = S schedule taken one step at a time."""
    base, steps = paper_schedule64(), 50
    theirs = ddim_scheduler(base.alphas_cumprod, spacing="linspace", clip=clip)
    theirs.set_timesteps(steps)
    assert theirs.timesteps.flip(0).tolist() == ddpm.spaced_timesteps(T_PAPER, steps, "uniform").tolist()
    ours, taus = ddpm.respace(base, steps, "uniform")
    chain = ddim_scheduler(ours.alphas_cumprod, clip=clip)
    chain.set_timesteps(steps)
    assert compare_chain(ours, list(range(steps)), chain, eta=eta, clip=clip) > 0
    np.testing.assert_allclose(ours.alphas_cumprod, base.alphas_cumprod[taus], rtol=1e-12)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 20, 50, 100, 250, 1000])
def test_spacings_equal_diffusers_set_timesteps(spacing: str, steps: int) -> None:
    """At T = 1000 and the usual step counts. (diffusers computes in floats: at a few counts its rounding differs
    from the exact fractions, e.g. "trailing" with S = 61 gives 62 timesteps.)"""
    theirs = ddim_scheduler(paper_schedule64().alphas_cumprod, spacing=spacing, clip=True)
    theirs.set_timesteps(steps)
    if spacing == "linspace" and steps == 1:  # the one count where they differ, on purpose
        assert theirs.timesteps.tolist() == [0]  # diffusers' single step starts at t = 0, not from pure noise
        assert ddpm.spaced_timesteps(T_PAPER, 1, "uniform").tolist() == [T_PAPER - 1]
        return
    assert theirs.timesteps.flip(0).tolist() == ddpm.spaced_timesteps(T_PAPER, steps,
                                                                      SPACING_OF_DIFFUSERS[spacing]).tolist()


def test_ddim_sample_equals_a_diffusers_loop() -> None:
    """The whole sampler (x_T, the loop, the model's timesteps, the final clamp) against diffusers' pipeline loop
    with the same model and x_T, η = 0, leading spacing: in float32 both, so within float32 rounding."""
    DDIMScheduler = pytest.importorskip("diffusers.schedulers.scheduling_ddim", reason="needs diffusers").DDIMScheduler
    shape, steps = (3, 2, 4, 4), 25
    ours = ddpm.sample(SCHEDULE, toy_model, shape, steps=steps, sampler="ddim", spacing="leading",
                       generator=torch.Generator().manual_seed(5))
    theirs = DDIMScheduler(num_train_timesteps=T_PAPER, clip_sample=True)  # the paper's linear β, leading
    theirs.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))  # x_T as ddpm.sample draws it
    for t in theirs.timesteps:
        x = theirs.step(toy_model(x, t.expand(shape[0])), t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    # Float32 rounding of ᾱ (computed differently on the two sides, rel. ~1e-7) is amplified by 1 / sqrt(ᾱ_t)
    # (up to 160) in x̂_0 at the first steps, then damped by sqrt(ᾱ_{t-1}); measured 1e-6.
    assert (ours - x.clamp(-1, 1)).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------- the Gaussian oracle
#
# For x_0 ~ N(MU, S²) per dimension the exact ε-prediction is affine in x_t (helpers.exact_eps_model), so each
# DDIM step is x' = a x + b + σ z, written here from eq. 12 and 16 in float64: η = 0 maps x_T to A x_T + B exactly,
# and any η gives the law N(m, v) by the recursion m' = a m + b, v' = a² v + σ².

def ddim_law(taus: list[int], eta: float) -> tuple[float, float, float]:
    """(A, m, v): the coefficient of x_T, and the mean and variance of the output (before the final clamp)."""
    A, m, v = 1.0, 0.0, 1.0
    for i in reversed(range(len(taus))):
        ab, ab_prev = REF_AC[taus[i]], (REF_AC[taus[i - 1]] if i > 0 else 1.0)
        c = math.sqrt(1 - ab) / (ab * S ** 2 + 1 - ab)                  # ε̂(x) = c (x - sqrt(ᾱ) MU)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        def mean_step(x: float) -> float:
            eps = c * (x - math.sqrt(ab) * MU)
            x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
            return math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma ** 2) * eps
        a, b = mean_step(1.0) - mean_step(0.0), mean_step(0.0)
        A, m, v = a * A, a * m + b, a * a * v + sigma ** 2
    return A, m, v


def oracle_run(steps: int, spacing: str = "uniform", **sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, output) of ddpm.sample with the exact ε, clip off; x_T recorded at the model's first call."""
    seen = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not seen:
            seen.append(x.double().clone())
        return exact_eps_model(x, t)

    out = ddpm.sample(SCHEDULE, model, ORACLE_SHAPE, steps=steps, spacing=spacing, clip=False,
                      generator=torch.Generator().manual_seed(0), **sampler)
    return seen[0], out.double()


def ddim_oracle_run(steps: int, eta: float, spacing: str = "uniform") -> tuple[torch.Tensor, torch.Tensor]:
    return oracle_run(steps, spacing, sampler="ddim", eta=eta)


def test_ddim_eta0_is_the_affine_map_of_x_T() -> None:
    """Sample by sample: output = clamp(A x_T + B). The float32 sampler drifts from the float64 map by rounding
    (~1e-7 relative per operation, 1000 steps, amplified up to 160x where x̂_0 divides by sqrt(ᾱ_t) and damped
    again by sqrt(ᾱ_{t-1})); measured 4e-6, allowed 1e-4, far below any error in a coefficient (a 1% error in
    A moves samples by ~1e-3)."""
    A, B, _ = ddim_law(list(range(T_PAPER)), 0.0)
    x_T, out = ddim_oracle_run(T_PAPER, 0.0)
    assert (out - (A * x_T + B).clamp(-1, 1)).abs().max() <= 1e-4


def test_ddim_eta0_over_all_T_steps_recovers_the_data_distribution() -> None:
    """DDIM with η = 0 integrates the probability-flow ODE: at T = 1000 its output's mean and variance are the
    data's within tolerance = the discretisation error (exact: |clamped moments of N(B, A²) - those of the
    data N(MU, S²)|, the same clamp on both) + Z standard errors of the estimators for n samples."""
    A, B, v = ddim_law(list(range(T_PAPER)), 0.0)
    assert v == pytest.approx(A * A)
    _, out = ddim_oracle_run(T_PAPER, 0.0)
    n = out.numel()
    mean, var = clamped_normal_moments(B, A * A)
    data_mean, data_var = clamped_normal_moments(MU, S ** 2)
    mean_tol = abs(mean - data_mean) + Z * math.sqrt(var / n)
    var_tol = abs(var - data_var) + Z * var * math.sqrt(2 / (n - 1))
    # The discretisation at T = 1000 is ~1% of the variance, of the order of one standard error: the ODE is
    # nearly exact here, and the tolerance is dominated by sampling error.
    assert abs(var - data_var) < 0.015 * data_var and abs(mean - data_mean) < 1e-3
    assert abs(out.mean().item() - data_mean) <= mean_tol, (out.mean().item(), data_mean, mean_tol)
    assert abs(out.var().item() - data_var) <= var_tol, (out.var().item(), data_var, var_tol)


@pytest.mark.parametrize("steps, eta, spacing", [(T_PAPER, 1.0, "uniform"), (50, 0.5, "quadratic"),
                                                 (20, 1.0, "trailing"), (50, 0.0, "leading")])
def test_ddim_matches_the_gaussian_oracle_law(steps: int, eta: float, spacing: str) -> None:
    """Mean and variance within Z standard errors of the exact law N(m, v) of η-DDIM on the spaced chain."""
    taus = ddpm.spaced_timesteps(T_PAPER, steps, spacing).tolist()
    _, m, v = ddim_law(taus, eta)
    _, out = ddim_oracle_run(steps, eta, spacing)
    assert is_within_oracle(out, (m, v)), (out.mean().item(), out.var().item(), clamped_normal_moments(m, v))


@pytest.mark.parametrize("run, other", [((50, 1.0, "uniform"), (50, 0.0, "uniform")),
                                        ((50, 0.0, "quadratic"), (50, 0.0, "uniform")),
                                        ((20, 1.0, "trailing"), (20, 0.5, "trailing"))])
def test_the_oracle_rejects_other_settings(run: tuple, other: tuple) -> None:
    """The oracle test above can fail: a run is > 10 standard errors away from the law of another η or spacing.
    (Not every pair is: at 50 steps the uniform and leading laws differ by 0.3% of the variance, a third of a
    standard error.)"""
    _, out = ddim_oracle_run(*run)
    _, m, v = ddim_law(ddpm.spaced_timesteps(T_PAPER, other[0], other[2]).tolist(), other[1])
    assert not is_within_oracle(out, (m, v), z=10)


# ----------------------------------------------------------------------------------------- ddim_step itself

def test_ddim_step_at_t0_returns_the_predicted_x0() -> None:
    g = torch.Generator().manual_seed(1)
    x, eps, z = (3 * torch.randn(4, 1, 3, 3, generator=g) for _ in range(3))
    t = torch.zeros(4, dtype=torch.long)
    for clip in (False, True):
        x0 = ddpm.predict_x0(SCHEDULE, eps, x, t)
        expected = x0.clamp(-1, 1) if clip else x0
        for eta in (0.0, 1.0):
            torch.testing.assert_close(ddpm.ddim_step(SCHEDULE, eps, x, t, z, eta=eta, clip=clip), expected)


def test_ddim_step_eta1_has_the_posterior_variance_and_eta0_none() -> None:
    """η = 1 adds σ_t² = β̃_t (DDIM eq. 16 is DDPM's eq. 7 variance on consecutive timesteps); η = 0 adds nothing.
    On the float64 schedule: in float32, 1 - ᾱ_t / ᾱ_{t-1} (= β_t ~ 1e-4 at t = 1) loses ~3 digits to
    cancellation, as it does in diffusers."""
    schedule = paper_schedule64()
    t = torch.arange(1, T_PAPER, 37)
    x = eps = torch.zeros(len(t), 1, 1, 1, dtype=F64)
    ones = torch.ones_like(x)
    noise_part = (ddpm.ddim_step(schedule, eps, x, t, ones, eta=1.0)
                  - ddpm.ddim_step(schedule, eps, x, t, 0 * ones, eta=1.0))
    torch.testing.assert_close(noise_part.flatten() ** 2, schedule.posterior_variance[t], rtol=1e-10, atol=0)
    assert torch.equal(ddpm.ddim_step(schedule, eps, x, t, ones), ddpm.ddim_step(schedule, eps, x, t, 0 * ones))


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_eta_outside_0_1_is_rejected(eta: float) -> None:
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="eta"):
        ddpm.ddim_step(SCHEDULE, x, x, torch.zeros(1, dtype=torch.long), x, eta=eta)
    with pytest.raises(ValueError, match="eta"):
        ddpm.sample(SCHEDULE, toy_model, (1, 1, 2, 2), steps=2, sampler="ddim", eta=eta)


@pytest.mark.parametrize("kwargs, name", [({"sampler": "euler"}, "sampler"), ({"spacing": "linspace"}, "uniform"),
                                          ({"variance": "learned"}, "variance"), ({"eta": 0.5}, "sampler 'ddim'"),
                                          ({"sampler": "dpm++2m", "eta": 0.5}, "sampler 'ddim'")])
def test_sample_rejects_bad_arguments_naming_them(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ddpm.sample(SCHEDULE, toy_model, (1, 1, 2, 2), steps=2, **kwargs)


# ------------------------------------------------------------------------ DPM-Solver++(2M) against diffusers

def dpmpp_scheduler(taus: list[int], *, clip: bool):
    """diffusers' DPMSolverMultistepScheduler as our dpm++2m: the paper's β, data prediction, second order, first
    order at the first step and at the last, which goes to σ = 0 (final_sigmas_type="zero"), on our timesteps.
    (use_lu_lambdas, its uniform-λ spacing, cannot be combined with given timesteps; euler_at_final only forces the
    first-order last step that final_sigmas_type="zero" forces already.) Our clip is its thresholding with the
    default sample_max_value=1.0: the threshold s is clamped to [1, 1], so x̂_0 is clamped to [-1, 1]."""
    module = pytest.importorskip("diffusers.schedulers.scheduling_dpmsolver_multistep", reason="needs diffusers")
    s = module.DPMSolverMultistepScheduler(num_train_timesteps=T_PAPER, beta_start=1e-4, beta_end=0.02,
                                           beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                           solver_type="midpoint", final_sigmas_type="zero", lower_order_final=True,
                                           euler_at_final=False, use_lu_lambdas=False, prediction_type="epsilon",
                                           thresholding=clip, sample_max_value=1.0)
    s.set_timesteps(timesteps=taus[::-1])
    assert s.timesteps.tolist() == taus[::-1]
    return s


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


def watched_sample(sampler: str, steps: int, spacing: str, clip: bool,
                   shape: tuple[int, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(every x toy_model saw, the output) of ddpm.sample with `sampler`, generator seed 5."""
    seen = []

    def spy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return toy_model(x, t)

    out = ddpm.sample(SCHEDULE, spy, shape, steps=steps, sampler=sampler, spacing=spacing, clip=clip,
                      generator=torch.Generator().manual_seed(5))
    return seen, out


@pytest.mark.parametrize("spacing", ddpm.SPACINGS)
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("clip", [False, True])
def test_every_dpmpp_2m_iterate_equals_diffusers(spacing: str, steps: int, clip: bool) -> None:
    """ddpm.sample(sampler="dpm++2m") against diffusers' loop with the same β, timesteps, ε function (toy_model: its
    x̂_0 leaves [-1, 1] often but not always) and x_T: every x the model sees, then the output, within 1e-5 of
    the largest |x| (diffusers computes in float32, its ᾱ by a float32 cumprod; measured at most 5.3e-6)."""
    taus = ddpm.spaced_timesteps(T_PAPER, steps, spacing).tolist()
    shape = (3, 2, 4, 4)
    seen, ours = watched_sample("dpm++2m", steps, spacing, clip, shape)
    theirs = dpmpp_scheduler(taus, clip=clip)
    x, clipped = torch.randn(shape, generator=torch.Generator().manual_seed(5)), 0  # x_T as ddpm.sample draws it
    for i, t in enumerate(theirs.timesteps):
        assert relative_error(seen[i], x) <= 1e-5, (i, int(t), relative_error(seen[i], x))
        eps = toy_model(x, t.expand(shape[0]))
        clipped += int((ddpm.predict_x0(SCHEDULE, eps, x, t.expand(shape[0])).abs() > 1).sum())
        x = theirs.step(eps, t, x).prev_sample
    assert len(seen) == steps and relative_error(ours, x.clamp(-1, 1)) <= 1e-5
    assert 0 < clipped < x.numel() * steps  # the clip has work to do, and not everywhere


def test_dpmpp_2m_step_is_ddims_step_first_and_returns_x0_last() -> None:
    """Without a previous prediction the step is first order: DDIM's (η = 0), with or without the clip, and the
    x̂_0 it hands on is the clamped one. At t = 0 it goes to ᾱ = 1 and returns x̂_0 (clamped with `clip`) whatever
    x0_prev is; at t = 1 x0_prev changes the step (second order). On the float64 schedule: the two forms agree to
    6e-13 there, while in float32 DDIM's step loses digits (to 3.5e-4 at t = 1 with the clip, in 1 - ᾱ_{t-1} and
    in ε re-derived from the clamped x̂_0) where ours does not (4e-7 from the float64 result)."""
    g = torch.Generator().manual_seed(1)
    x, eps, prev = (3 * torch.randn(4, 1, 3, 3, generator=g, dtype=F64) for _ in range(3))
    schedule = paper_schedule64()
    for clip in (False, True):
        for i in (0, 1, 500, T_PAPER - 1):
            t = torch.full((4,), i, dtype=torch.long)
            x0 = ddpm.predict_x0(schedule, eps, x, t)
            assert (x0.abs() > 1).any()  # the clip has work to do
            x0 = x0.clamp(-1, 1) if clip else x0
            out, handed_on = ddpm.dpmpp_2m_step(schedule, eps, x, t, None, clip=clip)
            torch.testing.assert_close(out, ddpm.ddim_step(schedule, eps, x, t, torch.zeros_like(x), clip=clip))
            assert torch.equal(handed_on, x0)
            if i == 0:
                assert torch.equal(out, x0)
                assert torch.equal(ddpm.dpmpp_2m_step(schedule, eps, x, t, prev, clip=clip)[0], x0)
            if i == 1:
                assert not torch.allclose(ddpm.dpmpp_2m_step(schedule, eps, x, t, prev, clip=clip)[0], out)


# -------------------------------------------------------------------- DPM-Solver++(2M) and the Gaussian oracle
#
# With the exact ε of Gaussian data (helpers.exact_eps_model) every step is affine in (x, the previous x̂_0), so
# x_T -> output is an affine map A x_T + B and the output law is N(B, A²). The recursion below is Algorithm 2 as
# the paper writes it (λ, h, r, e^{-h}; diffusers' form), in float64, independently of ddpm.py's DDIM-like form.

def dpmpp_law(taus: list[int]) -> tuple[float, float]:
    """(A, B): each quantity is carried as its (coefficient of x_T, constant)."""
    one = np.array([0.0, 1.0])
    x, x0_prev, lam_prev = np.array([1.0, 0.0]), None, None
    for i in reversed(range(len(taus))):
        ab = REF_AC[taus[i]]
        alpha, sigma = math.sqrt(ab), math.sqrt(1 - ab)
        eps = sigma / (ab * S ** 2 + 1 - ab) * (x - alpha * MU * one)
        x0 = (x - sigma * eps) / alpha
        if i == 0:  # to ᾱ = 1: σ = 0, h = ∞, first order: x = x̂_0
            return tuple(x0)
        alpha_to, sigma_to = math.sqrt(REF_AC[taus[i - 1]]), math.sqrt(1 - REF_AC[taus[i - 1]])
        lam = math.log(alpha / sigma)
        h = math.log(alpha_to / sigma_to) - lam
        if x0_prev is None:
            d = x0
        else:
            r = (lam - lam_prev) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = sigma_to / sigma * x - alpha_to * (math.exp(-h) - 1) * d
        x0_prev, lam_prev = x0, lam


def ode_solution() -> tuple[float, float]:
    """(A, B) of the exact probability-flow ODE from x_T ~ N(0, I) at t = T - 1: for Gaussian data it maps
    quantiles, x_t = sqrt(ᾱ_t) MU + sqrt(ᾱ_t S² + 1 - ᾱ_t) z. B misses MU by 3.8e-4, the prior's error (x_T has
    mean sqrt(ᾱ_{T-1}) MU = 1.3e-3, not 0), which no solver removes."""
    ab = REF_AC[-1]
    scale = math.sqrt(ab * S ** 2 + 1 - ab)
    return S / scale, MU - S * math.sqrt(ab) * MU / scale


def dpmpp_oracle_run(steps: int, spacing: str) -> tuple[torch.Tensor, torch.Tensor]:
    return oracle_run(steps, spacing, sampler="dpm++2m")


@pytest.mark.parametrize("steps, spacing", [(20, "uniform"), (50, "quadratic"), (200, "trailing"), (10, "leading")])
def test_dpmpp_2m_is_the_affine_map_of_x_T(steps: int, spacing: str) -> None:
    """Sample by sample: output = clamp(A x_T + B) within 1e-4 (float32 against float64: measured 1.2e-5 at most;
    a 1% error in A moves samples by ~3e-3)."""
    A, B = dpmpp_law(ddpm.spaced_timesteps(T_PAPER, steps, spacing).tolist())
    x_T, out = dpmpp_oracle_run(steps, spacing)
    assert (out - (A * x_T + B).clamp(-1, 1)).abs().max() <= 1e-4


# The law's error, (B - MU, |A| - S) for data N(0.2, 0.3²), float64, as measured (the mean's error includes the
# prior's -3.8e-4; against the ODE's own solution it is 1.1e-4, 4.1e-5, 2.8e-6 for uniform):
#              20 steps               50 steps               200 steps
#   uniform    -4.9e-4, +8.9e-2 (30%)  -4.2e-4, +3.2e-2 (11%)  -3.8e-4, +2.2e-3 (0.74%)
#   quadratic  -4.0e-4, +1.2e-2 (3.8%) -3.8e-4, +1.3e-3 (0.42%) -3.8e-4, -6.3e-5 (0.02%)
#   leading    -8.0e-4, +8.6e-2 (29%)  -5.1e-4, +3.1e-2 (10%)  -4.0e-4, +2.2e-3 (0.74%)
#   trailing   -3.3e-4, -4.1e-2 (14%)  -3.8e-4, -4.8e-3 (1.6%) -3.8e-4, -2.2e-5 (0.01%)
# Uniform and leading put few steps at low noise: at 20 uniform steps the step into τ_0 = 0 spans λ from 1.7 to 4.6,
# 4x the step before it, so the extrapolation D doubles the last change of x̂_0 while narrow data's x̂_0 still
# changes, and a correct second-order solver is 30% off in σ (DDIM: -21%). Quadratic spacing is dense at low noise
# and 8x closer at 20 steps (DDIM there: -9.4%).

@pytest.mark.parametrize("spacing", ddpm.SPACINGS)
def test_dpmpp_2m_law_converges_to_the_data_law_as_steps_grow(spacing: str) -> None:
    """The law's error against the ODE's exact solution shrinks in mean and in σ from 20 to 50 to 200 steps, and
    at 200 steps the law is the data's within 1% in σ and 5e-4 in mean (the prior's 3.8e-4 included)."""
    A_ode, B_ode = ode_solution()
    errors = []
    for steps in (20, 50, 200):
        A, B = dpmpp_law(ddpm.spaced_timesteps(T_PAPER, steps, spacing).tolist())
        errors.append((abs(B - B_ode), abs(abs(A) - A_ode)))
        if steps == 200:
            assert abs(B - MU) <= 5e-4 and abs(abs(A) - S) <= 0.01 * S, (B - MU, abs(A) - S)
    for coarse, fine in zip(errors, errors[1:]):
        assert fine[0] < coarse[0] and fine[1] < coarse[1], errors
    assert abs(B_ode - MU) < 4e-4 and abs(A_ode - S) < 1e-5


def test_dpmpp_2m_spacings_at_20_steps() -> None:
    """On narrow data, 20 uniform steps are still far off (σ 30% too large), quadratic steps 8x closer."""
    uniform, quadratic = (dpmpp_law(ddpm.spaced_timesteps(T_PAPER, 20, s).tolist()) for s in ("uniform", "quadratic"))
    assert abs(uniform[0]) - S > 0.25 * S and 0 < abs(quadratic[0]) - S < 0.05 * S


@pytest.mark.parametrize("spacing", ddpm.SPACINGS)
def test_dpmpp_2m_samples_have_the_data_law_at_200_steps(spacing: str) -> None:
    """The sampler's output: within Z standard errors of the data law at 200 steps and of its own law at 20; at 20
    uniform steps more than 10 standard errors from the data law (so the check at 200 steps can fail)."""
    data = (MU, S ** 2)
    _, out = dpmpp_oracle_run(200, spacing)
    assert is_within_oracle(out, data), (out.mean().item(), out.var().item(), clamped_normal_moments(*data))
    A, B = dpmpp_law(ddpm.spaced_timesteps(T_PAPER, 20, spacing).tolist())
    _, out = dpmpp_oracle_run(20, spacing)
    assert is_within_oracle(out, (B, A * A))
    if spacing == "uniform":
        assert not is_within_oracle(out, data, z=10)


# ------------------------------------------------------------ SDE-DPM-Solver++(2M): diffusers and the oracle

def dpmpp_sde_scheduler(taus: list[int], *, clip: bool):
    """dpmpp_scheduler's settings with algorithm_type="sde-dpmsolver++" (midpoint, as ours)."""
    s = dpmpp_scheduler(taus, clip=clip)
    s = type(s).from_config(s.config, algorithm_type="sde-dpmsolver++")
    s.set_timesteps(timesteps=taus[::-1])
    assert s.timesteps.tolist() == taus[::-1] and s.config.solver_type == "midpoint"
    return s


@pytest.mark.parametrize("spacing", ddpm.SPACINGS)
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("clip", [False, True])
def test_every_dpmpp_2m_sde_iterate_equals_diffusers(spacing: str, steps: int, clip: bool) -> None:
    """ddpm.sample(sampler="dpm++2m-sde") against diffusers' sde-dpmsolver++ loop given the same x_T and the same
    noise at every step (ours drawn from the generator after x_T, one draw per step, handed to diffusers as
    variance_noise): every x the model sees, then the output, within 2e-5 of the largest |x|. Measured at most
    1.5e-5: both chains are float32, and each is up to 1e-4 from the same chain in float64 (toy_model's x̂_0 divides
    by sqrt(ᾱ_t), up to 160x, which amplifies rounding); a wrong coefficient moves x by far more."""
    taus = ddpm.spaced_timesteps(T_PAPER, steps, spacing).tolist()
    shape = (3, 2, 4, 4)
    seen, ours = watched_sample("dpm++2m-sde", steps, spacing, clip, shape)
    theirs = dpmpp_sde_scheduler(taus, clip=clip)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g)
    for i, t in enumerate(theirs.timesteps):
        assert relative_error(seen[i], x) <= 2e-5, (i, int(t), relative_error(seen[i], x))
        z = torch.randn(shape, generator=g)
        x = theirs.step(toy_model(x, t.expand(shape[0])), t, x, variance_noise=z).prev_sample
    assert len(seen) == steps and relative_error(ours, x.clamp(-1, 1)) <= 2e-5


def test_dpmpp_2m_sde_step_is_the_ancestral_posterior_step_first_and_returns_x0_last() -> None:
    """Without a previous prediction the SDE step is the ancestral step with σ² = β̃ (the posterior's mean at
    x̂_0 and its variance), clip or not; at t = 0 it returns x̂_0 whatever the noise and x0_prev; at t = 1
    x0_prev changes the step (second order) and the noise enters with the posterior's σ."""
    g = torch.Generator().manual_seed(1)
    x, eps, prev, z = (3 * torch.randn(4, 1, 3, 3, generator=g, dtype=F64) for _ in range(4))
    schedule = paper_schedule64()
    for clip in (False, True):
        for i in (0, 1, 500, T_PAPER - 1):
            t = torch.full((4,), i, dtype=torch.long)
            x0 = ddpm.predict_x0(schedule, eps, x, t)
            x0 = x0.clamp(-1, 1) if clip else x0
            out, handed_on = ddpm.dpmpp_2m_sde_step(schedule, eps, x, t, z, None, clip=clip)
            # (unclipped, p_sample_step takes eq. 11's mean: the same in exact arithmetic)
            torch.testing.assert_close(out, ddpm.p_sample_step(schedule, eps, x, t, z, variance="posterior",
                                                               clip=clip), rtol=1e-9, atol=1e-9)
            assert torch.equal(handed_on, x0)
            if i == 0:
                assert torch.equal(out, x0)
                assert torch.equal(ddpm.dpmpp_2m_sde_step(schedule, eps, x, t, 5 * z, prev, clip=clip)[0], x0)
            if i == 1:
                assert not torch.allclose(ddpm.dpmpp_2m_sde_step(schedule, eps, x, t, z, prev, clip=clip)[0], out)
                noise_part = (ddpm.dpmpp_2m_sde_step(schedule, eps, x, t, z, prev, clip=clip)[0]
                              - ddpm.dpmpp_2m_sde_step(schedule, eps, x, t, 0 * z, prev, clip=clip)[0])
                torch.testing.assert_close(noise_part, schedule.posterior_variance[1].sqrt() * z)


def dpmpp_sde_law(taus: list[int]) -> tuple[float, float]:
    """(mean, variance) of the SDE solver's output for data N(MU, S²) with the exact ε: every quantity is affine in
    x_T and the step noises z_i (independent N(0, 1)), carried as its coefficients [x_T, z_{S-1}, ..., z_0, 1]; the
    recursion is diffusers' form (e^{-h}, e^{-2h}), in float64, independently of ddpm.py's."""
    n = len(taus)
    unit = np.eye(n + 2)
    x, x0_prev, lam_prev = unit[0], None, None
    for k, i in enumerate(reversed(range(n))):
        ab = REF_AC[taus[i]]
        alpha, sigma = math.sqrt(ab), math.sqrt(1 - ab)
        eps = sigma / (ab * S ** 2 + 1 - ab) * (x - alpha * MU * unit[-1])
        x0 = (x - sigma * eps) / alpha
        if i == 0:
            return x0[-1], float((x0[:-1] ** 2).sum())
        alpha_to, sigma_to = math.sqrt(REF_AC[taus[i - 1]]), math.sqrt(1 - REF_AC[taus[i - 1]])
        lam = math.log(alpha / sigma)
        h = math.log(alpha_to / sigma_to) - lam
        d = x0 if x0_prev is None else x0 + h / (2 * (lam - lam_prev)) * (x0 - x0_prev)
        x = (sigma_to / sigma * math.exp(-h) * x + alpha_to * (1 - math.exp(-2 * h)) * d
             + sigma_to * math.sqrt(1 - math.exp(-2 * h)) * unit[1 + k])
        x0_prev, lam_prev = x0, lam


# The law's error, (mean - MU, σ - S) for data N(0.2, 0.3²), float64, as measured (the SDE contracts the prior's
# mean error of 3.8e-4 that the ODE solvers keep; 1,000 steps visit every timestep, whatever the spacing):
#              20 steps                50 steps               200 steps              1000 steps
#   uniform    -7.3e-7, +1.8e-1 (60%)  -7.3e-7, +8.7e-2 (29%) -7.3e-7, +8.9e-3 (3.0%) -7.3e-7, +2.0e-4 (0.07%)
#   quadratic  -7.3e-7, +3.2e-2 (11%)  -7.3e-7, +4.4e-3 (1.5%) -7.3e-7, +2.1e-4 (0.07%)
#   leading    -1.9e-6, +1.7e-1 (58%)  -1.1e-6, +8.5e-2 (28%) -7.9e-7, +8.9e-3 (3.0%)
#   trailing   -7.3e-7, -4.5e-2 (-15%) -7.3e-7, +3.8e-3 (1.3%) -7.3e-7, +3.0e-3 (1.0%)
# On this narrow data the SDE solver needs more steps than the ODE solver (dpmpp_law: 30% at 20 uniform steps, 0.74%
# at 200): the noise it adds at each step is removed only as far as the extrapolated x̂_0 allows. Quadratic
# spacing is again the closest at few steps.
SDE_LAW_STEPS = (20, 50, 200, 1000)


@pytest.mark.parametrize("spacing", ddpm.SPACINGS)
def test_dpmpp_2m_sde_law_converges_to_the_data_law_as_steps_grow(spacing: str) -> None:
    """The output law's error in σ shrinks from 20 to 50 to 200 to 1,000 steps; at 1,000 steps the law is the
    data's within 0.1% in σ and 1e-5 in mean, at 200 within 3.5% in σ."""
    errors = []
    for steps in SDE_LAW_STEPS:
        mean, var = dpmpp_sde_law(ddpm.spaced_timesteps(T_PAPER, steps, spacing).tolist())
        errors.append(abs(math.sqrt(var) - S))
        if steps == 200:
            assert abs(math.sqrt(var) - S) <= 0.035 * S, math.sqrt(var) - S
        if steps == 1000:
            assert abs(mean - MU) <= 1e-5 and abs(math.sqrt(var) - S) <= 1e-3 * S, (mean - MU, math.sqrt(var) - S)
    assert all(fine < coarse for coarse, fine in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("steps, spacing", [(20, "uniform"), (20, "quadratic"), (50, "trailing"), (1000, "uniform")])
def test_dpmpp_2m_sde_samples_have_the_oracle_law(steps: int, spacing: str) -> None:
    """The sampler's output: within Z standard errors of its exact law; at 1,000 steps of the data law too, and at
    20 uniform steps more than 10 standard errors from it (so the check at 1,000 steps can fail)."""
    mean, var = dpmpp_sde_law(ddpm.spaced_timesteps(T_PAPER, steps, spacing).tolist())
    _, out = oracle_run(steps, spacing, sampler="dpm++2m-sde")
    assert is_within_oracle(out, (mean, var)), (out.mean().item(), out.var().item(), mean, var)
    if steps == 1000:
        assert is_within_oracle(out, (MU, S ** 2))
    if (steps, spacing) == (20, "uniform"):
        assert not is_within_oracle(out, (MU, S ** 2), z=10)


# ------------------------------------------------------------------------ determinism and original timesteps

def run_with_reseed(sampler: str, eta: float, reseed: bool) -> torch.Tensor:
    """ddpm.sample, where the model reseeds the generator at its first call when `reseed`: x_T is drawn already,
    every later draw changes."""
    gen = torch.Generator().manual_seed(3)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if reseed and t[0] == T_PAPER - 1:
            gen.manual_seed(12345)
        return toy_model(x, t)

    return ddpm.sample(SCHEDULE, model, (2, 1, 4, 4), steps=10, sampler=sampler, eta=eta, generator=gen)


def test_ddim_eta0_and_dpmpp_2m_are_deterministic_given_x_T() -> None:
    for sampler in ("ddim", "dpm++2m"):
        assert torch.equal(run_with_reseed(sampler, 0.0, False), run_with_reseed(sampler, 0.0, True)), sampler
    for sampler, eta in (("ddim", 0.5), ("ddpm", 0.0), ("dpm++2m-sde", 0.0)):  # samplers that draw later
        assert not torch.equal(run_with_reseed(sampler, eta, False), run_with_reseed(sampler, eta, True))
    other_x_T = ddpm.sample(SCHEDULE, toy_model, (2, 1, 4, 4), steps=10, sampler="ddim",
                            generator=torch.Generator().manual_seed(4))
    assert not torch.equal(run_with_reseed("ddim", 0.0, False), other_x_T)


@pytest.mark.parametrize("sampler, spacing", [("ddim", "quadratic"), ("ddim", "trailing"), ("ddpm", "quadratic"),
                                              ("ddim", "uniform"), ("dpm++2m", "quadratic"), ("dpm++2m", "leading"),
                                              ("dpm++2m-sde", "trailing")])
def test_respaced_samplers_pass_original_timesteps_to_the_model(sampler: str, spacing: str) -> None:
    calls = []

    def spy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert (t == t[0]).all() and t.dtype == torch.long
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    ddpm.sample(SCHEDULE, spy, (2, 1, 2, 2), steps=30, sampler=sampler, spacing=spacing,
                generator=torch.Generator().manual_seed(0))
    assert calls == ddpm.spaced_timesteps(T_PAPER, 30, spacing).flip(0).tolist()  # not positions 29, ..., 0


# ---------------------------------------------------------------------------------------------- spacings

@given(T=st.integers(1, 3000), data=st.data())
def test_spacings_are_increasing_in_range_of_the_requested_length(T: int, data) -> None:
    steps = data.draw(st.integers(1, T))
    for spacing in ddpm.SPACINGS:
        taus = ddpm.spaced_timesteps(T, steps, spacing).tolist()
        assert len(taus) == steps and all(a < b for a, b in zip(taus, taus[1:])), (spacing, taus)
        assert 0 <= taus[0] and taus[-1] < T, (spacing, taus)
        if steps == T:
            assert taus == list(range(T)), spacing
    uniform, quadratic, leading, trailing = (ddpm.spaced_timesteps(T, steps, s).tolist() for s in ddpm.SPACINGS)
    if steps > 1:  # the documented ends
        assert uniform[0] == quadratic[0] == leading[0] == 0
        assert uniform[-1] == quadratic[-1] == trailing[-1] == T - 1
        assert leading[-1] == (steps - 1) * (T // steps) and trailing[0] == round(T / steps) - 1
    else:
        assert uniform == quadratic == trailing == [T - 1] and leading == [0]
    if (steps - 1) ** 2 <= T - 1:  # DDIM's floor(c i²) is strictly increasing on its own here: it is ours exactly
        c = (T - 1) / max(steps - 1, 1) ** 2
        # (+1e-9 undoes float rounding below an integer; a true fraction is at least 1 / (S - 1)² > 1e-7 from one.)
        assert steps == 1 or quadratic == [math.floor(c * i * i + 1e-9) for i in range(steps)]


def test_quadratic_and_uniform_differ_and_quadratic_is_dense_at_low_noise() -> None:
    uniform, quadratic = (ddpm.spaced_timesteps(T_PAPER, 20, s).tolist() for s in ("uniform", "quadratic"))
    assert uniform != quadratic and uniform[0] == quadratic[0] and uniform[-1] == quadratic[-1]
    assert quadratic[1] - quadratic[0] < uniform[1] - uniform[0] and quadratic[-1] - quadratic[-2] > 1.5 * (
        uniform[-1] - uniform[-2])
    assert quadratic == [math.floor(999 / 361 * i * i + 1e-9) for i in range(20)]  # DDIM App. D.2, c = (T - 1) / 19²


@pytest.mark.parametrize("args, name", [((10, 0, "uniform"), "steps"), ((10, 11, "uniform"), "steps"),
                                        ((0, 1, "uniform"), "num_timesteps"), ((10, 5, "cubic"), "spacing")])
def test_spaced_timesteps_rejects_bad_arguments(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ddpm.spaced_timesteps(*args)


# --------------------------------------------------------------------------------------------- variance auto

def test_variance_auto_is_beta_at_all_steps_and_posterior_when_respaced() -> None:
    assert ddpm.resolve_variance("auto", None, 1000) == ddpm.resolve_variance("auto", 1000, 1000) == "beta"
    assert ddpm.resolve_variance("auto", 999, 1000) == ddpm.resolve_variance("auto", 1, 1000) == "posterior"
    for v in ("beta", "posterior"):
        assert ddpm.resolve_variance(v, 50, 1000) == ddpm.resolve_variance(v, None, 1000) == v
    with pytest.raises(ValueError, match="variance"):
        ddpm.resolve_variance("large", None, 1000)
    schedule = ddpm.make_schedule(40)

    def run(steps, variance):
        return ddpm.sample(schedule, toy_model, (2, 1, 4, 4), steps=steps, variance=variance,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(10, "auto"), run(10, "posterior")) and not torch.equal(run(10, "auto"), run(10, "beta"))
    assert torch.equal(run(None, "auto"), run(None, "beta")) and not torch.equal(run(None, "auto"),
                                                                                 run(None, "posterior"))


SAMPLE_SETTINGS = ("sampler", "eta", "spacing", "variance")


@pytest.mark.parametrize("function", [ddpm.sample, sample.generate])
def test_the_python_defaults_are_the_configs(function) -> None:
    """One default for each setting (issue 25): ddpm.sample and sample.generate default to config.yaml's sample.*,
    as the CLIs do (sample.add_sampler_arguments), so Python and the CLI give the same samples for the same
    settings. (Both defaulted to variance "beta" before: the worst choice when respaced.)"""
    default = inspect.signature(function).parameters["settings"].default  # a ddpm.Sampling
    assert {k: getattr(default, k) for k in SAMPLE_SETTINGS} == {k: getattr(config.Sample(), k)
                                                                 for k in SAMPLE_SETTINGS}


def test_ddpm_sample_respaced_defaults_to_the_posterior_variance() -> None:
    def run(**kw) -> torch.Tensor:
        return ddpm.sample(SCHEDULE, toy_model, (2, 1, 4, 4), steps=50, generator=torch.Generator().manual_seed(0),
                           **kw)
    assert torch.equal(run(), run(variance="posterior")) and not torch.equal(run(), run(variance="beta"))


def test_variance_does_not_apply_to_the_deterministic_samplers() -> None:
    for sampler in ("ddim", "dpm++2m"):
        runs = [ddpm.sample(SCHEDULE, toy_model, (2, 1, 4, 4), steps=10, sampler=sampler, variance=v,
                            generator=torch.Generator().manual_seed(0)) for v in ddpm.VARIANCES]
        assert all(torch.equal(runs[0], r) for r in runs[1:]), sampler


# ------------------------------------------------------------------------------------------------ the config

@pytest.mark.parametrize("override, key", [("sample.sampler=euler", "sample.sampler"),
                                           ("sample.eta=1.5", "sample.eta"), ("sample.eta=-0.1", "sample.eta"),
                                           ("sample.spacing=linspace", "sample.spacing"),
                                           ("sample.variance=learned", "sample.variance"),
                                           ("sample.eta=0.5", "sample.eta")])  # eta with the ddpm sampler
def test_config_rejects_bad_sampler_settings(override: str, key: str) -> None:
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load_config(None, [override])


def test_config_sampler_settings_and_defaults() -> None:
    c = config.load_config(None, ["sample.sampler=ddim", "sample.eta=0.5", "sample.spacing=quadratic",
                                  "sample.variance=posterior"]).sample
    assert (c.sampler, c.eta, c.spacing, c.variance) == ("ddim", 0.5, "quadratic", "posterior")
    assert config.load_config(ROOT_CONFIG).sample == config.Sample()


def test_config_takes_dpmpp_2m_and_no_eta_with_it() -> None:
    c = config.load_config(None, ["sample.sampler=dpm++2m", "sample.spacing=quadratic", "sample.steps=20"]).sample
    assert (c.sampler, c.eta, c.spacing, c.steps) == ("dpm++2m", 0.0, "quadratic", 20)
    with pytest.raises(config.ConfigError, match=r"sample\.eta"):
        config.load_config(None, ["sample.sampler=dpm++2m", "sample.eta=0.5"])


ROOT_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def old_config(cfg: dict) -> dict:
    """A checkpoint's config as written before sampler, eta and spacing existed (variance was beta)."""
    cfg = json.loads(json.dumps(cfg))
    for key in ("sampler", "eta", "spacing"):
        del cfg["sample"][key]
    cfg["sample"]["variance"] = "beta"
    return cfg


def test_config_diff_lets_sample_settings_change_on_resume() -> None:
    now = config.to_dict(tiny_config())
    assert train.config_diff(old_config(now), now) == []
    other = config.to_dict(tiny_config(**{"sample.sampler": "ddim", "sample.steps": 7, "sample.num_images": 9}))
    assert train.config_diff(now, other) == []
    assert train.config_diff(now, config.to_dict(tiny_config(**{"train.lr": 5e-4}))) == ["train.lr"]


def test_an_old_checkpoint_resumes_under_the_new_defaults(workdir: Path, monkeypatch) -> None:
    """A 1-epoch run whose checkpoint carries the old config goes on to 3 epochs with today's settings (training
    only the 2 missing epochs) and ends bitwise where a straight 3-epoch run ends (the sample settings do not touch
    training)."""
    three_epochs = tiny_config(**{"train.epochs": 3})
    out = Path(three_epochs.out_dir)
    train.train(three_epochs, progress=False)
    straight = checkpoint.load_checkpoint(out / "checkpoint.pt")
    steps_per_epoch = straight["step"] // 3
    shutil.rmtree(out)
    train.train(tiny_config(), progress=False)  # 1 epoch, into the same out_dir
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    state["config"] = old_config(state["config"])
    torch.save(state, out / "checkpoint.pt")
    steps, real_step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    train.train(three_epochs, progress=False)
    assert len(steps) == 2 * steps_per_epoch  # resumed, not started over
    assert_same_training(checkpoint.load_checkpoint(out / "checkpoint.pt"), straight)


def test_training_grids_use_the_configs_sampler(workdir: Path) -> None:
    settings = {"sample.sampler": "ddim", "sample.eta": 0.3, "sample.spacing": "quadratic", "sample.steps": 6}
    cfg = tiny_config(**settings, **{"sample.every_epochs": 1, "out_dir": "runs/ddim"})
    train.train(cfg, progress=False)
    state = checkpoint.load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")
    grid = decode_png(Path(cfg.out_dir) / "samples" / "epoch_001.png")

    def regenerate(**kw) -> torch.Tensor:
        images = sample.generate(checkpoint.model_from_checkpoint(state), sample.schedule_from_config(state["config"]),
                                 4, steps=6, seed=train.derive_seed(cfg.seed, 3), **kw)
        return sample.image_grid(images).permute(2, 0, 1)
    assert torch.equal(grid, regenerate(sampler="ddim", eta=0.3, spacing="quadratic"))
    assert not torch.equal(grid, regenerate(variance="auto"))


# ---------------------------------------------------------------------------------------- sample.py, evaluate.py

@pytest.fixture
def old_checkpoint(tmp_path: Path) -> Path:
    """A tiny checkpoint (T = 20) whose saved config predates the sampler keys."""
    path = make_checkpoint(tmp_path / "run" / "checkpoint.pt")
    state = torch.load(path, weights_only=True)
    state["config"] = old_config(state["config"])
    torch.save(state, path)
    return path


def test_sample_cli_options_reach_the_sampler(old_checkpoint: Path, tmp_path: Path) -> None:
    state = checkpoint.load_checkpoint(old_checkpoint)
    model, schedule = checkpoint.model_from_checkpoint(state), sample.schedule_from_config(state["config"])
    base = ["--checkpoint", str(old_checkpoint), "--num-images", "3", "--steps", "5", "--device", "cpu"]
    runs = {"ddim": dict(sampler="ddim", eta=0.5, spacing="quadratic"), "beta": dict(variance="beta"),
            "dpm": dict(sampler="dpm++2m", spacing="trailing"), "default": {}}
    flags = {"ddim": ["--sampler", "ddim", "--eta", "0.5", "--spacing", "quadratic"], "beta": ["--variance", "beta"],
             "dpm": ["--sampler", "dpm++2m", "--spacing", "trailing"], "default": []}
    images = {}
    for name, kw in runs.items():
        npz = tmp_path / f"{name}.npz"
        sample.main([*base, *flags[name], "--out", str(tmp_path / f"{name}.png"), "--npz", str(npz)])
        with np.load(npz) as f:
            images[name] = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2)
        expected = sample.generate(model, schedule, 3, steps=5, **kw)  # generate's own defaults: the CLI's
        assert torch.equal(images[name], expected), name
    assert all(not torch.equal(images[name], images["default"]) for name in ("ddim", "beta", "dpm"))


@pytest.mark.parametrize("flags, message", [(["--sampler", "ddpm", "--eta", "0.5"], "--sampler ddim"),
                                            (["--sampler", "dpm++2m", "--eta", "0.5"], "--sampler ddim"),
                                            (["--sampler", "ddim", "--eta", "2"], "--eta")])
def test_sample_cli_rejects_eta_it_cannot_use(flags: list[str], message: str, old_checkpoint: Path, tmp_path: Path,
                                              capsys) -> None:
    with pytest.raises(SystemExit) as e:
        sample.main(["--checkpoint", str(old_checkpoint), "--out", str(tmp_path / "s.png"), *flags])
    assert e.value.code == 2 and message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "s.png").exists()


def eval_args(tmp_path: Path) -> dict:
    ref = tmp_path / "ref.npz"
    if not ref.exists():
        g = torch.Generator().manual_seed(0)
        np.savez(ref, torch.randint(0, 256, (16, 32, 32, 3), generator=g, dtype=torch.uint8).numpy())
    return dict(num_samples=12, steps=5, batch_size=4, seed=3, ref=ref, device="cpu", extractor=TinyExtractor(),
                progress=False, stats_cache=tmp_path / "stats")


def test_evaluate_keeps_samplers_apart_and_names_them(old_checkpoint: Path, tmp_path: Path) -> None:
    folder = old_checkpoint.parent / "eval"
    ddpm_result = ev.evaluate(old_checkpoint, variance="auto", **eval_args(tmp_path))
    ddpm_shards = {p.name: p.read_bytes() for p in (folder / "samples_5_posterior_3").glob("shard_*.npy")}
    ddim_result = ev.evaluate(old_checkpoint, sampler="ddim", spacing="quadratic", **eval_args(tmp_path))
    ddim_folder = folder / "samples_5_quadratic_ddim-eta0.0_3"
    assert len(ddpm_shards) == 3 and len(list(ddim_folder.glob("shard_*.npy"))) == 3
    assert {p.name: p.read_bytes() for p in (folder / "samples_5_posterior_3").glob("shard_*.npy")} == ddpm_shards
    meta = json.loads((ddim_folder / "meta.json").read_text())
    assert (meta["sampler"], meta["eta"], meta["spacing"], meta["variance"]) == ("ddim", 0.0, "quadratic", None)
    # The shards are the DDIM samples: generate with the same settings and the shard seed convention.
    state = checkpoint.load_checkpoint(old_checkpoint)
    direct = sample.generate(checkpoint.model_from_checkpoint(state), sample.schedule_from_config(state["config"]),
                             12, batch_size=4, steps=5, sampler="ddim", spacing="quadratic", seed=3 * ev.SEED_STRIDE)
    shards = torch.cat([torch.from_numpy(np.load(ddim_folder / f"shard_{k:05d}.npy")) for k in range(3)])
    assert torch.equal(shards, direct)
    assert ddim_result["fid"] != ddpm_result["fid"]
    assert (ddim_result["sampler"], ddim_result["spacing"], ddim_result["variance"]) == ("ddim", "quadratic", None)
    assert ddpm_result["variance"] == "posterior"  # auto, respaced
    assert "sampler ddim" in ddim_result["note"] and "variance posterior" in ddpm_result["note"]
    assert "DDIM eta 0.0" in ev.summary(ddim_result, "x") and "5 quadratic steps" in ev.summary(ddim_result, "x")


def test_evaluate_reuses_shards_written_before_the_sampler_keys(old_checkpoint: Path, tmp_path: Path) -> None:
    first = ev.evaluate(old_checkpoint, variance="beta", **eval_args(tmp_path))
    meta_path = old_checkpoint.parent / "eval" / "samples_5_beta_3" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("sampler", "eta", "spacing")}))
    calls = []
    again = ev.evaluate(old_checkpoint, variance="beta", **eval_args(tmp_path),
                        generate=lambda *a, **k: calls.append(k) or sample.generate(*a, **k))
    assert calls == []  # the old shards are the same samples: nothing is sampled again
    assert again["fid"] == first["fid"] and again["sampler"] == "ddpm"


def test_evaluate_cli_flags_reach_the_evaluation(old_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ev, "inception_extractor", lambda device: TinyExtractor())
    args = eval_args(tmp_path)
    ev.main(["--checkpoint", str(old_checkpoint), "--num-samples", "12", "--steps", "5", "--batch-size", "4",
             "--seed", "3", "--ref", str(args["ref"]), "--stats-cache", str(args["stats_cache"]), "--device", "cpu",
             "--sampler", "ddim", "--eta", "0.25", "--spacing", "trailing", "--metrics", str(tmp_path / "m.json")])
    result = json.loads((tmp_path / "m.json").read_text())
    assert (result["sampler"], result["eta"], result["spacing"]) == ("ddim", 0.25, "trailing")
    assert (old_checkpoint.parent / "eval" / "samples_5_trailing_ddim-eta0.25_3").is_dir()


def test_evaluate_cli_takes_dpmpp_2m(old_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    """--sampler dpm++2m reaches evaluate.py through sample.add_sampler_arguments, and the shards are its samples."""
    monkeypatch.setattr(ev, "inception_extractor", lambda device: TinyExtractor())
    args = eval_args(tmp_path)
    ev.main(["--checkpoint", str(old_checkpoint), "--num-samples", "12", "--steps", "5", "--batch-size", "4",
             "--seed", "3", "--ref", str(args["ref"]), "--stats-cache", str(args["stats_cache"]), "--device", "cpu",
             "--sampler", "dpm++2m", "--spacing", "quadratic", "--metrics", str(tmp_path / "m.json")])
    result = json.loads((tmp_path / "m.json").read_text())
    assert (result["sampler"], result["eta"], result["spacing"], result["variance"]) == ("dpm++2m", 0.0, "quadratic",
                                                                                         None)
    folder = old_checkpoint.parent / "eval" / ev.samples_folder(5, 3, "dpm++2m", 0.0, "quadratic", None)
    shards = torch.cat([torch.from_numpy(np.load(folder / f"shard_{k:05d}.npy")) for k in range(3)])
    state = checkpoint.load_checkpoint(old_checkpoint)
    direct = sample.generate(checkpoint.model_from_checkpoint(state), sample.schedule_from_config(state["config"]),
                             12, batch_size=4, steps=5, sampler="dpm++2m", spacing="quadratic", seed=3 * ev.SEED_STRIDE)
    assert torch.equal(shards, direct)


def test_evaluate_keeps_dpmpp_2m_shards_apart_from_ddims() -> None:
    assert ev.samples_folder(20, 0, "dpm++2m", 0.0, "uniform", None) != ev.samples_folder(20, 0, "ddim", 0.0, "uniform",
                                                                                          None)


def test_only_the_papers_settings_are_comparable_with_the_paper() -> None:
    paper = dict(num_samples=50_000, steps=1000, dataset="cifar10", sampler="ddpm", variance="beta")
    assert ev.paper_differences(**paper) == []
    for change, reason in [({"sampler": "ddim", "variance": None}, "sampler ddim"),
                           ({"variance": "posterior"}, "variance posterior"), ({"steps": 100}, "100 steps"),
                           ({"num_samples": 5000}, "5000 samples"), ({"dataset": "fashion-mnist"}, "dataset")]:
        assert [r for r in ev.paper_differences(**{**paper, **change}) if reason in r], change


def test_the_grids_sampler_does_not_change_the_trained_weights(workdir: Path) -> None:
    """Grids (and FID during training) draw from their own generators: a run that samples its grids with DDIM and
    one that samples them ancestrally train the same weights bit for bit, and their grids differ."""
    runs = {}
    for sampler in ("ddpm", "ddim"):
        cfg = tiny_config(**{"train.epochs": 2, "sample.every_epochs": 1, "sample.sampler": sampler,
                             "out_dir": f"runs/{sampler}"})
        train.train(cfg, progress=False)
        runs[sampler] = checkpoint.load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")
    for key in ("model", "ema"):
        a, b = runs["ddpm"][key], runs["ddim"][key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    grids = [Path(f"runs/{sampler}/samples/epoch_002.png").read_bytes() for sampler in ("ddpm", "ddim")]
    assert grids[0] != grids[1]
