"""The DDPM paper's CIFAR-10 network (Ho et al. 2020, Appendix B; hojonathanho/diffusion's unet.py).

A PixelCNN++-style U-Net of Wide-ResNet blocks with GroupNorm (32 groups; `norm_groups`), a sinusoidal time
embedding fed through an MLP into every residual block, and self-attention at 16x16. 35.7M parameters at the defaults.
Output layers are zero-initialised as in the original code, so the untrained model predicts ε = 0.

The defaults compute the official network's function, as diffusers' conversion of it (google/ddpm-cifar10-32)
does: GroupNorm eps 1e-6 (tf.contrib's group_norm) and TF "SAME" padding for the stride-2 downsampling conv
(one zero row and column at the bottom and right). Checkpoints written before these two were arguments used
PyTorch's eps 1e-5 and one zero row/column on every side: `LEGACY_ARGS`, which `checkpoint.model_args` fills in
for them. The mapping of the weights to and from diffusers' UNet2DModel is in export.py.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from config import GROUPS, check_unet_args as check_args  # the settings rules live with the config

PADDINGS = ("tf_same", "symmetric")
# What a checkpoint whose model_args lack these keys was built with (before they were arguments).
LEGACY_ARGS = {"norm_eps": 1e-5, "downsample_padding": "symmetric"}


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding (Transformer positional encoding) of integer timesteps: (B,) -> (B, dim)."""
    assert t.ndim == 1, f"t must have shape (B,), got {tuple(t.shape)}"
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Dropout(nn.Dropout):
    """nn.Dropout's function (zero an element with probability p, scale the rest by 1 / (1 - p)) with a cheaper mask
    on the CPU: one 32-bit random integer per element, drawn 64 bits at a time from the global generator, is compared
    with p 2^32 (so p is kept to within 2^-33). torch's CPU dropout draws a float per element through bernoulli_ and
    then divides and multiplies in separate passes: fwd+bwd at (16, 256, 16, 16) took 9.3 ms against 5.6 ms on one
    core of the Xeon of docs/benchmarks.md. Elsewhere (CUDA: a fused kernel) it is nn.Dropout."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        threshold = round(self.p * 2**32)  # drop where the integer, read as unsigned, is below it
        bits = torch.empty((x.numel() + 1) // 2, dtype=torch.int64, device=x.device).random_(-2**63, None)
        keep = bits.view(torch.int32)[:x.numel()].view(x.shape) >= threshold - 2**31
        scale = 2**32 / (2**32 - threshold)  # 1 / (1 - p) for the p that the threshold keeps
        return x * keep.to(x.dtype).mul_(scale)  # the mask is saved for backward, as nn.Dropout's is


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, eps: float, groups: int = GROUPS):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps)
        self.dropout = Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb)[:, :, None, None]  # temb is already passed through SiLU
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions."""

    def __init__(self, c: int, eps: float, groups: int = GROUPS):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = _zero(nn.Conv2d(c, c, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3 * C, H * W).chunk(3, dim=1)  # (B, C, HW) each, views
        # Channel-major, as x is: the transposes are BLAS flags, not copies (SDPA wants (B, HW, C) and copies twice).
        weights = torch.bmm(q.transpose(1, 2), k).mul_(C ** -0.5).softmax(dim=-1)  # (B, HW, HW): softmax(qk^T/√C)
        h = torch.bmm(v, weights.transpose(1, 2))  # (B, C, HW): every position's weighted sum of v
        return x + self.proj(h.view(B, C, H, W))


class Downsample(nn.Conv2d):
    """The 3x3 stride-2 convolution between levels. "tf_same": TF's "SAME" padding of the official code, which for
    an even size is one zero row and column at the bottom and right only; "symmetric": one on every side."""

    def __init__(self, c: int, padding: str):
        super().__init__(c, c, 3, stride=2, padding=1 if padding == "symmetric" else 0)
        self.pad_after = padding == "tf_same"

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)) if self.pad_after else x)


def _upsample_kernel(w: Tensor) -> Tensor:
    """The (C, O, 4, 4) kernel of the stride-2 transposed convolution that equals nearest 2x upsampling followed by
    the 3x3 convolution `w` (O, C, 3, 3) with padding 1. After the upsampling, an even output row 2i sees input rows
    i - 1, i, i through kernel rows 0, 1, 2, an odd one 2i + 1 sees rows i, i, i + 1: so input row i reaches output
    rows 2i - 1 .. 2i + 2 through w2, w1 + w2, w0 + w1, w0 (and the same along columns)."""
    def taps(w: Tensor, dim: int) -> Tensor:
        w0, w1, w2 = w.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)
    return taps(taps(w, 2), 3).transpose(0, 1)


def upsample_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """conv3x3(nearest_upsample_2x(x), padding 1) as one transposed convolution of x (stride 2, padding 1): every
    output pixel depends on a 2x2 window of x, so it does 16 multiply-adds per output pixel and channel pair instead
    of 36, and the upsampled image is never built. (B, C, H, W) -> (B, O, 2H, 2W); equal to the two steps up to float
    rounding (the folded weights are sums)."""
    return F.conv_transpose2d(x, _upsample_kernel(weight), bias, stride=2, padding=1)


class Upsample(nn.Sequential):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution (state-dict keys `.1.weight`, `.1.bias`, as before).
    From 8x8 inputs up it runs as `upsample_conv`: fwd+bwd at batch 16 and 256 channels took 196 ms instead of 428 at
    16x16 and 61 instead of 94 at 8x8 on one core of the Xeon of docs/benchmarks.md; at 4x4 the two steps were
    faster, so small inputs take them."""
    MIN_PIXELS = 64

    def __init__(self, c: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] * x.shape[-1] < self.MIN_PIXELS:
            return super().forward(x)
        return upsample_conv(x, self[1].weight, self[1].bias)


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int | None = None, channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, image_size: int = 32,
                 norm_eps: float = 1e-6, downsample_padding: str = "tf_same", norm_groups: int = GROUPS):
        super().__init__()
        check_args(channels, channel_mult, attn_resolutions, image_size, in_channels, norm_groups)
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {norm_eps}")
        if downsample_padding not in PADDINGS:
            raise ValueError(f"downsample_padding must be one of {', '.join(PADDINGS)}, got {downsample_padding!r}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels, self.image_size = in_channels, image_size
        out_channels = in_channels if out_channels is None else out_channels
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        temb_dim, norm = 4 * channels, (norm_eps, norm_groups)  # every GroupNorm's eps and groups
        self.channels = channels
        self.temb = nn.Sequential(nn.Linear(channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        # Encoder: record the channel count of every activation kept for a skip connection.
        self.down = nn.ModuleList()
        skips, c, res = [channels], channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(self._block(c, channels * mult, temb_dim, dropout, res in attn_resolutions, norm))
                c = channels * mult
                skips.append(c)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(c, downsample_padding))
                res //= 2
                skips.append(c)

        self.mid = nn.ModuleList([ResBlock(c, c, temb_dim, dropout, *norm), AttnBlock(c, *norm),
                                  ResBlock(c, c, temb_dim, dropout, *norm)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(self._block(c + skips.pop(), channels * mult, temb_dim, dropout, res in attn_resolutions,
                                           norm))
                c = channels * mult
            if level != 0:
                self.up.append(Upsample(c))
                res *= 2
        assert not skips
        self.norm_out = nn.GroupNorm(norm_groups, c, norm_eps)
        self.conv_out = _zero(nn.Conv2d(c, out_channels, 3, padding=1))

    @staticmethod
    def _block(c_in: int, c_out: int, temb_dim: int, dropout: float, attn: bool, norm: tuple[float, int]
               ) -> nn.ModuleList:
        return nn.ModuleList([ResBlock(c_in, c_out, temb_dim, dropout, *norm)]
                             + ([AttnBlock(c_out, *norm)] if attn else []))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        B, C, H, W = x.shape
        assert C == self.in_channels and H == W == self.image_size, f"expected (B, {self.in_channels}, " \
            f"{self.image_size}, {self.image_size}), got {tuple(x.shape)}"
        assert t.shape == (B,), f"t must have shape ({B},), got {tuple(t.shape)}"
        temb = F.silu(self.temb(timestep_embedding(t, self.channels).to(x.dtype)))  # (B, 4 * channels)

        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = self._run_layer(layer, h, temb)
            hs.append(h)
        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run_layer(layer, h, temb)
        assert not hs
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _run_layer(layer: nn.Module, h: Tensor, temb: Tensor) -> Tensor:
        if not isinstance(layer, nn.ModuleList):  # down- or upsampling
            return layer(h)
        h = layer[0](h, temb)
        return layer[1](h) if len(layer) > 1 else h


def __getattr__(name: str) -> Any:
    """`unet.from_diffusers` / `unet.to_diffusers`, public names from before the weight mapping moved to export.py
    (the diffusers bridge's one home): looked up there on first use."""
    if name in ("from_diffusers", "to_diffusers"):
        import export
        return getattr(export, name)
    raise AttributeError(f"module 'unet' has no attribute {name!r}")
