"""Train DDPM (Algorithm 1) from one YAML file:

    python train.py --config config.yaml [key.sub=value ...] [--fresh]
    torchrun --nproc_per_node=N train.py --config config.yaml        # DistributedDataParallel

Running the same command again resumes from `<out_dir>/checkpoint.pt`, bitwise identical (CPU) to a run
that was never interrupted. `train(config)` is the function; `main()` only parses arguments.

The shape: `prepare()` makes every check and builds everything (`build()`: the model and what a step updates;
`TrainState`: everything a checkpoint holds); `run_epochs()` is the loop; `end_epoch()` its per-epoch records.
"""
from __future__ import annotations

import copy
import csv
import io
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import Tensor

import data
import ddpm
import runtime
from checkpoint import model_args as checkpoint_model_args
from checkpoint import (CheckpointError, atomic_write, load_checkpoint, remove_stale_temps, save_checkpoint,
                        write_json)
from config import Config, ConfigError, cli, fail, flatten, from_dict, resumable_keys, to_dict
from runtime import Dist, derive_seed, progress_bar
from sample import Inference, generate, image_grid, save_grid, schedule_from_config
from unet import UNet

HISTORY_FIELDS = ["epoch", "step", "loss", "ema_loss", "lr", "images_per_sec", "wall_time_s", "fid", "class_coverage",
                  "fid_time_s"]  # the last three only in epochs with eval.every_epochs
OUTPUTS = ("checkpoint.pt", "metrics.json", "history.csv", "samples", "eval")  # what --fresh removes: eval/ holds
# evaluate.py's records and sample shards of the old weights


class TrainError(Exception):
    """A failure during training (non-finite loss, disk full); one line, exit status 1."""


# ---------------------------------------------------------------- the step

def lr_at(step: int, lr: float, warmup_steps: int, *, schedule: str = "constant", total_steps: int | None = None,
          min_lr: float = 0.0) -> float:
    """The learning rate of step `step` (0-based): linear warmup (paper, Appendix B) over the first `warmup_steps`
    steps, then constant (the paper), or decaying from `lr` at step `warmup_steps` to `min_lr` at the last step,
    `total_steps` - 1, along a half cosine (Loshchilov & Hutter 2017, eq. 5) or a straight line."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule not in ("cosine", "linear") or total_steps is None:
        raise ValueError(f"lr schedule {schedule!r} needs total_steps and is one of constant, cosine, linear")
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr + (lr - min_lr) * shape


def ema_decay_at(step: int, decay: float, *, warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3,
                 min_decay: float = 0.0) -> float:
    """The EMA decay of step `step` (0-based): `decay` (the paper), or with `warmup` diffusers' EMAModel(
    use_ema_warmup=True) schedule, min(decay, 1 - (1 + step / inv_gamma) ** -power) clamped below at min_decay,
    with 0 at the first step (the EMA starts as the model). A function of the step alone: a resume is exact."""
    if not warmup:
        return decay
    if step <= 0:
        return 0.0
    return max(min_decay, min(decay, 1.0 - (1.0 + step / inv_gamma) ** -power))


def dropout_seed(seed: int, step: int, dist: Dist) -> int:
    """The global generator's seed for step `step` (0-based) on this process: dropout, its only user in a step,
    draws other masks on every process and step (under torchrun each process holds other images), and, as a
    function of (seed, step, rank, world), needs no state to resume exactly."""
    return derive_seed(seed, 6, step * dist.world + dist.rank)


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """The run's optimizer steps: train.epochs of `steps_per_epoch`, stopped early at train.max_steps if set."""
    steps = cfg.train.epochs * steps_per_epoch
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps is not None else steps


def adam_options(device: torch.device) -> dict:
    """Adam's one-pass implementation: fused kernels, on CUDA and on the CPU, where one step over the paper model's
    35.7M weights took 44 ms against foreach's 132 ms on one core of the Xeon of docs/benchmarks.md (bench.py gives
    diffusers' rows the same). `device` is kept for devices without a fused Adam: foreach ops there."""
    return {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, in one fused foreach op."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


@dataclass
class Parts:
    """What `build` makes: the model and everything a step updates, with the settings a step applies."""
    model: UNet
    ema: UNet
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: ddpm.Schedule
    net: torch.nn.Module  # what the forward pass calls: `model`, or its DDP / compiled wrapper
    precision: str  # resolved: fp32, bf16 or fp16
    channels_last: bool
    grad_clip: float | None
    ema_decay: float
    snr_gamma: float | None = None  # Min-SNR-γ loss weights (train.loss_weighting: min_snr), None: L_simple


def build(cfg: Config, unet_args: dict, device: torch.device, dist: Dist = Dist()) -> Parts:
    """The UNet (initialised from random stream 0 of cfg.seed), its EMA copy, the optimizer, the loss scaler and
    the schedule, in the precision and memory format `runtime` picks for `device`, with the DDP and compile
    wrappers: what train() trains, bench.py times and the fast-path tests check. ConfigError if the UNet cannot
    be built."""
    tc = cfg.train
    precision = runtime.resolve_precision(tc.precision, device)
    torch.manual_seed(derive_seed(cfg.seed, 0))
    try:
        model = UNet(**unet_args).to(device)
    except (RuntimeError, MemoryError) as e:  # e.g. model.channels=2**40: more weights than memory (or int64) holds
        raise ConfigError(f"model: cannot build this UNet on {device} ({' '.join(str(e).split())[:160]})") from None
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if tc.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, **adam_options(device))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay,
                              foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    channels_last = runtime.use_channels_last(tc.channels_last, device, precision)
    if channels_last:  # the EMA copy follows, so that its lerp is layout-aligned
        model.to(memory_format=torch.channels_last)
        ema.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if runtime.use_compile(tc.compile, device):
        net = torch.compile(net)
    schedule = schedule_from_config(to_dict(cfg)).to(device)
    return Parts(model, ema, opt, scaler, schedule, net, precision, channels_last, tc.grad_clip, tc.ema_decay,
                 tc.snr_gamma if tc.loss_weighting == "min_snr" else None)


def train_step(p: Parts, x: Tensor, t: Tensor, noise: Tensor, *, lr: float, weight: float = 1.0,
               ema_decay: float | None = None) -> tuple[Tensor, Tensor]:
    """One optimizer step of Algorithm 1 on (x, t, noise), then the EMA update with `ema_decay` (None: the
    configured decay); returns (loss, grad norm) as device tensors (no host sync). `weight` scales this process's
    loss so that DDP's gradient average is the global batch's mean when the shards are uneven."""
    for g in p.opt.param_groups:
        g["lr"] = lr
    if p.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp_dtype = runtime.amp_dtype(p.precision)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = ddpm.loss(p.schedule, p.net, x, t=t, noise=noise, snr_gamma=p.snr_gamma)
    p.opt.zero_grad(set_to_none=True)
    p.scaler.scale(loss * weight).backward()
    p.scaler.unscale_(p.opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(p.model.parameters(), p.grad_clip or math.inf, foreach=True)
    p.scaler.step(p.opt)
    p.scaler.update()
    ema_update(p.ema, p.model, p.ema_decay if ema_decay is None else ema_decay)
    return loss.detach(), grad_norm


# ---------------------------------------------------------------- the state a checkpoint holds

class Meter:
    """On-device sums, read at the syncs only: the epoch's loss (history.csv: the mean over the epoch's images, so
    a partial last batch counts by its images), the log window's loss and steps (train/loss: the mean of the steps'
    means), and the first step whose loss or gradient was not finite. Throughput is timed on the host."""

    def __init__(self, device: torch.device, *, overflow_ok: bool = False):
        self.epoch = torch.zeros((), device=device)  # Σ loss × rows over this process's images of the epoch
        self.epoch_images = 0  # the images of the epoch's steps, all processes
        self.window = torch.zeros((), device=device)
        self.window_steps, self.window_images, self.window_start = 0, 0, time.perf_counter()
        self.bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.overflow_ok = overflow_ok  # fp16: an inf gradient only makes the scaler skip the step

    def add(self, step: int, loss: Tensor, grad_norm: Tensor, *, rows: int, batch: int) -> None:
        """Step `step` (0-based) took `rows` of a batch of `batch` images on this process."""
        finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | self.overflow_ok)
        self.bad_step = torch.where((self.bad_step < 0) & ~finite, step, self.bad_step)
        self.epoch += loss * rows
        self.epoch_images += batch
        self.window += loss * rows / batch
        self.window_steps += 1
        self.window_images += batch

    def first_bad_step(self, dist: Dist) -> int | None:
        """The first step (0-based) with a non-finite loss or gradient on any process, or None. A host sync."""
        never = torch.iinfo(torch.long).max
        first = int(dist.all_reduce(torch.where(self.bad_step < 0, never, self.bad_step), "min"))
        return None if first == never else first

    def read_window(self, dist: Dist) -> tuple[float, float]:
        """(mean loss over the processes and steps of the window, images/s), and a new window. A host sync."""
        now = time.perf_counter()
        loss = float(dist.all_reduce(self.window)) / self.window_steps
        rate = self.window_images / (now - self.window_start)
        self.window.zero_()
        self.window_steps, self.window_images, self.window_start = 0, 0, now
        return loss, rate

    def read_epoch(self, dist: Dist) -> float:
        """The epoch's mean loss over its images and all processes; the next epoch starts from 0. A host sync."""
        loss = float(dist.all_reduce(self.epoch)) / max(self.epoch_images, 1)
        self.epoch.zero_()
        self.epoch_images = 0
        return loss

    def state_dict(self) -> dict:
        return {"epoch": self.epoch.cpu(), "epoch_images": self.epoch_images, "log": self.window.cpu(),
                "log_n": self.window_steps}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_images = state["epoch_images"]
        self.epoch = state["epoch"].to(self.epoch.device, copy=True)
        self.window = state["log"].to(self.window.device, copy=True)
        self.window_steps = state["log_n"]


@dataclass
class TrainState:
    """Everything a checkpoint holds. `snapshot()` and `restore()` below are the one list of it, side by side;
    `identity` (config, model_args, device_type, data_id) is written for the checks a resume makes in
    `prepare()` and for sample.py, and is not restored."""
    parts: Parts
    batches: data.BatchIterator
    noise: torch.Generator  # t and ε of Algorithm 1
    meter: Meter
    identity: dict
    step: int = 0
    history: list[dict] = field(default_factory=list)
    wall_before: float = 0.0  # seconds trained by earlier processes of this run
    wandb_id: str | None = None
    started: float = field(default_factory=time.perf_counter)

    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def snapshot(self) -> dict:
        p, device = self.parts, self.noise.device
        return {"model": p.model.state_dict(), "ema": p.ema.state_dict(), "optimizer": p.opt.state_dict(),
                "scaler": p.scaler.state_dict(), "data": self.batches.state_dict(), "epoch": self.batches.epoch,
                "rng": {"torch": torch.get_rng_state(), "noise": self.noise.get_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0)},
                "sums": self.meter.state_dict(), "step": self.step, "history": self.history,
                "wall_time_s": self.wall_time(), "wandb_id": self.wandb_id, **self.identity}

    def restore(self, saved: dict) -> None:
        """Continue exactly where the state that wrote `saved` was ("epoch" is the data iterator's own). A
        checkpoint that lacks what snapshot() writes, or does not fit the model, is a CheckpointError."""
        missing = self.snapshot().keys() - saved.keys() - {"data_id"}  # data_id: not recorded by early versions
        if missing:
            raise CheckpointError(f"checkpoint lacks {sorted(missing)}")
        p = self.parts
        try:
            p.model.load_state_dict(saved["model"])
            p.ema.load_state_dict(saved["ema"])
            p.opt.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            reason = " ".join(str(e).split())[:200]  # the first line alone is just "Error(s) in loading state_dict"
            raise CheckpointError(f"does not fit this model ({reason})") from None
        p.scaler.load_state_dict(saved["scaler"])
        self.batches.load_state_dict(saved["data"])
        torch.set_rng_state(saved["rng"]["torch"])
        self.noise.set_state(saved["rng"]["noise"])
        if self.noise.device.type == "cuda":
            torch.cuda.set_rng_state(saved["rng"]["cuda"], self.noise.device)
        sums = saved["sums"]
        if "epoch_images" not in sums:  # written when the sum was of step means, each from a full batch
            batch, done = self.batches.batch_size, self.batches.index
            sums = {**sums, "epoch": sums["epoch"] * batch, "epoch_images": done * batch}
        self.meter.load_state_dict(sums)
        self.step, self.history = saved["step"], list(saved["history"])
        self.wall_before, self.wandb_id = saved["wall_time_s"], saved["wandb_id"]


class Checkpointer:
    """Writes state.snapshot() to `path` (rank 0), never with a non-finite loss behind it, and remembers the step
    of the checkpoint on disk for the error messages."""

    def __init__(self, path: Path, dist: Dist, step: int | None):
        self.path, self.dist, self.step = path, dist, step

    def kept(self) -> str:
        return f"; {self.path} (step {self.step}) is kept" if self.step is not None else ""

    def check_finite(self, state: TrainState) -> None:
        """TrainError if a loss or gradient was not finite since the start. A host sync, on every process."""
        bad = state.meter.first_bad_step(self.dist)
        if bad is not None:
            raise TrainError(f"non-finite loss or gradient at step {bad + 1}{self.kept()}; "
                             f"lower train.lr, enable train.grad_clip, or use precision fp32")

    def save(self, state: TrainState) -> None:
        """Rank 0 writes; then every process learns whether it could (a collective, as the stop signal is), so
        that a failed write ends all of them at once with the same error, none left waiting in the next step."""
        self.check_finite(state)
        reason = ""
        if self.dist.main:
            try:
                save_checkpoint(self.path, state.snapshot())
            except OSError as e:
                reason = str(e.strerror or e)
        if self.dist.agree(bool(reason)):
            raise TrainError(f"could not write {self.path} ({reason or 'on rank 0: see its error'}){self.kept()}")
        self.step = state.step


# ---------------------------------------------------------------- set-up: every check before anything is written

def config_diff(saved: dict, current: dict) -> list[str]:
    """Result-affecting keys whose values differ between a checkpoint's config and this run's. A key that the
    checkpoint's config lacks (it was written before the key existed) counts as its default."""
    try:
        saved = to_dict(from_dict(saved))
    except ConfigError:
        pass  # compared as it is: every key that differs is named
    a, b = flatten(saved), flatten(current)
    keep = resumable_keys(from_dict(current))
    return sorted(k for k in a.keys() | b.keys() if k not in keep and a.get(k) != b.get(k))


def check_writable(out: Path) -> None:
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir: {out} cannot be written ({parent} is not a writable folder)")


def start_processes(cfg: Config) -> tuple[Dist, torch.device]:
    """This process's place in a torchrun launch and its device, checked (batch split, device, precision) before
    the process group is set up, so that a refusal leaves no process waiting in it."""
    dist = Dist.from_env()
    if cfg.train.batch_size % dist.world:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the {dist.world} processes")
    try:
        device = runtime.resolve_device(dist.device_spec(cfg.device))
    except ValueError as e:
        raise ConfigError(f"device: {e} (use device=cpu)") from None
    try:
        runtime.resolve_precision(cfg.train.precision, device)
    except ValueError as e:
        raise ConfigError(f"train.precision: {e}") from None
    runtime.setup_dist(dist, device)
    return dist, device


def load_images(cfg: Config, dist: Dist) -> tuple[Tensor, Path]:
    """The training images (N, C, H, W) uint8, prepared by rank 0 if they are not yet, and their folder."""
    if dist.main:
        data.ensure_prepared(cfg.data)
    dist.barrier()
    data_dir = Path("data") / cfg.data.dataset
    images = data.load_dataset(data_dir, cfg.data.subset, crop=cfg.data.crop)
    batch = cfg.train.batch_size
    if len(images) < batch:
        raise ConfigError(f"data.subset: {len(images)} images are fewer than train.batch_size {batch}")
    if 0 < len(images) % batch < dist.world:
        raise ConfigError(f"data.subset: the last batch of {len(images) % batch} images cannot be split "
                          f"over {dist.world} processes")
    return images, data_dir


def read_checkpoint(path: Path, cfg: Config, device: torch.device, data_dir: Path) -> dict:
    """The checkpoint to resume from, if it was written with the same result-affecting settings, on the same kind
    of device and from the same data."""
    saved = load_checkpoint(path)
    diff = config_diff(saved["config"], to_dict(cfg))
    if diff:
        raise ConfigError(f"{path} was written with different settings for {', '.join(diff)}: "
                          f"pass --fresh to start over, or use another out_dir")
    written_on = saved.get("device_type", "an unknown device")
    if written_on != device.type:
        raise ConfigError(f"device: {path} was written on {written_on}, this run is on {device.type}; "
                          f"random streams differ, so resume on {written_on} or --fresh")
    if saved.get("data_id") not in (None, data.dataset_id(data_dir)):  # None: written before it was recorded
        raise ConfigError(f"data: {path} was trained on another dataset ({data_dir / 'meta.json'} is not "
                          f"the one it recorded): pass --fresh to start over, or use another out_dir")
    return saved


def unet_args(cfg: Config, image_shape: tuple[int, ...], saved: dict | None) -> dict:
    """The UNet's constructor arguments for images (C, H, W): the paper's layout (GroupNorm eps 1e-6, TF SAME
    downsampling), or a resumed checkpoint's (legacy if written before the layout was recorded)."""
    m = cfg.model
    args = dict(in_channels=image_shape[0], channels=m.channels, channel_mult=list(m.channel_mult),
                num_res_blocks=m.num_res_blocks, attn_resolutions=list(m.attn_resolutions), dropout=m.dropout,
                image_size=image_shape[-1], norm_eps=1e-6, downsample_padding="tf_same", norm_groups=m.norm_groups)
    if saved is not None:
        layout = checkpoint_model_args(saved)
        args.update(norm_eps=layout["norm_eps"], downsample_padding=layout["downsample_padding"])
    return args


def fid_scorer(cfg: Config, device: torch.device, dist: Dist, progress: bool) -> Callable | None:
    """FID during training (eval.every_epochs), on rank 0: a function (EMA model, seed) -> scores, its feature
    network and reference statistics made (and cached in data/fid_stats) now."""
    if not cfg.eval.every_epochs or not dist.main:
        return None
    from evaluate import EvalError, training_scorer
    try:
        return training_scorer(cfg, device, progress=progress)
    except EvalError as e:
        raise ConfigError(f"eval.every_epochs (set 0 to train without it): {e}") from None


@dataclass(frozen=True)
class Setup:
    """What the loop reads and does not advance: the checked settings, where it runs, the held-out batch (EMA
    loss), the FID scorer and the checkpointer."""
    cfg: Config
    dist: Dist
    device: torch.device
    out: Path
    held: tuple[Tensor, Tensor, Tensor]  # x0, t, ε: the same every epoch, so the EMA loss compares across epochs
    scorer: Callable | None
    ckpt: Checkpointer
    total: int  # the run's optimizer steps (train.epochs, train.max_steps): where a decaying lr ends

    def lr(self, step: int) -> float:
        tc = self.cfg.train
        return lr_at(step, tc.lr, tc.warmup_steps, schedule=tc.lr_schedule, total_steps=self.total, min_lr=tc.min_lr)

    def ema_decay(self, step: int) -> float:
        tc = self.cfg.train
        return ema_decay_at(step, tc.ema_decay, warmup=tc.ema_warmup, inv_gamma=tc.ema_inv_gamma, power=tc.ema_power)


def prepare(cfg: Config, *, fresh: bool = False, progress: bool = True) -> tuple[Setup, TrainState]:
    """Every check a run makes, before it writes anything (but the prepared dataset): device and precision,
    out_dir, the data, an existing checkpoint (readable, same settings, device type and data, fits the model), the
    FID scorer's pieces; then the model, built and resumed. Raises ConfigError, CheckpointError, data.DataError."""
    dist, device = start_processes(cfg)
    out = Path(cfg.out_dir)
    check_writable(out)
    images, data_dir = load_images(cfg, dist)
    path = out / "checkpoint.pt"
    saved = read_checkpoint(path, cfg, device, data_dir) if path.exists() and not fresh else None
    # Before build() seeds the model: the Fashion-MNIST feature classifier, when it is trained now, reseeds torch.
    scorer = fid_scorer(cfg, device, dist, progress)
    args = unet_args(cfg, tuple(images.shape[1:]), saved)
    parts = build(cfg, args, device, dist)
    identity = {"config": to_dict(cfg), "model_args": args, "device_type": device.type,
                "data_id": data.dataset_id(data_dir)}
    state = TrainState(parts, data.BatchIterator(images, cfg.train.batch_size, seed=derive_seed(cfg.seed, 1),
                                                 device=device, random_flip=cfg.data.random_flip),
                       torch.Generator(device).manual_seed(derive_seed(cfg.seed, 2)),
                       Meter(device, overflow_ok=parts.precision == "fp16"), identity)
    if saved is not None:
        try:
            state.restore(saved)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}; pass --fresh to start over") from None
    held = ddpm.from_uint8(data.load_dataset(data_dir / "test.npy", crop=cfg.data.crop)[:256]).to(device)
    held_t, held_noise = ddpm.draw_t_noise(parts.schedule, held.shape, device=device,
                                           generator=torch.Generator(device).manual_seed(derive_seed(cfg.seed, 4)))
    ckpt = Checkpointer(path, dist, saved["step"] if saved else None)
    return Setup(cfg, dist, device, out, (held, held_t, held_noise), scorer, ckpt,
                 total_steps(cfg, len(state.batches))), state


def create_outputs(out: Path, *, fresh: bool, cfg: Config) -> None:
    """Rank 0's first writes: --fresh removes the old outputs; config.resolved.yaml; samples/ (a DVC out, even when
    no grid is due); no temporary files left by a run killed mid-write."""
    try:
        if fresh:
            for name in OUTPUTS:
                shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
        atomic_write(out / "config.resolved.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
        (out / "samples").mkdir(exist_ok=True)
        for folder in (out, out / "samples"):
            remove_stale_temps(folder)
    except OSError as e:  # e.g. the disk is already full
        raise TrainError(f"cannot write to {out} ({e.strerror or e})") from None


# ---------------------------------------------------------------- logging and stopping

class Logger:
    """Scalars and images (uint8 (N, C, H, W) tensors, drawn as a grid) to a wandb run. Logger() has none and does
    nothing, as on ranks other than 0 and with wandb.mode disabled: the loop logs unconditionally."""

    def __init__(self, run=None):
        self.run = run

    @property
    def id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, values: dict, step: int) -> None:
        if self.run is None:
            return
        import wandb
        self.run.log({k: wandb.Image(image_grid(v).numpy()) if isinstance(v, Tensor) and v.dtype == torch.uint8
                      else v for k, v in values.items()}, step=step)

    def finish(self, exit_code: int) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)


def open_logger(cfg: Config, out: Path, *, main: bool, config_path: str | None, run_id: str | None) -> Logger:
    """A wandb run for rank 0 (continuing `run_id` on a resume); a do-nothing Logger when wandb.mode is disabled or
    on other ranks. wandb is imported only when on."""
    mode = cfg.wandb.mode
    if mode == "disabled" or not main:
        return Logger()
    import wandb
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb() else "offline"
    # An absolute dir: wandb's service process keeps the cwd of the first run, and resolves relative paths there.
    run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, config=to_dict(cfg), dir=str(out.resolve()),
                     mode=mode, id=run_id, resume="allow" if run_id else None,
                     settings=wandb.Settings(save_code=False, disable_git=True, silent=True))
    if run_id is None:  # log the config once per run: the file given and the resolved one
        artifact = wandb.Artifact(f"config-{run.id}", type="config")
        if config_path and Path(config_path).is_file():
            artifact.add_file(config_path, name="config.yaml")
        artifact.add_file(str(out / "config.resolved.yaml"), name="config.resolved.yaml")
        run.log_artifact(artifact)
    return Logger(run)


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class Stop:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit 128 + signal. A second signal exits at once.
    A context manager: the previous handlers are back on leaving it."""

    def __enter__(self) -> Stop:
        self.signum = 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum: int, frame) -> None:
        if self.signum:
            os._exit(128 + signum)
        self.signum = signum
        from tqdm import tqdm  # its write() clears the progress bar first, so the message is not left next to it
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step and writing a checkpoint (again to quit at "
                   f"once)", file=sys.stderr)

    def agreed(self, dist: Dist, at_sync: bool) -> int:
        """The signal to stop for now, 0 for none. One process stops after the step the signal came in; processes
        of a torchrun launch stop together, at a sync, for the largest signal any of them received: a signal that
        reaches them at different steps cannot leave one saving and exiting while another waits in a collective."""
        if dist.world == 1:
            return self.signum
        return dist.agree(self.signum) if at_sync else 0


# ---------------------------------------------------------------- the loop

def run_epochs(setup: Setup, state: TrainState, logger: Logger, stop: Stop, *, progress: bool = True) -> None:
    """Algorithm 1, epoch by epoch: draw a batch, its timesteps and noise; take this process's shard; step; meter;
    at the sync every wandb.log_every steps check, log and agree on stopping; checkpoint; end the epoch."""
    cfg, dist, p = setup.cfg, setup.dist, state.parts
    for epoch in range(state.batches.epoch, cfg.train.epochs):
        if state.step >= setup.total:  # train.max_steps reached (by this run, or by the one it resumes)
            break
        p.model.train()
        images, started = 0, time.perf_counter()  # this process's part of the epoch: its training throughput
        with progress_bar(total=len(state.batches), initial=state.batches.index, unit="step", leave=False,
                          desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not (progress and dist.main)) as bar:
            for x in state.batches.epoch_batches():
                B = x.shape[0]
                t, noise = ddpm.draw_t_noise(p.schedule, x.shape, generator=state.noise, device=setup.device)
                x, t, noise = (v.tensor_split(dist.world)[dist.rank] for v in (x, t, noise))
                if state.step == 0:
                    logger.log({"inputs": ddpm.to_uint8(x[:64])}, step=0)
                torch.manual_seed(dropout_seed(cfg.seed, state.step, dist))
                lr = setup.lr(state.step)
                loss, grad_norm = train_step(p, x, t, noise, lr=lr, weight=x.shape[0] * dist.world / B,
                                             ema_decay=setup.ema_decay(state.step))
                state.meter.add(state.step, loss, grad_norm, rows=x.shape[0], batch=B)
                state.step, images = state.step + 1, images + B
                bar.update(1)
                at_sync = state.step % cfg.wandb.log_every == 0  # the only host-device sync of the loop
                if at_sync:
                    log_window(setup, state, logger, bar, lr=lr, grad_norm=grad_norm)
                if state.step % cfg.train.checkpoint_every == 0:
                    setup.ckpt.save(state)
                signum = stop.agreed(dist, at_sync)
                if signum:
                    setup.ckpt.save(state)
                    dist.barrier()  # none exits (torchrun then ends the others) before the checkpoint is written
                    raise SystemExit(128 + signum)
                if state.step >= setup.total and state.batches.index < len(state.batches):
                    break  # train.max_steps, mid-epoch: that epoch's row is written now, as a partial epoch
        setup.ckpt.check_finite(state)  # before a NaN reaches history.csv, metrics.json or a sample grid
        # (a host sync: the device has finished the epoch's steps, so the time below is theirs)
        end_epoch(setup, state, logger, images_per_sec=images / max(time.perf_counter() - started, 1e-9))
        setup.ckpt.save(state)


def log_window(setup: Setup, state: TrainState, logger: Logger, bar, *, lr: float, grad_norm: Tensor) -> None:
    """At a sync: stop on a non-finite loss, then the window's mean loss, lr, grad norm and throughput."""
    setup.ckpt.check_finite(state)
    loss, rate = state.meter.read_window(setup.dist)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
    logger.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": float(grad_norm),
                "train/images_per_sec": rate}, step=state.step)


def end_epoch(setup: Setup, state: TrainState, logger: Logger, *, images_per_sec: float) -> None:
    """The epoch's row (mean loss, EMA loss on the held-out batch, lr, the training throughput `images_per_sec`:
    steps and checkpoints, no grids or FIDs) on every process; on rank 0 the sample grid and the FID when due
    (every sample.every_epochs / eval.every_epochs, and at the last epoch), wandb, history.csv and metrics.json."""
    n = state.batches.epoch + (state.batches.index > 0)  # a partial epoch (train.max_steps) counts
    cfg, step, wall, last = setup.cfg, state.step, state.wall_time(), state.step >= setup.total
    with torch.no_grad():
        ema_loss = float(ddpm.loss(state.parts.schedule, state.parts.ema, setup.held[0], t=setup.held[1],
                                   noise=setup.held[2]))
    row = {"epoch": n, "step": step, "loss": state.meter.read_epoch(setup.dist), "ema_loss": ema_loss,
           "lr": setup.lr(step - 1),
           "images_per_sec": round(images_per_sec, 2), "wall_time_s": round(wall, 3)}
    state.history.append(row)
    if not setup.dist.main:
        return
    logs = {"epoch/loss": row["loss"], "epoch/ema_loss": ema_loss, "epoch": n}
    if _due(cfg.sample.every_epochs, n, last):
        s = cfg.sample  # the same noise every epoch, so that the grids show the model's progress
        images = generate(state.parts.ema, state.parts.schedule, s.num_images, s.sampling,
                          seed=derive_seed(cfg.seed, 3), inference=Inference(setup.device))
        save_grid(images, setup.out / "samples" / f"epoch_{n:03d}.png")
        logs["samples"] = images
    if setup.scorer is not None and _due(cfg.eval.every_epochs, n, last):
        t0 = time.perf_counter()
        scores = setup.scorer(state.parts.ema, derive_seed(cfg.seed, 5))  # the same noise: FID moves with the model
        row.update(fid=round(scores["fid"], 4), fid_time_s=round(time.perf_counter() - t0, 1))
        if "class_coverage" in scores:
            row["class_coverage"] = round(scores["class_coverage"], 4)
        logs.update({f"eval/{k}": row[k] for k in ("fid", "class_coverage") if k in row})
    logger.log(logs, step=step)
    write_records(setup.out, state.history)


def _due(every: int, epoch: int, last: bool) -> bool:
    return bool(every) and (epoch % every == 0 or last)


def write_records(out: Path, history: list[dict]) -> None:
    """history.csv (every epoch) and metrics.json (the last epoch, with the last FID measured)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(out / "history.csv", buf.getvalue().encode())
    row, measured = history[-1], [r for r in history if r.get("fid") is not None]
    write_json(out / "metrics.json", {**{k: row[k] for k in ("loss", "ema_loss", "step", "epoch", "images_per_sec",
                                                              "wall_time_s")},
                                      **({"fid": measured[-1]["fid"], "fid_epoch": measured[-1]["epoch"]}
                                         if measured else {})})


# ---------------------------------------------------------------- the function and the command

def train(cfg: Config, *, config_path: str | None = None, fresh: bool = False, progress: bool = True) -> dict:
    """Train from `cfg`; returns the final metrics. Raises ConfigError, CheckpointError, data.DataError
    (bad input, nothing created) or TrainError (a failure during training)."""
    setup, state = prepare(cfg, fresh=fresh, progress=progress)  # every check: from here on the run creates things
    if setup.dist.main:
        create_outputs(setup.out, fresh=fresh, cfg=cfg)
    logger = open_logger(cfg, setup.out, main=setup.dist.main, config_path=config_path, run_id=state.wandb_id)
    state.wandb_id = logger.id
    with Stop() as stop:
        state.started = state.meter.window_start = time.perf_counter()
        try:
            run_epochs(setup, state, logger, stop, progress=progress)
        except SystemExit as e:
            logger.finish(int(e.code or 0))
            raise
        except OSError as e:  # history.csv, metrics.json or a grid could not be written (disk full, ...)
            logger.finish(1)
            raise TrainError(f"could not write to {setup.out} ({e.strerror or e}){setup.ckpt.kept()}") from None
        except BaseException:
            logger.finish(1)
            raise
    logger.finish(0)
    setup.dist.barrier()
    setup.dist.close()
    return state.history[-1] if state.history else {}


def main(argv: list[str] | None = None) -> None:
    def extra(p):
        p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    cfg, args = cli(__doc__.splitlines()[0], argv, extra)
    try:
        metrics = train(cfg, config_path=args.config, fresh=args.fresh)
    except (ConfigError, CheckpointError, data.DataError) as e:
        fail(str(e), 2)
    except TrainError as e:
        fail(str(e), 1)
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handler is installed: nothing was trained yet
        fail("interrupted before training started; run the same command again", 130)
    if metrics:
        print(f"done: epoch {metrics['epoch']}, step {metrics['step']}, loss {metrics['loss']:.4f}, "
              f"EMA loss {metrics['ema_loss']:.4f}, {metrics['images_per_sec']:.1f} images/s -> {cfg.out_dir}")


if __name__ == "__main__":
    main()
