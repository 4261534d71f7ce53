"""The bridge to diffusers, both ways. Export a run as a DDPMPipeline folder (EMA weights; --raw for the raw ones):

    python export.py --checkpoint runs/default/checkpoint.pt --out my-ddpm/
    python -c 'from diffusers import DDPMPipeline; DDPMPipeline.from_pretrained("my-ddpm")(batch_size=16)'

and load a diffusers UNet2DModel or DDPMPipeline (a folder, or a hub id where the network allows) as our UNet and
schedule: `load_diffusers`, behind `sample.py --diffusers` and `evaluate.py --diffusers`. The weights are mapped by
unet.from_diffusers / unet.to_diffusers. diffusers is optional (requirements-bench.txt) and imported only here.
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
from pathlib import Path
from typing import Any, Iterator, Mapping


import ddpm
from checkpoint import CheckpointError, load_checkpoint, model_args
from config import GROUPS
from unet import UNet, from_diffusers, to_diffusers

_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # ours -> DDPMScheduler's (same betas)
_VARIANCES = {"beta": "fixed_large", "posterior": "fixed_small"}      # σ² = β_t or β̃_t

# The UNet2DModel settings that have one value here, and the ones this network can take.
_FIXED = {"center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 1, "flip_sin_to_cos": False,
          "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
          "upsample_type": "conv", "act_fn": "silu", "norm_num_groups": GROUPS, "resnet_time_scale_shift": "default",
          "add_attention": True, "class_embed_type": None, "num_class_embeds": None}
_FREE = {"sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
         "up_block_types", "downsample_padding", "norm_eps", "dropout", "attention_head_dim", "time_embedding_dim",
         "attn_norm_num_groups", "num_train_timesteps"}  # the last: only for a learned time embedding
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
        norm_num_groups=GROUPS, freq_shift=1, flip_sin_to_cos=False, time_embedding_type="positional",
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
    if c["attn_norm_num_groups"] not in (None, GROUPS):
        raise ValueError(f"UNet2DModel config: attn_norm_num_groups={c['attn_norm_num_groups']!r}, the DDPM UNet "
                         f"has {GROUPS} (or None)")
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
                downsample_padding=padding)


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
