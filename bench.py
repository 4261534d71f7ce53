"""Time our training step and sampler against diffusers' UNet2DModel + DDPMScheduler, side by side.

Both run in one process on one device at the paper's architecture; diffusers in its usual fp32 eager use.

    python bench.py [--device auto|cpu|cuda] [--threads N] [--batch B] [--out bench.json]
    python bench.py --quick        # a tiny model, small batch, few steps: a smoke test (CI runs this)

Steps of the variants being compared run interleaved (round robin, after warm-up), so a machine shared
with other work slows them alike. Rows that are extrapolated say so and from what. diffusers is a
benchmark-only dependency (requirements-bench.txt); without it the diffusers rows are skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import config
import data
import ddpm
import runtime
import train
from export import diffusers_config  # google/ddpm-cifar10-32's layout, which computes what our UNet computes
from sample import fast_eps
from unet import UNet

LR, GRAD_CLIP, EMA_DECAY = 2e-4, 1.0, 0.9999
EPOCH_100_STEPS, PAPER_BATCH = 39_100, 128  # 100 epochs of CIFAR-10's 50,000 images at batch 128
PAPER = dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
             image_size=32)
TINY = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1, image_size=16)
# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), in FLOP/s.
GPU_PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
AMX_BF16_FLOP_PER_CYCLE = 1024  # per core: one 16x32 by 32x16 bf16 tile multiply (8192 MACs) every 16 cycles


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for fn(), with the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def race(fns: dict[str, Callable[[], object]], warmup: int, rounds: int, device: torch.device) -> dict:
    """Warm each up (first call: compilation), then `rounds` rounds of one call each, order rotated per round."""
    first = {name: [timed(fn, device) for _ in range(warmup)] for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(fns[name], device))
    return {name: {"warmup_s": first[name], "times_s": times[name], "median_s": statistics.median(times[name])}
            for name in fns}


def our_train_step(model_args: dict, device: torch.device, batch: int, *, precision: str, channels_last: bool,
                   compile: bool) -> Callable[[], object]:
    """train.train_step on what train.build() makes (as train() does), with these fast-path settings."""
    cfg = config.Config(train=config.Train(lr=LR, grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY, precision=precision,
                                           channels_last=channels_last, compile=compile))
    parts = train.build(cfg, model_args, device)
    x = torch.rand(batch, 3, model_args["image_size"], model_args["image_size"], device=device) * 2 - 1
    gen = torch.Generator(device).manual_seed(0)

    def step():
        t, noise = ddpm.draw_t_noise(parts.schedule, x.shape, generator=gen, device=device)
        return train.train_step(parts, x, t, noise, lr=LR)
    return step


def diffusers_train_step(model_args: dict, device: torch.device, batch: int) -> Callable[[], object]:
    """The usual diffusers step: DDPMScheduler.add_noise, MSE on ε, Adam, plain optimizer.step(); fp32 eager."""
    from diffusers import DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    model = UNet2DModel(**diffusers_config(model_args)).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    x = torch.rand(batch, 3, model_args["image_size"], model_args["image_size"], device=device) * 2 - 1

    def step():
        noise = torch.randn(x.shape, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        loss = F.mse_loss(model(scheduler.add_noise(x, noise, t), t).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()
    return step


def our_sampler(model: UNet, device: torch.device, batch: int, steps: int, **settings) -> Callable[[], object]:
    """ddpm.sample with fast_eps(model, **settings); `steps` < 1000 samples a respaced chain (same work per step)."""
    fn = fast_eps(model, device, **settings)
    schedule = ddpm.make_schedule().to(device)
    gen = torch.Generator(device).manual_seed(0)
    shape = (batch, 3, model.image_size, model.image_size)
    return lambda: ddpm.sample(schedule, fn, shape, steps=steps, generator=gen, device=device)


def diffusers_sampler(model_args: dict, device: torch.device, batch: int, steps: int) -> Callable[[], object]:
    """DDPMPipeline's loop: UNet2DModel + DDPMScheduler.step, fp32 eager, no_grad."""
    from diffusers import DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    model = UNet2DModel(**diffusers_config(model_args)).to(device).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              variance_type="fixed_large", clip_sample=True)
    scheduler.set_timesteps(steps)
    gen = torch.Generator(device).manual_seed(0)

    @torch.no_grad()
    def run():
        image = torch.randn((batch, 3, model_args["image_size"], model_args["image_size"]), generator=gen,
                            device=device)
        for t in scheduler.timesteps:
            image = scheduler.step(model(image, t).sample, t, image, generator=gen).prev_sample
        return image
    return run


def train_flops_per_image(model_args: dict, device: torch.device, batch: int = 2) -> tuple[float, float]:
    """(fwd+bwd, fwd) FLOPs per image of our model, counted by FlopCounterMode (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = UNet(**model_args).to(device)
    schedule = ddpm.make_schedule().to(device)
    x = torch.zeros(batch, 3, model_args["image_size"], model_args["image_size"], device=device)
    t, noise = ddpm.draw_t_noise(schedule, x.shape, generator=torch.Generator(device).manual_seed(0), device=device)
    with FlopCounterMode(display=False) as fwd_counter:
        loss = ddpm.loss(schedule, model, x, t=t, noise=noise)
    with FlopCounterMode(display=False) as bwd_counter:
        loss.backward()
    fwd = fwd_counter.get_total_flops()
    return (fwd + bwd_counter.get_total_flops()) / batch, fwd / batch


def peak_flops(device: torch.device, threads: int) -> tuple[float | None, str]:
    """The device's peak dense bf16 FLOP/s and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name}: {value / 1e12:.0f} TFLOP/s dense bf16 (vendor datasheet, SXM unless PCIe)"
        return None, f"{name}: no peak figure known (add it to GPU_PEAK_BF16)"
    flags, mhz = "", 0.0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = line
                if line.startswith("cpu MHz"):
                    mhz = max(mhz, float(line.split(":")[1]))
    except OSError:
        pass
    if " amx_bf16" not in flags or not mhz:
        return None, "CPU without AMX-bf16 (or no /proc/cpuinfo): no stated peak, MFU n/a"
    value = AMX_BF16_FLOP_PER_CYCLE * threads * mhz * 1e6
    return value, (f"estimate: AMX {AMX_BF16_FLOP_PER_CYCLE} bf16 FLOP/cycle/core x {threads} threads x "
                   f"{mhz:.0f} MHz (/proc/cpuinfo) = {value / 1e12:.2f} TFLOP/s; a ceiling no whole model reaches")


def data_rate(device: torch.device, batch: int, num_images: int) -> float:
    """Images/s that data.BatchIterator delivers over one epoch of CIFAR-shaped random uint8 images (flips on)."""
    images = torch.randint(0, 256, (num_images, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    it = data.BatchIterator(images, batch, seed=0, device=device, random_flip=True)

    def epoch():
        for x in it.epoch_batches():
            pass
        return x
    return num_images / timed(epoch, device)


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"kind": "cuda max_memory_allocated (whole bench, all models resident)",
                "mib": torch.cuda.max_memory_allocated(device) / 2**20}
    # ru_maxrss is KiB on Linux
    return {"kind": "CPU peak RSS of the bench process (resource.getrusage; all models resident)",
            "mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def versions() -> dict:
    try:
        import diffusers
        dv = diffusers.__version__
    except ImportError:
        dv = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": dv, "cpu": cpu}


def bench(args: argparse.Namespace) -> dict:
    device = runtime.resolve_device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    model_args = TINY if args.quick else PAPER
    batch = args.batch or (8 if args.quick else PAPER_BATCH)
    warmup, rounds = (1, 2) if args.quick else (args.warmup, args.rounds)
    s_batch = args.sample_batch or (4 if args.quick else 256 if cuda else 8)
    s_steps = args.sample_steps or (2 if args.quick else 1000 if cuda else 5)
    # torch.compile where it pays (docs/benchmarks.md): on CUDA; on CPU for sampling only, whose forward-only graph
    # compiles in under a minute and runs ~1.25x faster, while the training step's took 1.5 to 7 minutes to compile
    # and ran no faster.
    compile_train = args.compile == "on" or (args.compile == "auto" and cuda)
    compile_sample = args.compile == "on" or (args.compile == "auto" and (cuda or not args.quick))
    try:
        import diffusers  # noqa: F401
        have_diffusers, skipped = True, None
    except ImportError:
        have_diffusers, skipped = False, "diffusers is not installed (pip install -r requirements-bench.txt)"
    out: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
                 "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({versions()['cpu']})",
                 "device_type": device.type, "threads": torch.get_num_threads(), "versions": versions(),
                 "model": {k: list(v) if isinstance(v, tuple) else v for k, v in model_args.items()},
                 "diffusers_skipped": skipped}

    ours = sum(p.numel() for p in UNet(**model_args).parameters())
    theirs = None
    if have_diffusers:
        from diffusers import UNet2DModel
        theirs = sum(p.numel() for p in UNet2DModel(**diffusers_config(model_args)).parameters())
    out["params"] = {"ours": ours, "diffusers": theirs}
    log(f"parameters: ours {ours:,}, diffusers {theirs if theirs is None else f'{theirs:,}'}")

    # Training: our fp32 eager step, the fast candidates (the best one is "fast"), diffusers' fp32 eager step.
    fast = {"bf16": dict(precision="bf16", channels_last=False, compile=False),
            "bf16+cl": dict(precision="bf16", channels_last=True, compile=False)}
    if compile_train:
        fast["bf16+cl+compile"] = dict(precision="bf16", channels_last=True, compile=True)
    steps = {"ours fp32": our_train_step(model_args, device, batch, precision="fp32", channels_last=False,
                                         compile=False)}
    steps.update({f"ours {k}": our_train_step(model_args, device, batch, **v) for k, v in fast.items()})
    if have_diffusers:
        steps["diffusers fp32"] = diffusers_train_step(model_args, device, batch)
    log(f"training: {', '.join(steps)} at batch {batch}, {warmup} warm-up + {rounds} interleaved steps each")
    res = race(steps, warmup, rounds, device)
    for name, r in res.items():
        r["images_per_s"] = batch / r["median_s"]
        r["compile_s"] = r["warmup_s"][0] - r["median_s"] if "compile" in name else None  # first call - steady
    best = max((f"ours {k}" for k in fast), key=lambda k: res[k]["images_per_s"])
    img_s = res[best]["images_per_s"]
    out["train"] = {"batch": batch, "warmup": warmup, "rounds": rounds, "variants": res, "fast": best,
                    "speedup_vs_ours_fp32": img_s / res["ours fp32"]["images_per_s"],
                    "speedup_vs_diffusers": img_s / res["diffusers fp32"]["images_per_s"] if have_diffusers else None}
    del steps

    flops, fwd_flops = train_flops_per_image(model_args, device)
    peak, source = peak_flops(device, torch.get_num_threads())
    out["flops"] = {"train_per_image": flops, "forward_per_image": fwd_flops, "peak_bf16": peak, "peak_source": source,
                    "mfu": flops * img_s / peak if peak else None,
                    "mfu_note": "training FLOPs/image (FlopCounterMode, fwd+bwd) x images/s of the fast step / peak"}
    out["extrapolated_100_epochs"] = {
        "minutes": EPOCH_100_STEPS * PAPER_BATCH / img_s / 60,
        "basis": f"EXTRAPOLATED: {EPOCH_100_STEPS} steps x {PAPER_BATCH} images at the {img_s:.2f} images/s "
                 f"measured for '{best}' at batch {batch}" + ("" if args.quick else "; model as in the paper")}

    # Sampling: image-steps/s of both loops, and the time for 256 images x 1000 steps (measured at CUDA's defaults,
    # else extrapolated).
    bf16 = runtime.amp_dtype("bf16")
    s_fast = {"bf16+cl": dict(amp_dtype=bf16, channels_last=True, compile=False)}
    if compile_sample:
        s_fast["bf16+cl+compile"] = dict(amp_dtype=bf16, channels_last=True, compile=True)
    torch.manual_seed(0)
    samplers = {f"ours {k}": our_sampler(UNet(**model_args), device, s_batch, s_steps, **v) for k, v in s_fast.items()}
    if have_diffusers:
        samplers["diffusers fp32"] = diffusers_sampler(model_args, device, s_batch, s_steps)
    log(f"sampling: {', '.join(samplers)}, batch {s_batch} x {s_steps} steps")
    sres = race(samplers, warmup, rounds, device)
    for name, r in sres.items():
        r["compile_s"] = r["warmup_s"][0] - r["median_s"] if "compile" in name else None
        r["image_steps_per_s"] = s_batch * s_steps / r["median_s"]
        r["seconds_256x1000"] = 256 * 1000 / r["image_steps_per_s"]
    s_best = max((f"ours {k}" for k in s_fast), key=lambda k: sres[k]["image_steps_per_s"])
    full = s_batch == 256 and s_steps == 1000
    out["sample"] = {"batch": s_batch, "steps": s_steps, "variants": sres, "fast": s_best,
                     "basis": "measured: 256 images x 1000 steps" if full else
                     f"EXTRAPOLATED to 256 x 1000 from image-steps/s measured at batch {s_batch} x {s_steps} steps",
                     "speedup_vs_diffusers": (sres[s_best]["image_steps_per_s"] /
                                              sres["diffusers fp32"]["image_steps_per_s"]) if have_diffusers else None}
    del samplers

    n_images = 2048 if args.quick else 50_000
    rate = data_rate(device, PAPER_BATCH, n_images)
    out["data"] = {"batch": PAPER_BATCH, "images": n_images, "images_per_s": rate, "train_images_per_s": img_s,
                   "headroom": rate / img_s}
    out["memory"] = peak_memory(device)
    return out


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def table(r: dict) -> str:
    rows = [("device", r["device"], f"{r['threads']} threads; torch {r['versions']['torch']}, "
             f"diffusers {r['versions']['diffusers']}"),
            ("parameters", f"{r['params']['ours']:,}", f"diffusers UNet2DModel: {r['params']['diffusers']}")]
    tr = r["train"]
    for name, v in tr["variants"].items():
        star = " <- fast" if name == tr["fast"] else ""
        rows.append((f"train {name}", f"{v['images_per_s']:.2f} img/s",
                     f"batch {tr['batch']}, median of {tr['rounds']}; first step {v['warmup_s'][0]:.1f} s"
                     + (f" (compile ~{v['compile_s']:.0f} s)" if v["compile_s"] is not None else "") + star))
    rows.append(("train speedup", f"{tr['speedup_vs_ours_fp32']:.2f}x vs ours fp32",
                 "n/a vs diffusers (skipped)" if tr["speedup_vs_diffusers"] is None
                 else f"{tr['speedup_vs_diffusers']:.2f}x vs diffusers fp32"))
    fl = r["flops"]
    rows.append(("train FLOPs/image", f"{fl['train_per_image'] / 1e9:.2f} GFLOP", "FlopCounterMode, fwd+bwd"))
    rows.append(("MFU", "n/a" if fl["mfu"] is None else f"{100 * fl['mfu']:.2f} %", fl["peak_source"]))
    s = r["sample"]
    for name, v in s["variants"].items():
        star = " <- fast" if name == s["fast"] else ""
        rows.append((f"sample {name}", f"{v['image_steps_per_s']:.1f} img-steps/s",
                     f"256x1000: {v['seconds_256x1000']:,.0f} s ({s['basis'].split(':')[0].lower()}); "
                     f"first call {v['warmup_s'][0]:.1f} s"
                     + (f" (compile ~{v['compile_s']:.0f} s)" if v["compile_s"] is not None else "") + star))
    if s["speedup_vs_diffusers"] is not None:
        rows.append(("sample speedup", f"{s['speedup_vs_diffusers']:.2f}x vs diffusers fp32", s["basis"]))
    d = r["data"]
    rows.append(("data BatchIterator", f"{d['images_per_s']:,.0f} img/s",
                 f"{d['headroom']:,.0f}x what the fast step consumes"))
    rows.append(("peak memory", f"{r['memory']['mib']:,.0f} MiB", r["memory"]["kind"]))
    e = r["extrapolated_100_epochs"]
    rows.append(("100 epochs", f"{e['minutes']:,.1f} min", e["basis"]))
    if r["diffusers_skipped"]:
        rows.append(("diffusers rows", "skipped", r["diffusers_skipped"]))
    w = max(len(a) for a, _, _ in rows), max(len(b) for _, b, _ in rows)
    return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c}" for a, b, c in rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="tiny model, small batch, few steps (under a minute on CPU)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 128; 8 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per variant (the first one compiles)")
    p.add_argument("--rounds", type=int, default=3, help="measured steps per variant, interleaved")
    p.add_argument("--sample-batch", type=int, default=None, help="default 256 on CUDA, 8 on CPU")
    p.add_argument("--sample-steps", type=int, default=None, help="default 1000 on CUDA, 5 on CPU (extrapolated)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="try torch.compile: auto = training and sampling on CUDA, sampling only on CPU "
                        "(not with --quick); on = both everywhere")
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(argv)
    try:
        runtime.resolve_device(args.device)
    except ValueError as e:
        p.error(f"--device {e}")
    result = bench(args)
    print(table(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
