"""The DDPM paper's CIFAR-10 network (Ho et al. 2020, Appendix B; hojonathanho/diffusion's unet.py).

A PixelCNN++-style U-Net of Wide-ResNet blocks with GroupNorm(32), a sinusoidal time embedding fed through
an MLP into every residual block, and self-attention at 16x16. 35.7M parameters at the defaults.
Output layers are zero-initialised as in the original code, so the untrained model predicts ε = 0.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from config import GROUPS, check_unet_args as check_args  # the settings rules live with the config


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


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(GROUPS, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb)[:, :, None, None]  # temb is already passed through SiLU
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = _zero(nn.Conv2d(c, c, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)  # (B, 1, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int | None = None, channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, image_size: int = 32):
        super().__init__()
        check_args(channels, channel_mult, attn_resolutions, image_size, in_channels)
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels, self.image_size = in_channels, image_size
        out_channels = in_channels if out_channels is None else out_channels
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        temb_dim = 4 * channels
        self.channels = channels
        self.temb = nn.Sequential(nn.Linear(channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        # Encoder: record the channel count of every activation kept for a skip connection.
        self.down = nn.ModuleList()
        skips, c, res = [channels], channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(self._block(c, channels * mult, temb_dim, dropout, res in attn_resolutions))
                c = channels * mult
                skips.append(c)
            if level != len(channel_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                res //= 2
                skips.append(c)

        self.mid = nn.ModuleList([ResBlock(c, c, temb_dim, dropout), AttnBlock(c), ResBlock(c, c, temb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(self._block(c + skips.pop(), channels * mult, temb_dim, dropout, res in attn_resolutions))
                c = channels * mult
            if level != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        assert not skips
        self.norm_out = nn.GroupNorm(GROUPS, c)
        self.conv_out = _zero(nn.Conv2d(c, out_channels, 3, padding=1))

    @staticmethod
    def _block(c_in: int, c_out: int, temb_dim: int, dropout: float, attn: bool) -> nn.ModuleList:
        return nn.ModuleList([ResBlock(c_in, c_out, temb_dim, dropout)] + ([AttnBlock(c_out)] if attn else []))

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
