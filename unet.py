"""The DDPM paper's CIFAR-10 network (Ho et al. 2020, Appendix B; hojonathanho/diffusion's unet.py).

A PixelCNN++-style U-Net of Wide-ResNet blocks with GroupNorm(32), a sinusoidal time embedding fed through
an MLP into every residual block, and self-attention at 16x16. 35.7M parameters at the defaults.
Output layers are zero-initialised as in the original code, so the untrained model predicts ε = 0.

The defaults compute the official network's function, as diffusers' conversion of it (google/ddpm-cifar10-32)
does: GroupNorm eps 1e-6 (tf.contrib's group_norm) and TF "SAME" padding for the stride-2 downsampling conv
(one zero row and column at the bottom and right). Checkpoints written before these two were arguments used
PyTorch's eps 1e-5 and one zero row/column on every side: `LEGACY_ARGS`, which `checkpoint.model_args` fills in
for them. `from_diffusers` / `to_diffusers` map the weights to and from diffusers' UNet2DModel.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

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
    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, c_in, eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(GROUPS, c_out, eps)
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

    def __init__(self, c: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, c, eps)
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
                 norm_eps: float = 1e-6, downsample_padding: str = "tf_same"):
        super().__init__()
        check_args(channels, channel_mult, attn_resolutions, image_size, in_channels)
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
        temb_dim = 4 * channels
        self.channels = channels
        self.temb = nn.Sequential(nn.Linear(channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        # Encoder: record the channel count of every activation kept for a skip connection.
        self.down = nn.ModuleList()
        skips, c, res = [channels], channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(self._block(c, channels * mult, temb_dim, dropout, res in attn_resolutions, norm_eps))
                c = channels * mult
                skips.append(c)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(c, downsample_padding))
                res //= 2
                skips.append(c)

        self.mid = nn.ModuleList([ResBlock(c, c, temb_dim, dropout, norm_eps), AttnBlock(c, norm_eps),
                                  ResBlock(c, c, temb_dim, dropout, norm_eps)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(self._block(c + skips.pop(), channels * mult, temb_dim, dropout, res in attn_resolutions,
                                           norm_eps))
                c = channels * mult
            if level != 0:
                self.up.append(Upsample(c))
                res *= 2
        assert not skips
        self.norm_out = nn.GroupNorm(GROUPS, c, norm_eps)
        self.conv_out = _zero(nn.Conv2d(c, out_channels, 3, padding=1))

    @staticmethod
    def _block(c_in: int, c_out: int, temb_dim: int, dropout: float, attn: bool, eps: float) -> nn.ModuleList:
        return nn.ModuleList([ResBlock(c_in, c_out, temb_dim, dropout, eps)]
                             + ([AttnBlock(c_out, eps)] if attn else []))

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


# ---------------------------------------------------------------------------------------- the diffusers bridge
# diffusers' UNet2DModel in the layout of google/ddpm-cifar10-32 is this network layer for layer: names differ,
# and attention's q, k, v and output projections are Linear layers there, 1x1 convolutions (q, k, v fused) here.

_RES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
        "skip": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "qkv": "to_qkv", "proj": "to_out.0"}  # to_qkv: to_q, to_k, to_v concatenated
_LINEAR = re.compile(r".*\.(qkv|proj)\.weight")  # ours (O, I, 1, 1) <-> theirs (O, I)


def _names(levels: int, num_res_blocks: int) -> dict[str, str]:
    """Our parameter name -> diffusers' for every parameter that a UNet with `levels` resolutions of
    `num_res_blocks` blocks can have (attention and skip convs included; a given model has a subset)."""
    layers = {"temb.0": "time_embedding.linear_1", "temb.2": "time_embedding.linear_2", "conv_in": "conv_in",
              "norm_out": "conv_norm_out", "conv_out": "conv_out"}

    def block(ours: str, res: str, attn: str) -> None:
        layers.update({f"{ours}.0.{a}": f"{res}.{b}" for a, b in _RES.items()})
        layers.update({f"{ours}.1.{a}": f"{attn}.{b}" for a, b in _ATTN.items()})
    k = 0
    for i in range(levels):
        for j in range(num_res_blocks):
            block(f"down.{k}", f"down_blocks.{i}.resnets.{j}", f"down_blocks.{i}.attentions.{j}")
            k += 1
        if i < levels - 1:
            layers[f"down.{k}"] = f"down_blocks.{i}.downsamplers.0.conv"
            k += 1
    block("mid", "mid_block.resnets.0", "mid_block.attentions.0")  # mid.0: ResBlock, mid.1: AttnBlock
    layers.update({f"mid.2.{a}": f"mid_block.resnets.1.{b}" for a, b in _RES.items()})
    k = 0
    for i in range(levels):  # diffusers' up block i is our level levels - 1 - i: both count from the bottom
        for j in range(num_res_blocks + 1):
            block(f"up.{k}", f"up_blocks.{i}.resnets.{j}", f"up_blocks.{i}.attentions.{j}")
            k += 1
        if i < levels - 1:
            layers[f"up.{k}.1"] = f"up_blocks.{i}.upsamplers.0.conv"  # up.k.0 is the nearest-neighbour Upsample
            k += 1
    return {f"{a}.{p}": f"{b}.{p}" for a, b in layers.items() for p in ("weight", "bias")}


def _count(keys: Sequence[str], pattern: str) -> int:
    """1 + the largest index that `pattern` (one group) captures in `keys`; 0 if it matches none."""
    return 1 + max((int(m.group(1)) for m in map(re.compile(pattern).match, keys) if m), default=-1)


def _levels_and_blocks(keys: Sequence[str]) -> tuple[int, int]:
    """(levels, num_res_blocks) of one of our state dicts, from its names: per level, num_res_blocks blocks and
    then (but for the last level) the downsampling conv, whose weight sits directly at down.k."""
    n = _count(keys, r"down\.(\d+)\.")
    blocks = min((k for k in range(n) if f"down.{k}.weight" in keys), default=n)
    return (n + 1) // (blocks + 1), max(blocks, 1)


def _check_fits(sd: Mapping[str, Tensor], levels: int, num_res_blocks: int, name: Any = str) -> None:
    """ValueError naming (through `name`) the first key of our state dict `sd` that the UNet its shapes imply
    lacks or has in another shape, or else the first key of that UNet that `sd` lacks."""
    def shape(key: str) -> torch.Size:
        if key not in sd:
            raise ValueError(f"{name(key)}: missing (not the DDPM UNet layout)")
        return sd[key].shape
    channels = shape("conv_in.weight")[0]
    mult = [shape(f"down.{i * (num_res_blocks + 1)}.0.conv1.weight")[0] // max(channels, 1) for i in range(levels)]
    attn = [2 ** (levels - 1 - i) for i in range(levels) if f"down.{i * (num_res_blocks + 1)}.1.qkv.weight" in sd]
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            expected = UNet(shape("conv_in.weight")[1], shape("conv_out.weight")[0], channels, mult, num_res_blocks,
                            attn, image_size=2 ** (levels - 1)).state_dict()
    except ValueError as e:
        raise ValueError(f"{name('conv_in.weight')}: {e}") from None
    for key, value in sd.items():
        if key not in expected:
            raise ValueError(f"{name(key)}: not a parameter of the DDPM UNet layout")
        if value.shape != expected[key].shape:
            raise ValueError(f"{name(key)}: shape {tuple(value.shape)} does not fit, expected "
                             f"{tuple(expected[key].shape)}")
    missing = [key for key in expected if key not in sd]
    if missing:
        raise ValueError(f"{name(missing[0])}: missing")


def from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A UNet2DModel state dict of the DDPM layout (google/ddpm-cifar10-32's) -> ours, which `UNet` built with
    `export.model_args_from_diffusers(its config)` loads with strict=True. Exact inverse of `to_diffusers`.
    Raises ValueError naming the first key that does not fit (another layout, another size)."""
    keys = list(state_dict)
    levels = max(_count(keys, r"down_blocks\.(\d+)\."), 1)
    blocks = max(_count(keys, r"down_blocks\.0\.resnets\.(\d+)\."), 1)
    names = _names(levels, blocks)
    theirs = {b: a for a, b in names.items()}
    out = {}
    for key, value in state_dict.items():
        if ".to_k." in key or ".to_v." in key:
            continue  # fused with its to_q
        if ".to_q." in key:
            parts = [state_dict.get(key.replace(".to_q.", f".to_{c}.")) for c in "qkv"]
            for c, p in zip("kv", parts[1:]):
                if p is None or p.shape != value.shape:
                    raise ValueError(f"{key.replace('.to_q.', f'.to_{c}.')}: "
                                     f"{'missing' if p is None else f'shape {tuple(p.shape)}'}, expected "
                                     f"{tuple(value.shape)} as {key}")
            key, value = key.replace(".to_q.", ".to_qkv."), torch.cat(parts)
        if key not in theirs:
            raise ValueError(f"{key.replace('.to_qkv.', '.to_q.')}: not a parameter of the DDPM UNet layout")
        ours = theirs[key]
        if _LINEAR.fullmatch(ours):
            if value.ndim != 2:
                raise ValueError(f"{key.replace('.to_qkv.', '.to_q.')}: shape {tuple(value.shape)}, expected a "
                                 f"Linear layer's (out, in)")
            value = value[:, :, None, None]
        out[ours] = value
    _check_fits(out, levels, blocks, lambda k: names.get(k, k).replace(".to_qkv.", ".to_q."))
    return out


def to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> a UNet2DModel state dict, which UNet2DModel(**export.diffusers_config(model_args)) loads with
    strict=True. Exact inverse of `from_diffusers`; ValueError naming the first key that does not fit."""
    levels, blocks = _levels_and_blocks(list(state_dict))
    _check_fits(state_dict, levels, blocks)
    names = _names(levels, blocks)
    out = {}
    for key, value in state_dict.items():
        if _LINEAR.fullmatch(key):
            value = value.reshape(value.shape[:2])
        if ".qkv." in key:
            for c, part in zip("qkv", value.chunk(3)):
                out[names[key].replace(".to_qkv.", f".to_{c}.")] = part.clone()
        else:
            out[names[key]] = value
    return out
