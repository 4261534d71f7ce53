"""Sample images from a checkpoint, with no config file needed:

    python sample.py --checkpoint runs/default/checkpoint.pt --num-images 64 --steps 1000 --out samples.png
    python sample.py --diffusers google/ddpm-cifar10-32 --num-images 64    # a diffusers model (export.py)
"""
from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

import ddpm
from checkpoint import CheckpointError, atomic_save, atomic_write, load_checkpoint, model_from_checkpoint
from config import sampling_from_flags
from runtime import SAMPLING_PRECISIONS, amp_dtype, resolve_device, resolve_precision, use_channels_last


def schedule_from_config(cfg: dict) -> ddpm.Schedule:
    d = cfg["diffusion"]
    return ddpm.make_schedule(d["num_timesteps"], d["beta_start"], d["beta_end"], d["schedule"])


def fast_eps(model: torch.nn.Module, device: torch.device, *, amp_dtype: torch.dtype | None, channels_last: bool,
             compile: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`model` (moved to `device`, eval mode) as the sampler's ε(x_t, t), with the fast inference settings."""
    model = model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(x.contiguous(memory_format=torch.channels_last) if channels_last else x, t)
    if not compile:
        return eps
    # The batch size is fixed, so on CUDA "reduce-overhead" replays each step as one CUDA graph; on CPU,
    # freezing folds the (fixed) weights into the graph as constants, prepacked for oneDNN once.
    return torch.compile(eps, mode="reduce-overhead") if device.type == "cuda" else \
        torch.compile(eps, options={"freezing": True})


@dataclass(frozen=True)
class Inference:
    """How `generate` runs the network: on `device`, in `precision` ("fp32" eager is exact; "bf16" and `compile` are
    the fast path, docs/benchmarks.md), with a progress bar over each batch's steps or not."""
    device: torch.device | str = "cpu"
    precision: str = "fp32"
    compile: bool = False
    progress: bool = False


def generate(model: torch.nn.Module, schedule: ddpm.Schedule, num_images: int,
             settings: ddpm.Sampling = ddpm.Sampling(), *, batch_size: int = 256, seed: int = 0,
             inference: Inference = Inference(), **overrides) -> Tensor:
    """`num_images` samples as uint8 (N, C, H, W) on the CPU, drawn by ddpm.sample with `settings` (its fields
    replaced by `overrides`: `generate(..., steps=50, sampler="ddim")`). Batch k uses the generator seeded with
    `seed + k`, so the images do not depend on what else was sampled before them."""
    device = torch.device(inference.device)
    schedule = schedule.to(device)
    dtype, eps = amp_dtype(inference.precision), model
    if dtype is not None or inference.compile:  # the fast path
        eps = fast_eps(model, device, amp_dtype=dtype, compile=inference.compile,
                       channels_last=use_channels_last("auto", device, inference.precision))
    shape = (model.in_channels, model.image_size, model.image_size)
    out = []
    for k, start in enumerate(range(0, num_images, batch_size)):
        n = min(batch_size, num_images - start)
        gen = torch.Generator(device).manual_seed(seed + k)
        x = ddpm.sample(schedule, eps, (n, *shape), settings, generator=gen, device=device,
                        progress=inference.progress, **overrides)
        out.append(ddpm.to_uint8(x).cpu())
    return torch.cat(out)


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """--steps, --sampler, --eta, --spacing, --variance, --clip: ddpm.Sampling's fields, defaulting to config.yaml's
    sample.* defaults (shared with evaluate.py; `sampler_settings` checks them)."""
    d = ddpm.Sampling()
    p.add_argument("--steps", type=int, default=d.steps, help="sampling steps (default: all; fewer = respaced)")
    p.add_argument("--sampler", choices=ddpm.SAMPLERS, default=d.sampler,
                   help=f"ddpm: ancestral (Algorithm 2); ddim: Song et al. 2021; dpm++2m: DPM-Solver++(2M), Lu et al. "
                        f"2022, deterministic; dpm++2m-sde: its stochastic variant (default: {d.sampler})")
    p.add_argument("--eta", type=float, default=d.eta,
                   help=f"DDIM's η in [0, 1] (ddim only); 0 is deterministic (default: {d.eta})")
    p.add_argument("--spacing", choices=ddpm.SPACINGS, default=d.spacing,
                   help=f"which timesteps a respaced sampler visits (default: {d.spacing})")
    p.add_argument("--variance", choices=ddpm.VARIANCES, default=d.variance,
                   help=f"ddpm's σ² (ddpm only); auto: beta at all steps, posterior when respaced "
                        f"(default: {d.variance})")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None, help="clip the predicted x0 to "
                   "[-1, 1] (default: the checkpoint's sample.clip, as during training; a diffusers model clips)")


def resolve_clip(flag: bool | None, state: dict | None) -> bool:
    """--clip / --no-clip, else the checkpoint's sample.clip (one rule for sample.py, evaluate.py and the training
    grids and FID); a diffusers model (`state` None) clips, as its DDPMScheduler does by default."""
    if flag is not None:
        return flag
    return True if state is None else state["config"]["sample"]["clip"]


def sampler_settings(flags: Mapping[str, Any], state: dict | None, num_timesteps: int) -> ddpm.Sampling:
    """ddpm.sample's settings from the flags of `add_sampler_arguments` (`flags` maps their names to values, e.g.
    vars(args); --clip unset follows `resolve_clip`), checked as config.yaml's sample.* are
    (config.sampling_from_flags): a bad one is a ConfigError, a ValueError that names the flag."""
    values = {f.name: flags[f.name] for f in fields(ddpm.Sampling) if f.name in flags}
    return sampling_from_flags({**values, "clip": resolve_clip(values.get("clip"), state)}, num_timesteps)


# ---------------------------------------------------------------- pictures: grids and PNG files

def image_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """uint8 (N, C, H, W) -> one uint8 (H', W', 3) grid with a 2-pixel border, for PNG files and wandb."""
    assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
    from torchvision.utils import make_grid
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(images.cpu(), nrow=nrow, padding=2)  # grayscale becomes 3 channels here
    return grid.permute(1, 2, 0).contiguous()


def save_png(image: Any, path: str | Path) -> None:
    """Write a PIL image as a PNG file, atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    atomic_write(path, buf.getvalue())


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Write uint8 images (N, C, H, W) as a PNG grid, atomically."""
    from PIL import Image
    save_png(Image.fromarray(image_grid(images, nrow).numpy()), path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint.pt written by train.py")
    source.add_argument("--diffusers", metavar="PATH_OR_ID", help="a diffusers UNet2DModel or DDPMPipeline: a folder, "
                        "or a hub id such as google/ddpm-cifar10-32 (needs the network; pip install -r "
                        "requirements-bench.txt)")
    p.add_argument("--num-images", type=int, default=64)
    add_sampler_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--precision", choices=SAMPLING_PRECISIONS, default="auto",
                   help="auto: bf16 where it is native (CUDA GPUs with bf16, CPUs with AMX-BF16), else fp32 (exact)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (pays for long runs)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    p.add_argument("--npz", default=None, help="also write the uint8 images (N, H, W, C) to this .npz (key arr_0)")
    args = p.parse_args(argv)
    try:
        if args.num_images < 1 or args.batch_size < 1:
            raise ValueError("--num-images and --batch-size must be >= 1")
        try:
            device = resolve_device(args.device)
        except ValueError as e:
            raise ValueError(f"--device {e}") from None
        state = None
        if args.diffusers:
            if args.raw:
                raise ValueError("--raw chooses a checkpoint's weights; a diffusers model has one set")
            from export import load_diffusers
            model, schedule = load_diffusers(args.diffusers)
            model, what = model.to(device), f"diffusers {args.diffusers}"
        else:
            state = load_checkpoint(args.checkpoint, advice="(is it a checkpoint.pt written by train.py?)")
            schedule = schedule_from_config(state["config"])
            model = model_from_checkpoint(state, ema=not args.raw, device=device)
            what = f"step {state['step']}, {'raw' if args.raw else 'EMA'} weights"
        settings = sampler_settings(vars(args), state, schedule.num_timesteps)
        try:
            precision = resolve_precision(args.precision, device)
        except ValueError as e:
            raise ValueError(f"--precision {e}") from None
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    images = generate(model, schedule, args.num_images, settings, batch_size=args.batch_size, seed=args.seed,
                      inference=Inference(device, precision, args.compile, progress=True))
    save_grid(images, args.out)
    if args.npz:
        atomic_save(args.npz, np.savez, images.permute(0, 2, 3, 1).numpy())
    print(f"wrote {len(images)} images ({what}) to {args.out}"
          + (f" and {args.npz}" if args.npz else ""))


if __name__ == "__main__":
    main()
