"""The bridge to diffusers, both ways. Export a run as a DDPMPipeline folder (EMA weights; --raw for the raw ones):

    python export.py --checkpoint runs/default/checkpoint.pt --out my-ddpm/
    python -c 'from diffusers import DDPMPipeline; DDPMPipeline.from_pretrained("my-ddpm")(batch_size=16)'

and load a diffusers UNet2DModel or DDPMPipeline (a folder, or a hub id where the network allows) as our UNet and
schedule: `load_diffusers`, behind `sample.py --diffusers` and `evaluate.py --diffusers`. The weights are mapped by
`from_diffusers` / `to_diffusers` below. diffusers is optional (requirements-bench.txt) and imported only here.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

import ddpm
from checkpoint import CheckpointError, load_checkpoint, model_args
from unet import UNet

_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # ours -> DDPMScheduler's (same betas)
_VARIANCES = {"beta": "fixed_large", "posterior": "fixed_small"}      # σ² = β_t or β̃_t

# The UNet2DModel settings that have one value here, and the ones this network can take.
_FIXED = {"center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 1, "flip_sin_to_cos": False,
          "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
          "upsample_type": "conv", "act_fn": "silu", "resnet_time_scale_shift": "default",
          "add_attention": True, "class_embed_type": None, "num_class_embeds": None}
_FREE = {"sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
         "up_block_types", "downsample_padding", "norm_eps", "dropout", "attention_head_dim", "time_embedding_dim",
         "norm_num_groups", "attn_norm_num_groups",
         "num_train_timesteps"}  # the last: only for a learned time embedding
_DIFFUSERS_PADDING = {"tf_same": 0, "symmetric": 1}  # diffusers' 0 pads (0, 1, 0, 1) as TF's "SAME" does


def diffusers_config(model_args: Mapping[str, Any]) -> dict:
    """The UNet2DModel config (google/ddpm-cifar10-32's layout) of a network that computes what
    `UNet(**model_args)` computes; model_args missing from `model_args` take UNet's defaults."""
    a = {**{k: p.default for k, p in inspect.signature(UNet).parameters.items()}, **model_args}
    mult, size = list(a["channel_mult"]), a["image_size"]
    if mult[0] != 1:  # diffusers' conv_in and time embedding have block_out_channels[0] channels, ours `channels`
        raise ValueError(f"channel_mult {tuple(mult)}: diffusers' UNet2DModel needs channel_mult[0] = 1")
    attn = [size // 2 ** i in a["attn_resolutions"] for i in range(len(mult))]
    return dict(
        sample_size=size, in_channels=a["in_channels"], out_channels=a["out_channels"] or a["in_channels"],
        block_out_channels=[a["channels"] * m for m in mult], layers_per_block=a["num_res_blocks"],
        down_block_types=["AttnDownBlock2D" if x else "DownBlock2D" for x in attn],
        up_block_types=["AttnUpBlock2D" if x else "UpBlock2D" for x in reversed(attn)],
        attention_head_dim=None,  # one head of all the channels, as here (and in google/ddpm-cifar10-32)
        downsample_padding=_DIFFUSERS_PADDING[a["downsample_padding"]], norm_eps=a["norm_eps"],
        norm_num_groups=a["norm_groups"], freq_shift=1, flip_sin_to_cos=False, time_embedding_type="positional",
        act_fn="silu", dropout=a["dropout"], mid_block_scale_factor=1, center_input_sample=False)


def model_args_from_diffusers(config: Mapping[str, Any]) -> dict:
    """Our constructor arguments for a UNet2DModel's `.config` (every setting present, as diffusers fills them
    in); ValueError naming the first setting this network cannot compute (multi-head attention, another time
    embedding, ...). Inverse of `diffusers_config`."""
    c = {k: v for k, v in config.items() if not k.startswith("_")}
    need = _FREE | _FIXED.keys()
    odd = sorted(need - c.keys()) + sorted(c.keys() - need)
    if odd:
        raise ValueError(f"UNet2DModel config: {odd[0]!r} is {'missing' if odd[0] in need else 'unknown'}")
    for key, value in _FIXED.items():
        if c[key] != value:
            raise ValueError(f"UNet2DModel config: {key}={c[key]!r}, the DDPM UNet has {value!r}")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        raise ValueError(f"UNet2DModel config: attn_norm_num_groups={c['attn_norm_num_groups']!r}, the DDPM UNet "
                         f"has norm_num_groups={c['norm_num_groups']!r} (or None)")
    size, chans, down = c["sample_size"], list(c["block_out_channels"]), list(c["down_block_types"])
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    if not isinstance(size, int):
        raise ValueError(f"UNet2DModel config: sample_size={c['sample_size']!r}, this UNet needs square images")
    if any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down) or \
            list(c["up_block_types"]) != [t.replace("Down", "Up") for t in reversed(down)]:
        raise ValueError(f"UNet2DModel config: down_block_types={down}, up_block_types={list(c['up_block_types'])}"
                         f" are not the DDPM UNet's (DownBlock2D or AttnDownBlock2D, mirrored by the up blocks)")
    if any(ch % chans[0] for ch in chans):
        raise ValueError(f"UNet2DModel config: block_out_channels={chans} are not multiples of the first")
    attn_chans = [ch for ch, t in zip(chans, down) if t.startswith("Attn")] + [chans[-1]]  # and the middle's
    if c["attention_head_dim"] is not None and any(ch != c["attention_head_dim"] for ch in attn_chans):
        raise ValueError(f"UNet2DModel config: attention_head_dim={c['attention_head_dim']} makes several heads; "
                         f"this UNet's attention has one head of all {attn_chans} channels")
    if c["time_embedding_dim"] not in (None, 4 * chans[0]):
        raise ValueError(f"UNet2DModel config: time_embedding_dim={c['time_embedding_dim']}, this UNet's is "
                         f"4 * block_out_channels[0] = {4 * chans[0]}")
    padding = {v: k for k, v in _DIFFUSERS_PADDING.items()}.get(c["downsample_padding"])
    if padding is None:
        raise ValueError(f"UNet2DModel config: downsample_padding={c['downsample_padding']}, this UNet has 0 or 1")
    return dict(in_channels=c["in_channels"], out_channels=c["out_channels"], channels=chans[0],
                channel_mult=[ch // chans[0] for ch in chans], num_res_blocks=c["layers_per_block"],
                attn_resolutions=[size // 2 ** i for i, t in enumerate(down) if t.startswith("Attn")],
                dropout=c["dropout"], image_size=size, norm_eps=c["norm_eps"],
                downsample_padding=padding, norm_groups=c["norm_num_groups"])


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


@contextmanager
def _diffusers() -> Iterator[Any]:
    """The diffusers module, with its (and huggingface_hub's) warnings and retry messages kept off stderr, so that
    a failure stays one line; ValueError if it is not installed."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "huggingface_hub")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import diffusers
        except ImportError:
            raise ValueError("diffusers is not installed: pip install -r requirements-bench.txt") from None
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield diffusers
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def scheduler_config(cfg: Mapping[str, Any]) -> dict:
    """The DDPMScheduler settings of a run's config: T, the β range and schedule, its sampler's σ² and clipping.
    σ² "auto" is what it is at all T steps, the pipeline's default (β: fixed_large)."""
    d, s = cfg["diffusion"], cfg["sample"]
    variance = ddpm.resolve_variance(s["variance"], None, d["num_timesteps"])
    return dict(num_train_timesteps=d["num_timesteps"], beta_start=d["beta_start"], beta_end=d["beta_end"],
                beta_schedule=_BETA_SCHEDULES[d["schedule"]], variance_type=_VARIANCES[variance],
                clip_sample=s["clip"], prediction_type="epsilon")


def schedule_from_scheduler(config: Mapping[str, Any]) -> ddpm.Schedule:
    """Our schedule for a DDPMScheduler config: its T and β range, computed as make_schedule does (float64)."""
    kind = {v: k for k, v in _BETA_SCHEDULES.items()}.get(config.get("beta_schedule", "linear"))
    if kind is None or config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
        raise ValueError(f"scheduler: beta_schedule={config.get('beta_schedule')!r} (trained_betas "
                         f"{'set' if config.get('trained_betas') is not None else 'unset'}): only "
                         f"{' and '.join(_BETA_SCHEDULES.values())} schedules are supported")
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"scheduler: prediction_type={config['prediction_type']!r}; our sampler needs 'epsilon'")
    return ddpm.make_schedule(int(config.get("num_train_timesteps", 1000)), config.get("beta_start", 1e-4),
                              config.get("beta_end", 0.02), kind)


def _hub_says(e: BaseException) -> str | None:
    """"missing" if the hub answered that a file is not there, "unreachable" if it could not be asked (and the
    file is not in its cache), else None: from the exception's chain."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    while e is not None:
        if isinstance(e, LocalEntryNotFoundError):
            return "unreachable"
        if isinstance(e, EntryNotFoundError):
            return "missing"
        e = e.__cause__ or e.__context__
    return None


def load_diffusers(source: str) -> tuple[UNet, ddpm.Schedule]:
    """Our UNet (CPU, eval mode) with the weights of a diffusers UNet2DModel, and the schedule of its DDPMScheduler
    (the paper's if there is none). `source`: a UNet2DModel folder, a DDPMPipeline folder (unet/, scheduler/), or
    a hub id, all through diffusers' own from_pretrained. ValueError (one line) for what cannot be loaded."""
    local = Path(source)
    if not local.is_dir() and (local.exists() or source.startswith((".", "/", "~")) or source.endswith("/")
                               or source.count("/") > 1):  # a path, not a hub id (owner/name)
        raise ValueError(f"{source}: no such folder")
    with _diffusers() as diffusers:
        layouts = ["unet" if (local / "unet").is_dir() else None] if local.is_dir() else [None, "unet"]
        for i, sub in enumerate(layouts):  # a hub id: the flat layout (google/ddpm-*), then a pipeline's
            try:
                theirs = diffusers.UNet2DModel.from_pretrained(source, subfolder=sub, low_cpu_mem_usage=False)
                break
            except (OSError, ValueError, RuntimeError) as e:
                says = None if local.is_dir() else _hub_says(e)
                if i + 1 < len(layouts) and says == "missing":
                    continue
                why = "not a local folder, and the hub cannot be reached (a hub id needs the network)" \
                    if says == "unreachable" else " ".join(str(e).split())[:200]
                raise ValueError(f"{source}: cannot load a diffusers UNet2DModel: {why}") from None
        try:
            sched = diffusers.DDPMScheduler.load_config(source, subfolder="scheduler" if sub else None)
        except (OSError, ValueError):
            sched = None  # no scheduler config: the paper's schedule
    try:
        model = UNet(**model_args_from_diffusers(theirs.config))
        model.load_state_dict(from_diffusers(theirs.state_dict()))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    schedule = schedule_from_scheduler(sched) if sched is not None else ddpm.make_schedule()
    return model.eval().requires_grad_(False), schedule


def export(state: dict, out: str | Path, *, ema: bool = True) -> Path:
    """Write checkpoint `state` as a DDPMPipeline folder `out` (UNet2DModel, EMA weights by default, and the run's
    DDPMScheduler), atomically: a folder that is complete or not there. `out` must not exist or be empty."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; choose another --out or remove it")
    args = model_args(state)
    with _diffusers() as diffusers:
        unet = diffusers.UNet2DModel(**diffusers_config(args))
        try:
            unet.load_state_dict(to_diffusers(state["ema" if ema else "model"]), strict=True)
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint weights do not fit its model_args: {str(e).splitlines()[0]}") from None
        scheduler = diffusers.DDPMScheduler(**scheduler_config(state["config"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # a folder to share, not mkdtemp's private 0700
            diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
            os.replace(tmp, out)  # rename(2) replaces an empty folder
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def main(argv: list[str] | None = None) -> None:
    from config import fail
    p = argparse.ArgumentParser(description="Export a checkpoint as a diffusers DDPMPipeline folder")
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by train.py")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    args = p.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint, advice="(is it a checkpoint.pt written by train.py?)")
        out = export(state, args.out, ema=not args.raw)
    except (CheckpointError, ValueError, OSError) as e:
        fail(str(e))
    print(f"wrote {out} (step {state['step']}, {'raw' if args.raw else 'EMA'} weights): "
          f"DDPMPipeline.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
