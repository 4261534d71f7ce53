"""Where a training step and a sampling step spend their time: torch.profiler's top ops by self time, ours beside
diffusers' UNet2DModel at the same settings (the rows bench.py races), at the paper's architecture.

    python scripts/profile_ops.py --threads 1 --batch 16            # CPU, fp32 (what precision auto picks here)
    python scripts/profile_ops.py --device cuda --precision bf16    # GPU: self CUDA time

Each variant is built as bench.py builds it, run `--warmup` times, then profiled over `--steps` calls. The table
groups ops by name (aten::convolution_backward, aten::native_group_norm, ...) and shows each one's share of the
variant's total self time, so "convolutions" vs "the rest" can be read off directly. No torch.compile here: the
profile is of the eager ops that compilation would have to fuse.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import runtime  # noqa: E402
from unet import UNet  # noqa: E402

CONV = "conv"  # every convolution op and its backward has it in its name (mkldnn_, cudnn_, _slow_conv2d_...)


def profile_fn(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> list[tuple[str, float, int]]:
    """[(op name, self seconds per call of fn, calls per call of fn)] sorted by self time, for `steps` calls."""
    for _ in range(warmup):
        fn()
    bench.sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        bench.sync(device)
    rows = []
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue  # a kernel's own row: its time is already its launching op's self device time
        self_us = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if self_us > 0:
            rows.append((e.key, self_us / 1e6 / steps, e.count // steps))
    return sorted(rows, key=lambda r: -r[1])


def report(name: str, rows: list[tuple[str, float, int]], top: int) -> str:
    total = sum(r[1] for r in rows)
    conv = sum(r[1] for r in rows if CONV in r[0])
    lines = [f"== {name}: {total * 1e3:.1f} ms self time per call; convolutions {100 * conv / total:.1f}%, "
             f"the rest {100 * (1 - conv / total):.1f}% ({(total - conv) * 1e3:.1f} ms)",
             f"{'op':<48} {'ms':>9} {'%':>6} {'calls':>6}"]
    for key, s, n in rows[:top]:
        lines.append(f"{key[:48]:<48} {s * 1e3:9.2f} {100 * s / total:6.1f} {n:6d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=runtime.SAMPLING_PRECISIONS, default="auto")
    p.add_argument("--batch", type=int, default=16, help="training batch")
    p.add_argument("--sample-batch", type=int, default=8, help="images per sampling step")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--out", default=None, help="also write the tables to this file")
    args = p.parse_args(argv)
    device = runtime.resolve_device(args.device)
    torch.set_num_threads(args.threads)
    precision = runtime.resolve_precision(args.precision, device)
    settings = dict(amp_dtype=torch.bfloat16 if precision == "bf16" else None,
                    channels_last=runtime.use_channels_last("auto", device, precision), compile=False)
    model_args = bench.PAPER
    head = (f"device {bench.versions()['cpu'] if device.type == 'cpu' else torch.cuda.get_device_name(device)}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, {bench.label(**settings)}, "
            f"train batch {args.batch}, sample batch {args.sample_batch}, {args.steps} profiled calls")
    out = [head]
    print(head, flush=True)
    variants = {"train ours": lambda: bench.our_train_step(model_args, device, args.batch, **settings)}
    if not args.no_diffusers:
        variants["train diffusers"] = lambda: bench.diffusers_train_step(model_args, device, args.batch, **settings)
    # one sampling step (the network + the update), ours and diffusers', as bench races them
    variants["sample step ours"] = lambda: bench.our_sampler(UNet(**model_args), device, args.sample_batch, 1,
                                                             **settings)
    if not args.no_diffusers:
        variants["sample step diffusers"] = lambda: bench.diffusers_sampler(model_args, device, args.sample_batch, 1,
                                                                            **settings)
    for name, make in variants.items():
        torch.manual_seed(0)
        text = report(name, profile_fn(make(), device, args.warmup, args.steps), args.top)
        print(text, flush=True)
        out.append(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
