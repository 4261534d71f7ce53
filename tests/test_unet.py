"""Properties of the DDPM UNet (unet.py): shapes, conditioning on t, gradient flow, batch independence, dtype,
size, argument checks, devices, and bitwise reproducibility of ddpm's loss and sampler with it."""
import math

import pytest
import torch
import torch.nn.functional as F

import ddpm
from unet import AttnBlock, UNet, timestep_embedding

# Small enough to run in milliseconds on one CPU thread. dropout = 0: nn.Dropout draws from the global RNG, not
# from a generator we pass, so tests that need determinism in train mode turn it off.
TINY = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, image_size=8)


def tiny_unet(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)  # the initial weights come from the global generator
    return UNet(**{**TINY, **overrides})


def randomize_zero_parameters(model: UNet, seed: int = 0, std: float = 0.05) -> UNet:
    """Give every all-zero parameter (the zero-initialised conv_out, residual conv2 and attention proj, and the
    GroupNorm biases) random values, so that the untrained network computes something that depends on its inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def random_inputs(model: UNet, batch: int, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, generator=gen, dtype=dtype)
    return x, torch.randint(0, 1000, (batch,), generator=gen)


@pytest.mark.parametrize("kwargs, expected_channels", [
    (dict(), 3),                                                         # the tiny model
    (dict(in_channels=1, image_size=32), 1),                             # 1-channel 32x32
    (dict(in_channels=3, out_channels=6), 6),                            # e.g. ε and a variance
    (dict(image_size=32, attn_resolutions=(16,)), 3),                    # attention at 16 in a tiny model
    (dict(image_size=16, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8, 4)), 3),
])
def test_output_shape(kwargs, expected_channels):
    model = tiny_unet(**kwargs)
    x, t = random_inputs(model, 2)
    out = model(x, t)
    assert out.shape == (2, expected_channels, model.image_size, model.image_size)
    # The output layer is zero-initialised (as in the original DDPM code): the untrained model predicts ε = 0.
    assert not out.any()


def test_attention_blocks_sit_at_the_requested_resolution():
    # image 32, channel_mult (1, 2): resolutions 32 and 16. At 16: one block on the way down, two on the way up,
    # plus the one in the middle, which is always there.
    with_attn = sum(isinstance(m, AttnBlock) for m in tiny_unet(image_size=32, attn_resolutions=(16,)).modules())
    without = sum(isinstance(m, AttnBlock) for m in tiny_unet(image_size=32).modules())
    assert (with_attn, without) == (4, 1)


def test_output_depends_on_t_and_x():
    model = randomize_zero_parameters(tiny_unet()).eval()
    x, _ = random_inputs(model, 1)
    with torch.no_grad():
        out_t1, out_t2 = model(x, torch.tensor([1])), model(x, torch.tensor([500]))
        out_x2 = model(x + 0.1, torch.tensor([1]))
    assert out_t1.abs().max() > 0
    assert (out_t1 - out_t2).abs().max() > 1e-4, "the time embedding must reach the output"
    assert (out_t1 - out_x2).abs().max() > 1e-4


def test_every_parameter_gets_a_gradient_after_two_sgd_steps():
    # With zero-initialised conv_out, the first backward pass reaches only conv_out (everything upstream is
    # multiplied by its zero weights); with zero-initialised residual conv2 / attention proj, the second reaches those
    # but not the layers inside their blocks. So look at the third backward pass, after two SGD steps.
    model = tiny_unet(attn_resolutions=(4,), dropout=0.1)  # attention and a channel-changing skip conv included
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t = random_inputs(model, 4)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        optimizer.zero_grad()
        F.mse_loss(model(x, t), target).backward()
        with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.any()}
        if step == 0:
            assert with_grad == {"conv_out.weight", "conv_out.bias"}
        optimizer.step()
    assert with_grad == {name for name, _ in model.named_parameters()}


# Convolutions may sum in another order for another batch size: allow rounding, nothing more. Outputs are O(1) here;
# a sample leaking into another would move them by O(0.01) or more.
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_a_batch_equals_its_samples_run_one_by_one(dtype, atol):
    # eval() turns dropout off; GroupNorm and attention must not mix samples.
    model = randomize_zero_parameters(tiny_unet(image_size=16, attn_resolutions=(8,), dropout=0.1)).to(dtype).eval()
    x, t = random_inputs(model, 4, dtype=dtype)
    with torch.no_grad():
        batched = model(x, t)
        one_by_one = torch.cat([model(x[i:i + 1], t[i:i + 1]) for i in range(4)])
    assert batched.abs().max() > 1e-2
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    model = randomize_zero_parameters(tiny_unet()).to(dtype)
    x, t = random_inputs(model, 2, dtype=dtype)
    assert model(x, t).dtype == dtype


def test_parameter_count_at_the_defaults_is_the_papers():
    # Ho et al. 2020, Appendix B: 35.7M parameters for CIFAR-10; exactly 35,746,307 in hojonathanho/diffusion's
    # model (and in diffusers' UNet2DModel of google/ddpm-cifar10-32, tests/test_bench.py).
    assert sum(p.numel() for p in UNet().parameters()) == 35_746_307


def test_attention_block_equals_an_einsum_reference():
    """AttnBlock: x + proj(softmax(q k^T / sqrt(C)) v) over the H*W positions, with q, k, v the 1x1 convolutions
    of GroupNorm(x) (hojonathanho/diffusion's attn_block), written out here with einsum in float64."""
    torch.manual_seed(0)
    block = AttnBlock(64, 1e-6).double()  # the paper's GroupNorm eps
    with torch.no_grad():
        block.proj.weight.normal_(0, 0.1)  # zero-initialised: the block would be the identity
        block.proj.bias.normal_(0, 0.1)
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    h = block.norm(x)
    w_qkv, b_qkv = block.qkv.weight[:, :, 0, 0], block.qkv.bias  # (3C, C), (3C,)
    q, k, v = (torch.einsum("oc,bchw->bohw", w_qkv, h) + b_qkv[None, :, None, None]).chunk(3, dim=1)
    weights = torch.einsum("bchw,bcij->bhwij", q, k) / math.sqrt(64)  # every position against every position
    weights = weights.reshape(2, 4, 4, 16).softmax(dim=-1).reshape(2, 4, 4, 4, 4)
    attended = torch.einsum("bhwij,bcij->bchw", weights, v)
    expected = x + torch.einsum("oc,bchw->bohw", block.proj.weight[:, :, 0, 0], attended) \
        + block.proj.bias[None, :, None, None]
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=48), "channels must be a positive multiple of 32"),
    (dict(channels=0), "channels must be a positive multiple of 32"),
    (dict(image_size=12, channel_mult=(1, 2, 2, 2)), r"image_size 12 is not divisible by .* = 8"),
    (dict(attn_resolutions=(5,)), r"attn_resolutions \[5\] are never reached"),
    (dict(in_channels=0), "in_channels"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(channel_mult=(1, 0)), "channel_mult"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_unet(**kwargs)


def test_forward_asserts_on_wrong_input_shapes():
    model = tiny_unet()
    x, t = random_inputs(model, 2)
    with pytest.raises(AssertionError, match="expected"):
        model(x[:, :1], t)
    with pytest.raises(AssertionError, match="t must have shape"):
        model(x, t[:, None])


@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_shape_and_values(dim):
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, dim)
    assert emb.shape == (3, dim) and emb.dtype == torch.float32
    half = dim // 2
    # t = 0: sin(0) = 0 and cos(0) = 1; the odd dimension is zero padding.
    assert torch.equal(emb[0, :half], torch.zeros(half)) and torch.equal(emb[0, half:2 * half], torch.ones(half))
    assert dim % 2 == 0 or not emb[:, -1].any()
    # The first frequency is 1: the pair (sin t, cos t). The last is 1/10000 (the Transformer's and DDPM's
    # exp(-ln(10000) * i / (half - 1)) at i = half - 1): at t = 999 the pair (sin 0.0999, cos 0.0999).
    torch.testing.assert_close(emb[1, [0, half]], torch.tensor([math.sin(1), math.cos(1)]))
    torch.testing.assert_close(emb[2, [half - 1, 2 * half - 1]], torch.tensor([math.sin(0.0999), math.cos(0.0999)]))
    assert (emb[1] != emb[2]).any()


def test_timestep_embedding_rejects_a_column_of_timesteps():
    with pytest.raises(AssertionError, match=r"\(B,\)"):
        timestep_embedding(torch.zeros(3, 1, dtype=torch.long), 32)


def test_model_runs_on_the_device(device):
    model = randomize_zero_parameters(tiny_unet()).to(device)
    x, t = random_inputs(model, 2)
    out = model(x.to(device), t.to(device))
    assert out.device.type == device.type and out.shape == x.shape


# ---------------------------------------------------------------------------------------- with ddpm's functions

def test_loss_with_the_unet_is_bitwise_reproducible_for_a_generator_seed(device):
    model = randomize_zero_parameters(tiny_unet()).to(device)  # dropout = 0: no global-RNG draws in train mode
    schedule = ddpm.make_schedule(100).to(device)
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1

    def run(seed):
        return ddpm.loss(schedule, model, x0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    run(1).backward()  # the loss is differentiable through the network
    assert model.conv_out.weight.grad.any()


def test_samples_with_the_unet_are_in_range_on_the_device_and_bitwise_reproducible(device):
    model = randomize_zero_parameters(tiny_unet(dropout=0.1)).to(device).eval()
    schedule = ddpm.make_schedule(20)

    def run(seed):
        return ddpm.sample(schedule, model, (2, 3, 8, 8), steps=5, device=device,
                           generator=torch.Generator().manual_seed(seed))

    first = run(3)
    assert first.shape == (2, 3, 8, 8) and first.device.type == device.type
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, run(3))
    assert not torch.equal(first, run(4))
