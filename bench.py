"""Time our training step and sampler against diffusers' UNet2DModel + DDPMScheduler, like with like.

Both run in one process on one device at the paper's architecture. "diffusers, same settings" applies every speed
setting of our fast row to UNet2DModel (precision, channels_last, torch.compile, the same Adam, gradient clipping
and an EMA: diffusers' own EMAModel), so the headline ratio is what the implementation earns; what the precision
buys is a line of its own.

    python bench.py [--device auto|cpu|cuda] [--threads N] [--batch B] [--precision auto|fp32|bf16] [--out bench.json]
    python bench.py --quick        # a tiny model, small batch, few steps: a smoke test (CI runs this)

Steps of the variants being compared run interleaved (round robin, after warm-up), so a machine shared
with other work slows them alike; ratios are medians of per-round ratios. Rows that are extrapolated say so and
from what. diffusers is a benchmark-only dependency (requirements-bench.txt); without it its rows are skipped.
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
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import config
import data
import ddpm
import runtime
import train
from export import diffusers_config  # google/ddpm-cifar10-32's layout, which computes what our UNet computes
from runtime import cpu_has_native_bf16, resolve_precision
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


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for fn(), with the device's queue drained before and after."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def race(fns: dict[str, Callable[[], object]], warmup: int, rounds: int, device: torch.device) -> dict:
    """Warm each up (first call: compilation), then `rounds` rounds of one call each, order rotated per round.
    Per variant: wall times (`times_s`, their median) and process CPU times (`cpu_s`: with one thread on a CPU the
    work done whatever else runs on the machine; with more, OpenMP's waiting threads count too)."""
    first = {name: [timed(fn, device)[0] for _ in range(warmup)] for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            wall, c = timed(fns[name], device)
            times[name].append(wall)
            cpu[name].append(c)
    return {name: {"warmup_s": first[name], "times_s": times[name], "median_s": statistics.median(times[name]),
                   "cpu_s": cpu[name]} for name in fns}


def ratio(res: dict, slow: str, fast: str, key: str = "times_s") -> float:
    """How many times faster `fast` ran than `slow`: the median over rounds of the two variants' per-round ratio
    (a round's two steps ran back to back, under the same load)."""
    return statistics.median(a / b for a, b in zip(res[slow][key], res[fast][key], strict=True))


def label(amp_dtype: torch.dtype | None, channels_last: bool, compile: bool) -> str:
    """A variant's settings as a row name: fp32 or bf16, then +cl (channels_last) and +compile."""
    return ("bf16" if amp_dtype == torch.bfloat16 else "fp32") + "+cl" * channels_last + "+compile" * compile


def our_train_step(model_args: dict, device: torch.device, batch: int, *, amp_dtype: torch.dtype | None,
                   channels_last: bool, compile: bool) -> Callable[[], object]:
    """train.train_step on what train.build() makes (as train() does), with these speed settings."""
    precision = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
    cfg = config.Config(train=config.Train(lr=LR, grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY, precision=precision,
                                           channels_last=channels_last, compile=compile))
    torch.manual_seed(0)
    parts = train.build(cfg, model_args, device)
    x = torch.rand(batch, 3, model_args["image_size"], model_args["image_size"], device=device) * 2 - 1
    gen = torch.Generator(device).manual_seed(0)

    def step():
        t, noise = ddpm.draw_t_noise(parts.schedule, x.shape, generator=gen, device=device)
        return train.train_step(parts, x, t, noise, lr=LR)
    return step


def diffusers_train_step(model_args: dict, device: torch.device, batch: int, *, amp_dtype: torch.dtype | None,
                         channels_last: bool, compile: bool) -> Callable[[], object]:
    """diffusers' training step (examples/unconditional_image_generation) with our settings: DDPMScheduler.add_noise,
    MSE on ε under the same autocast, gradient clipping to 1.0, the same Adam, EMAModel(foreach=True).step; the
    same memory format and torch.compile as ours."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel
    torch.manual_seed(0)
    model = UNet2DModel(**diffusers_config(model_args)).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=LR, **train.adam_options(device))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema = EMAModel(model.parameters(), decay=EMA_DECAY, foreach=True)  # its copies in the model's memory format
    net = torch.compile(model) if compile else model
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    x = torch.rand(batch, 3, model_args["image_size"], model_args["image_size"], device=device) * 2 - 1

    def step():
        noise = torch.randn(x.shape, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(x, noise, t)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            pred = net(noisy.contiguous(memory_format=torch.channels_last) if channels_last else noisy, t).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad()
        ema.step(model.parameters())
        return loss.detach()
    return step


def our_sampler(model: UNet, device: torch.device, batch: int, steps: int, **settings) -> Callable[[], object]:
    """ddpm.sample with fast_eps(model, **settings); `steps` < 1000 samples a respaced chain (same work per step)."""
    fn = fast_eps(model, device, **settings)
    schedule = ddpm.make_schedule().to(device)
    gen = torch.Generator(device).manual_seed(0)
    shape = (batch, 3, model.image_size, model.image_size)
    return lambda: ddpm.sample(schedule, fn, shape, steps=steps, generator=gen, device=device)


class _Eps(torch.nn.Module):
    """UNet2DModel as an ε(x_t, t) network, so that `fast_eps` applies our inference settings to it."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def diffusers_sampler(model_args: dict, device: torch.device, batch: int, steps: int,
                      **settings) -> Callable[[], object]:
    """DDPMPipeline's loop (UNet2DModel, then DDPMScheduler.step), the network run through fast_eps(**settings) as
    ours is: the same autocast, memory format and torch.compile."""
    from diffusers import DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    eps = fast_eps(_Eps(UNet2DModel(**diffusers_config(model_args))), device, **settings)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              variance_type="fixed_large", clip_sample=True)
    scheduler.set_timesteps(steps)
    gen = torch.Generator(device).manual_seed(0)

    @torch.no_grad()
    def run():
        image = torch.randn((batch, 3, model_args["image_size"], model_args["image_size"]), generator=gen,
                            device=device)
        for t in scheduler.timesteps:
            out = eps(image, t.to(device).expand(batch)).to(image.dtype)
            image = scheduler.step(out, t, image, generator=gen).prev_sample
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
    return num_images / timed(epoch, device)[0]


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


def compile_settings(mode: str, device: torch.device, precision: str, quick: bool) -> tuple[bool, bool]:
    """(compile training, compile sampling) for `--compile mode`. "auto" compiles where it was measured to pay
    (docs/benchmarks.md): on CUDA both; on a CPU bf16 sampling only (1.27x on the AMX CPU), neither fp32 sampling
    (0.98x and 0.97x on the CPU without AMX) nor training, whose step took 1.5 to 7 minutes to compile and ran no
    faster. --quick compiles nothing unless told to."""
    if mode != "auto":
        return mode == "on", mode == "on"
    cuda = device.type == "cuda"
    return cuda, cuda or (not quick and precision == "bf16")


def precision_info(requested: str, device: torch.device) -> dict:
    """What `--precision` resolved to on `device` (runtime.resolve_precision) and the capability it followed."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        source = f"{torch.cuda.get_device_name(device)}: bf16 {'supported' if native else 'not supported'}"
    else:
        caps = torch.cpu.get_capabilities()
        native = cpu_has_native_bf16()
        source = (f"CPU AMX-BF16: {'yes' if native else 'no'}, AVX512-BF16: "
                  f"{'yes' if caps.get('avx512_bf16') else 'no'} (torch.cpu.get_capabilities)")
    return {"requested": requested, "resolved": resolve_precision(requested, device), "native_bf16": bool(native),
            "capability": source}


def variants(make: Callable[..., Callable[[], object]], settings: dict, have_diffusers: bool,
             diffusers_make: Callable[..., Callable[[], object]]) -> dict[str, Callable[[], object]]:
    """Ours and diffusers' at the fast `settings`, and both in fp32 eager when that is not the same thing."""
    plain = dict(amp_dtype=None, channels_last=False, compile=False)
    out = {f"ours {label(**settings)}": make(**settings)}
    if settings != plain:
        out["ours fp32"] = make(**plain)
    if have_diffusers:
        out[f"diffusers {label(**settings)}"] = diffusers_make(**settings)
        if settings != plain:
            out["diffusers fp32"] = diffusers_make(**plain)
    return out


def ratios(res: dict, fast: str) -> dict:
    """The headline (ours against diffusers at the same settings) and the side lines, as median per-round ratios
    of wall times, and of CPU times (`_cpu`: the steadier figure on a CPU shared with other work, with --threads 1);
    None where a row is missing (no diffusers) or a line compares a row with itself (fast settings = fp32 eager)."""
    setting = fast.removeprefix("ours ")
    out = {}
    for key, slow, quick in (("vs_diffusers", f"diffusers {setting}", fast),
                             ("fp32_vs_diffusers_fp32", "diffusers fp32", "ours fp32"),
                             ("settings_vs_ours_fp32", "ours fp32", fast)):
        there = slow in res and quick in res and slow != quick and not (key.startswith("fp32") and quick == fast)
        out[key] = ratio(res, slow, quick) if there else None
        out[key + "_cpu"] = ratio(res, slow, quick, "cpu_s") if there else None
    return out


@dataclass(frozen=True)
class Setup:
    """What `bench` measures with, from its flags and the device: the model, batches and rounds (--quick: a tiny
    model, small batches, few rounds), and the settings of the fast rows."""
    device: torch.device
    quick: bool
    model_args: dict
    batch: int                 # training
    warmup: int
    rounds: int
    sample_batch: int
    sample_steps: int
    precision: dict            # precision_info
    channels_last: bool
    compile_train: bool
    compile_sample: bool
    diffusers_skipped: str | None  # why diffusers' rows are left out; None: they run

    @property
    def have_diffusers(self) -> bool:
        return self.diffusers_skipped is None

    def fast(self, compile: bool) -> dict:
        """The fast rows' settings: `our_train_step`'s, `fast_eps`'s and `label`'s keyword arguments."""
        amp_dtype = torch.bfloat16 if self.precision["resolved"] == "bf16" else None
        return dict(amp_dtype=amp_dtype, channels_last=self.channels_last, compile=compile)


def bench_setup(args: argparse.Namespace) -> Setup:
    """`main`'s flags resolved on the device they name: --quick's sizes, the precision, what to compile, and whether
    diffusers is installed."""
    device = runtime.resolve_device(args.device)
    cuda = device.type == "cuda"
    precision = precision_info(args.precision, device)
    compile_train, compile_sample = compile_settings(args.compile, device, precision["resolved"], args.quick)
    try:
        import diffusers  # noqa: F401
        skipped = None
    except ImportError:
        skipped = "diffusers is not installed (pip install -r requirements-bench.txt)"
    quick = args.quick
    warmup, rounds = (1, 2) if quick else (args.warmup, args.rounds)
    return Setup(device=device, quick=quick, model_args=TINY if quick else PAPER,
                 batch=args.batch or (8 if quick else PAPER_BATCH), warmup=warmup, rounds=rounds,
                 sample_batch=args.sample_batch or (4 if quick else 256 if cuda else 8),
                 sample_steps=args.sample_steps or (2 if quick else 1000 if cuda else 5), precision=precision,
                 channels_last=runtime.use_channels_last("auto", device, precision["resolved"]),  # as train.py's
                 compile_train=compile_train, compile_sample=compile_sample, diffusers_skipped=skipped)


def bench(args: argparse.Namespace) -> dict:
    """Every measurement `main` prints and writes to --out: the set-up, the training step and the sampler (ours
    against diffusers'), the data loader, the peak memory and the machine's load before and after."""
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    s = bench_setup(args)
    out = describe(s)
    out.update(bench_training(s))
    out["sample"] = bench_sampling(s)
    out["data"] = bench_data(s, out["train"]["variants"][out["train"]["fast"]]["images_per_s"])
    out["memory"] = peak_memory(s.device)
    out["load"] = {"before": list(load_before), "after": list(os.getloadavg()),
                   "note": "os.getloadavg() (1, 5, 15 min) before and after the run; above the thread count, other "
                           "work shared the cores"}
    return out


def describe(s: Setup) -> dict:
    """The result's head: when, on what, in which precision, which model, and both models' parameter counts."""
    cuda = s.device.type == "cuda"
    out: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": s.quick,
                 "device": torch.cuda.get_device_name(s.device) if cuda else f"cpu ({versions()['cpu']})",
                 "device_type": s.device.type, "threads": torch.get_num_threads(), "versions": versions(),
                 "precision": s.precision,
                 "model": {k: list(v) if isinstance(v, tuple) else v for k, v in s.model_args.items()},
                 "diffusers_skipped": s.diffusers_skipped}
    log(f"precision {s.precision['requested']} -> {s.precision['resolved']} ({s.precision['capability']})")
    ours = sum(p.numel() for p in UNet(**s.model_args).parameters())
    theirs = None
    if s.have_diffusers:
        from diffusers import UNet2DModel
        theirs = sum(p.numel() for p in UNet2DModel(**diffusers_config(s.model_args)).parameters())
    out["params"] = {"ours": ours, "diffusers": theirs}
    log(f"parameters: ours {ours:,}, diffusers {theirs if theirs is None else f'{theirs:,}'}")
    return out


def bench_training(s: Setup) -> dict:
    """The training step: ours at the fast settings, diffusers' at the same, and both in fp32 eager (when that
    differs); the FLOPs and MFU of our fast step, and 100 epochs extrapolated from it."""
    settings = s.fast(s.compile_train)
    steps = variants(lambda **kw: our_train_step(s.model_args, s.device, s.batch, **kw), settings, s.have_diffusers,
                     lambda **kw: diffusers_train_step(s.model_args, s.device, s.batch, **kw))
    log(f"training: {', '.join(steps)} at batch {s.batch}, {s.warmup} warm-up + {s.rounds} interleaved steps each")
    res = race(steps, s.warmup, s.rounds, s.device)
    del steps
    for name, r in res.items():
        r["images_per_s"] = s.batch / r["median_s"]
        r["compile_s"] = r["warmup_s"][0] - r["median_s"] if "compile" in name else None  # first call - steady
    fast = f"ours {label(**settings)}"
    img_s = res[fast]["images_per_s"]
    flops, fwd_flops = train_flops_per_image(s.model_args, s.device)
    peak, source = peak_flops(s.device, torch.get_num_threads())
    return {"train": {"batch": s.batch, "warmup": s.warmup, "rounds": s.rounds, "variants": res, "fast": fast,
                      **ratios(res, fast)},
            "flops": {"train_per_image": flops, "forward_per_image": fwd_flops, "peak_bf16": peak,
                      "peak_source": source, "mfu": flops * img_s / peak if peak else None,
                      "mfu_note": "training FLOPs/image (FlopCounterMode, fwd+bwd) x images/s of the fast step / peak"},
            "extrapolated_100_epochs": {
                "minutes": EPOCH_100_STEPS * PAPER_BATCH / img_s / 60,
                "basis": f"EXTRAPOLATED: {EPOCH_100_STEPS} steps x {PAPER_BATCH} images at the {img_s:.2f} images/s "
                         f"measured for '{fast}' at batch {s.batch}" + ("" if s.quick else "; model as in the paper")}}


def bench_sampling(s: Setup) -> dict:
    """The sampler: image-steps/s of both loops, and the time for 256 images x 1000 steps (measured at CUDA's
    defaults, else extrapolated)."""
    settings = s.fast(s.compile_sample)

    def ours(**kw):
        torch.manual_seed(0)
        return our_sampler(UNet(**s.model_args), s.device, s.sample_batch, s.sample_steps, **kw)
    samplers = variants(ours, settings, s.have_diffusers,
                        lambda **kw: diffusers_sampler(s.model_args, s.device, s.sample_batch, s.sample_steps, **kw))
    log(f"sampling: {', '.join(samplers)}, batch {s.sample_batch} x {s.sample_steps} steps")
    res = race(samplers, s.warmup, s.rounds, s.device)
    del samplers
    for name, r in res.items():
        r["compile_s"] = r["warmup_s"][0] - r["median_s"] if "compile" in name else None
        r["image_steps_per_s"] = s.sample_batch * s.sample_steps / r["median_s"]
        r["seconds_256x1000"] = 256 * 1000 / r["image_steps_per_s"]
    fast = f"ours {label(**settings)}"
    full = s.sample_batch == 256 and s.sample_steps == 1000
    return {"batch": s.sample_batch, "steps": s.sample_steps, "variants": res, "fast": fast,
            "basis": "measured: 256 images x 1000 steps" if full else
            f"EXTRAPOLATED to 256 x 1000 from image-steps/s measured at batch {s.sample_batch} x {s.sample_steps} "
            f"steps", **ratios(res, fast)}


def bench_data(s: Setup, train_images_per_s: float) -> dict:
    """data.BatchIterator's rate at the paper's batch, and its headroom over what the fast training step consumes."""
    n_images = 2048 if s.quick else 50_000
    rate = data_rate(s.device, PAPER_BATCH, n_images)
    return {"batch": PAPER_BATCH, "images": n_images, "images_per_s": rate, "train_images_per_s": train_images_per_s,
            "headroom": rate / train_images_per_s}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _times(res: dict, rows: list, kind: str, value: Callable[[dict], str], extra: Callable[[dict], str],
           fast: str) -> None:
    for name, v in res.items():
        rows.append((f"{kind} {name}", value(v), extra(v) + (f" (compile ~{v['compile_s']:.0f} s)"
                                                             if v["compile_s"] is not None else "")
                     + (" <- fast" if name == fast else "")))


def _ratio_rows(part: dict, kind: str, rows: list) -> None:
    setting = part["fast"].removeprefix("ours ")
    lines = (("vs_diffusers", f"{kind} speedup", f"vs diffusers {setting} (same settings)"),
             ("fp32_vs_diffusers_fp32", f"{kind} fp32 eager", "ours vs diffusers, both fp32 eager"),
             ("settings_vs_ours_fp32", f"{kind} {setting}", "what the settings buy: ours vs ours fp32 eager"))
    for key, name, what in lines:
        if part.get(key) is not None:
            rows.append((name, f"{part[key]:.2f}x", f"{what}; median per-round ratio of wall times (CPU time: "
                                                    f"{part[key + '_cpu']:.2f}x)"))


def table(r: dict) -> str:
    p = r["precision"]
    rows = [("device", r["device"], f"{r['threads']} threads; torch {r['versions']['torch']}, "
             f"diffusers {r['versions']['diffusers']}"),
            ("precision", f"{p['requested']} -> {p['resolved']}", p["capability"]),
            ("parameters", f"{r['params']['ours']:,}", f"diffusers UNet2DModel: {r['params']['diffusers']}")]
    tr = r["train"]
    _times(tr["variants"], rows, "train", lambda v: f"{v['images_per_s']:.2f} img/s",
           lambda v: f"batch {tr['batch']}, median of {tr['rounds']}; first step {v['warmup_s'][0]:.1f} s", tr["fast"])
    _ratio_rows(tr, "train", rows)
    if tr["vs_diffusers"] is None:
        rows.append(("train speedup", "n/a", "vs diffusers: skipped"))
    fl = r["flops"]
    rows.append(("train FLOPs/image", f"{fl['train_per_image'] / 1e9:.2f} GFLOP", "FlopCounterMode, fwd+bwd"))
    rows.append(("MFU", "n/a" if fl["mfu"] is None else f"{100 * fl['mfu']:.2f} %", fl["peak_source"]))
    s = r["sample"]
    _times(s["variants"], rows, "sample", lambda v: f"{v['image_steps_per_s']:.1f} img-steps/s",
           lambda v: f"256x1000: {v['seconds_256x1000']:,.0f} s ({s['basis'].split(':')[0].lower()}); "
                     f"first call {v['warmup_s'][0]:.1f} s", s["fast"])
    _ratio_rows(s, "sample", rows)
    rows.append(("sample basis", "", s["basis"]))
    d = r["data"]
    rows.append(("data BatchIterator", f"{d['images_per_s']:,.0f} img/s",
                 f"{d['headroom']:,.0f}x what the fast step consumes"))
    rows.append(("peak memory", f"{r['memory']['mib']:,.0f} MiB", r["memory"]["kind"]))
    e = r["extrapolated_100_epochs"]
    rows.append(("100 epochs", f"{e['minutes']:,.1f} min", e["basis"]))
    rows.append(("load", " / ".join(f"{x:.2f}" for x in r["load"]["after"]),
                 f"1/5/15-min load average after the run (before: {r['load']['before'][0]:.2f}); "
                 f"{r['threads']} threads"))
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
                   help="try torch.compile: auto = training and sampling on CUDA, bf16 sampling only on a CPU "
                        "(not with --quick); on = both everywhere")
    p.add_argument("--precision", choices=runtime.SAMPLING_PRECISIONS, default="auto",
                   help="the fast rows' precision: auto = bf16 where native (CUDA with bf16, CPU with AMX-BF16), "
                        "else fp32")
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(argv)
    result = bench(args)
    print(table(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
