"""Sample images from a checkpoint, with no config file needed:

    python sample.py --checkpoint runs/default/checkpoint.pt --num-images 64 --steps 1000 --out samples.png
    python sample.py --diffusers google/ddpm-cifar10-32 --num-images 64    # a diffusers model (export.py)
"""
from __future__ import annotations

import argparse
import sys

from typing import Callable

import numpy as np
import torch
from torch import Tensor

import ddpm
from checkpoint import CheckpointError, atomic_save, load_checkpoint, model_from_checkpoint, save_grid
from config import Sample
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


def generate(model: torch.nn.Module, schedule: ddpm.Schedule, num_images: int, *, batch_size: int = 256,
             steps: int | None = None, variance: str = "auto", clip: bool = True, seed: int = 0,
             device: torch.device | str = "cpu", progress: bool = False, precision: str = "fp32",
             compile: bool = False, sampler: str = "ddpm", eta: float = 0.0, spacing: str = "uniform") -> Tensor:
    """`num_images` samples as uint8 (N, C, H, W) on the CPU. Batch k uses the generator seeded with
    `seed + k`, so the images do not depend on what else was sampled before them. `precision="bf16"` and
    `compile` are the fast path (docs/benchmarks.md); fp32 eager is exact. `sampler`, `eta`, `spacing`,
    `steps`, `variance` and `clip` are ddpm.sample's, with its defaults (config.yaml's sample.*, as the CLI's)."""
    device = torch.device(device)
    schedule = schedule.to(device)
    dtype = amp_dtype(precision)
    eps = fast_eps(model, device, amp_dtype=dtype, channels_last=use_channels_last("auto", device, precision),
                   compile=compile) if dtype is not None or compile else model
    shape = (model.in_channels, model.image_size, model.image_size)
    out = []
    for k, start in enumerate(range(0, num_images, batch_size)):
        n = min(batch_size, num_images - start)
        gen = torch.Generator(device).manual_seed(seed + k)
        x = ddpm.sample(schedule, eps, (n, *shape), steps=steps, variance=variance, clip=clip, generator=gen,
                        device=device, progress=progress, sampler=sampler, eta=eta, spacing=spacing)
        out.append(ddpm.to_uint8(x).cpu())
    return torch.cat(out)


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """--sampler, --eta, --spacing, --variance, defaulting to config.yaml's sample.* defaults (shared with
    evaluate.py)."""
    d = Sample()
    p.add_argument("--sampler", choices=ddpm.SAMPLERS, default=d.sampler,
                   help=f"ddpm: ancestral (Algorithm 2); ddim: Song et al. 2021; dpm++2m: DPM-Solver++(2M), Lu et al. "
                        f"2022, deterministic (default: {d.sampler})")
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


def check_sampler_flags(sampler: str, eta: float, spacing: str, variance: str) -> None:
    """The checks config.py makes on sample.*, as a ValueError that names the flag."""
    for flag, value, options in (("--sampler", sampler, ddpm.SAMPLERS), ("--spacing", spacing, ddpm.SPACINGS),
                                 ("--variance", variance, ddpm.VARIANCES)):
        if value not in options:
            raise ValueError(f"{flag} must be one of {', '.join(options)}, got {value!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"--eta must be in [0, 1], got {eta}")
    if sampler != "ddim" and eta != 0:
        raise ValueError(f"--eta {eta} applies to --sampler ddim only ({sampler} has no eta)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint.pt written by train.py")
    source.add_argument("--diffusers", metavar="PATH_OR_ID", help="a diffusers UNet2DModel or DDPMPipeline: a folder, "
                        "or a hub id such as google/ddpm-cifar10-32 (needs the network; pip install -r "
                        "requirements-bench.txt)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: all; fewer = respaced)")
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
        if args.steps is not None and not 1 <= args.steps <= schedule.num_timesteps:
            raise ValueError(f"--steps must be in [1, {schedule.num_timesteps}], got {args.steps}")
        check_sampler_flags(args.sampler, args.eta, args.spacing, args.variance)
        try:
            precision = resolve_precision(args.precision, device)
        except ValueError as e:
            raise ValueError(f"--precision {e}") from None
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    images = generate(model, schedule, args.num_images, batch_size=args.batch_size, steps=args.steps,
                      variance=args.variance, clip=resolve_clip(args.clip, state), seed=args.seed, device=device, progress=True,
                      precision=precision, compile=args.compile, sampler=args.sampler, eta=args.eta,
                      spacing=args.spacing)
    save_grid(images, args.out)
    if args.npz:
        atomic_save(args.npz, np.savez, images.permute(0, 2, 3, 1).numpy())
    print(f"wrote {len(images)} images ({what}) to {args.out}"
          + (f" and {args.npz}" if args.npz else ""))


if __name__ == "__main__":
    main()
