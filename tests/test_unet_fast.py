"""The UNet's faster formulations compute what the plain ones do: nearest upsampling + 3x3 convolution as one
transposed convolution, the CPU dropout with its integer-threshold mask (nn.Dropout's law), attention without copies
(tests/test_unet.py checks it against an einsum reference)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unet import Dropout, Upsample, upsample_conv


def plain_upsample_conv(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("h, w", [(1, 1), (2, 3), (5, 4), (8, 8)])
def test_upsample_conv_is_upsampling_then_the_3x3_convolution(h: int, w: int) -> None:
    """In float64 to rounding, forward and gradients (input, weight, bias), on odd and non-square sizes too."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1).double()
    x = torch.randn(2, 5, h, w, dtype=torch.float64, requires_grad=True)
    ours = upsample_conv(x, conv.weight, conv.bias)
    ref = plain_upsample_conv(x, conv)
    assert ours.shape == (2, 7, 2 * h, 2 * w)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(ours, (x, conv.weight, conv.bias), g)
    ref_grads = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_upsample_module_keeps_its_keys_and_layout_and_computes_the_same_on_both_paths() -> None:
    torch.manual_seed(0)
    up = Upsample(32)
    assert set(up.state_dict()) == {"1.weight", "1.bias"}  # checkpoints and the diffusers mapping name up.k.1.*
    for size in (4, 8, 16):  # 4x4: below MIN_PIXELS, the two steps; 8x8 and up: the transposed convolution
        x = torch.randn(2, 32, size, size)
        torch.testing.assert_close(up(x), plain_upsample_conv(x, up[1]), rtol=0, atol=1e-5)
        cl = up(x.contiguous(memory_format=torch.channels_last))
        assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
        torch.testing.assert_close(cl, up(x), rtol=0, atol=1e-5)


def test_dropout_zeroes_a_fraction_p_and_scales_the_rest_to_keep_the_mean() -> None:
    torch.manual_seed(0)
    p, n = 0.1, 2_000_000
    y = Dropout(p).train()(torch.ones(n))
    kept = y != 0
    # the kept fraction of n Bernoulli(1 - p) draws: within 6 standard deviations
    assert abs(kept.float().mean().item() - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)
    scale = y[kept].unique()
    assert len(scale) == 1 and scale.item() == pytest.approx(1 / (1 - p), rel=2**-24)  # float32's rounding of it
    assert y.double().mean().item() == pytest.approx(1.0, abs=6 * math.sqrt(p / (1 - p) / n))


def test_dropout_masks_are_independent_of_position_and_the_gradient_uses_the_same_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 64, 32, 32, requires_grad=True)
    y = Dropout(0.5).train()(x)
    kept = (y != 0).float()
    # each 32-bit half of a 64-bit draw decides its own element: neighbours agree half the time, not always
    assert 0.45 < (kept.flatten()[::2] == kept.flatten()[1::2]).float().mean().item() < 0.55
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept * 2.0, rtol=0, atol=0)


def test_dropout_draws_from_the_global_generator_and_is_off_in_eval_and_at_p_0() -> None:
    x = torch.randn(3, 8, 5, 5)
    d = Dropout(0.3).train()
    torch.manual_seed(1)
    a = d(x)
    torch.manual_seed(1)
    assert torch.equal(d(x), a) and not torch.equal(d(x), a)  # the same seed, the same mask; the next draw differs
    assert torch.equal(d.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    assert Dropout(0.3).train()(x.double()).dtype == torch.float64
