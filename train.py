"""Train DDPM (Algorithm 1) from one YAML file:

    python train.py --config config.yaml [key.sub=value ...] [--fresh]
    torchrun --nproc_per_node=N train.py --config config.yaml        # DistributedDataParallel

Running the same command again resumes from `<out_dir>/checkpoint.pt`, bitwise identical (CPU) to a run
that was never interrupted. `train(config)` is the function; `main()` only parses arguments.
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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
import yaml
from torch import Tensor

import data
import ddpm
from checkpoint import model_args as checkpoint_model_args
from checkpoint import (CheckpointError, atomic_write, image_grid, load_checkpoint, remove_stale_temps,
                        save_checkpoint, save_grid, write_json)
from config import Config, ConfigError, cli, fail, flatten, from_dict, resumable_keys, to_dict
from sample import generate, resolve_precision, schedule_from_config
from sample import resolve_device as resolve_device_spec
from unet import UNet

HISTORY_FIELDS = ["epoch", "step", "loss", "ema_loss", "lr", "images_per_sec", "wall_time_s", "fid", "class_coverage",
                  "fid_time_s"]  # the last three only in epochs with eval.every_epochs


class TrainError(Exception):
    """A failure during training (non-finite loss, disk full); one line, exit status 1."""


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup (paper, Appendix B) over the first `warmup_steps` steps, then constant."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, in one fused foreach op."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def train_step(net: torch.nn.Module, model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, schedule: ddpm.Schedule, x: Tensor, t: Tensor, noise: Tensor, *,
               lr: float, grad_clip: float | None, ema_decay: float, amp_dtype: torch.dtype | None = None,
               weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """One optimizer step of Algorithm 1 on (x, t, noise); returns (loss, grad norm) as device tensors
    (no host sync). `net` is `model` or its compiled / DDP wrapper; `weight` scales this process's loss
    so DDP's gradient average equals the global batch's mean when shards are uneven."""
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = ddpm.loss(schedule, net, x, t=t, noise=noise)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss * weight).backward()
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf, foreach=True)
    scaler.step(opt)
    scaler.update()
    ema_update(ema, model, ema_decay)
    return loss.detach(), grad_norm


def derive_seed(seed: int, stream: int, index: int = 0) -> int:
    """Independent seeds for the run's random streams (0 init/dropout, 1 data, 2 noise, 3 samples, 4 eval)."""
    return (seed * 1_000_003 + stream * 10_007 + index) % 2**63


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(cfg: Config, dist: Dist) -> torch.device:
    """The training device (one per local rank under torchrun), checked before anything is created."""
    spec = cfg.device
    if dist.world > 1 and spec != "cpu" and (spec != "auto" or torch.cuda.is_available()):
        spec = f"cuda:{dist.local_rank}"
    try:
        device = resolve_device_spec(spec)
    except ValueError as e:
        raise ConfigError(f"device: {e} (use device=cpu)") from None
    p = cfg.train.precision
    if p == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA device (use fp32 or bf16)")
    if p == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision: bf16 is not supported on {torch.cuda.get_device_name(device)}")
    return device


def setup_dist(cfg: Config) -> Dist:
    """A process group when launched by torchrun (its WORLD_SIZE > 1), else none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the {world} processes")
    d = Dist(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))
    device = resolve_device(cfg, d)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d


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


class Stop:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit 128 + signal. A second signal exits at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame) -> None:
        if self.signum:
            os._exit(128 + signum)
        self.signum = signum
        from tqdm import tqdm  # its write() clears the progress bar first, so the message is not left next to it
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step and writing a checkpoint (again to quit at "
                   f"once)", file=sys.stderr)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def init_wandb(cfg: Config, out: Path, config_path: str | None, run_id: str | None):
    """A wandb run for rank 0, or None when wandb.mode is disabled. wandb is imported only when on."""
    mode = cfg.wandb.mode
    if mode == "disabled":
        return None
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
    return run


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_image(images: Tensor):
    import wandb
    return wandb.Image(image_grid(images).numpy())


def train(cfg: Config, *, config_path: str | None = None, fresh: bool = False, progress: bool = True) -> dict:
    """Train from `cfg`; returns the final metrics. Raises ConfigError, CheckpointError, data.DataError
    (bad input, nothing created) or TrainError (a failure during training)."""
    dist = setup_dist(cfg)
    device = resolve_device(cfg, dist)
    out, tc = Path(cfg.out_dir), cfg.train
    ckpt_path = out / "checkpoint.pt"
    check_writable(out)
    if dist.main:
        data_dir = data.ensure_prepared(cfg.data)
    if dist.world > 1:
        torch_dist.barrier()
    data_dir = Path("data") / cfg.data.dataset
    images = data.load_dataset(data_dir, cfg.data.subset)
    data_id = data.dataset_id(data_dir)
    if len(images) < tc.batch_size:
        raise ConfigError(f"data.subset: {len(images)} images are fewer than train.batch_size {tc.batch_size}")
    if 0 < len(images) % tc.batch_size < dist.world:
        raise ConfigError(f"data.subset: the last batch of {len(images) % tc.batch_size} images cannot be split "
                          f"over {dist.world} processes")
    state = None
    if ckpt_path.exists() and not fresh:
        state = load_checkpoint(ckpt_path)
        diff = config_diff(state["config"], to_dict(cfg))
        if diff:
            raise ConfigError(f"{ckpt_path} was written with different settings for {', '.join(diff)}: "
                              f"pass --fresh to start over, or use another out_dir")
        if state["device_type"] != device.type:
            raise ConfigError(f"device: {ckpt_path} was written on {state['device_type']}, this run is on "
                              f"{device.type}; random streams differ, so resume on {state['device_type']} or --fresh")
        if state.get("data_id") not in (None, data_id):  # None: a checkpoint from before it was recorded
            raise ConfigError(f"data: {ckpt_path} was trained on another dataset ({data_dir / 'meta.json'} is not "
                              f"the one it recorded): pass --fresh to start over, or use another out_dir")

    torch.manual_seed(derive_seed(cfg.seed, 0))
    model_args = dict(in_channels=images.shape[1], channels=cfg.model.channels,
                      channel_mult=list(cfg.model.channel_mult), num_res_blocks=cfg.model.num_res_blocks,
                      attn_resolutions=list(cfg.model.attn_resolutions), dropout=cfg.model.dropout,
                      image_size=images.shape[-1], norm_eps=1e-6, downsample_padding="tf_same")  # the paper's layout
    if state is not None:  # resume in the layout it was trained with (legacy if written before it was recorded)
        saved = checkpoint_model_args(state)
        model_args.update(norm_eps=saved["norm_eps"], downsample_padding=saved["downsample_padding"])
    try:
        model = UNet(**model_args).to(device)
    except (RuntimeError, MemoryError) as e:  # e.g. model.channels=2**40: more weights than memory (or int64) holds
        raise ConfigError(f"model: cannot build this UNet on {device} ({' '.join(str(e).split())[:160]})") from None
    scorer = None  # FID during training; its feature network and reference statistics are cached in data/fid_stats
    if cfg.eval.every_epochs and dist.main:
        from evaluate import EvalError, training_scorer
        try:
            scorer = training_scorer(cfg, device, progress=progress)
        except EvalError as e:
            raise ConfigError(f"eval.every_epochs (set 0 to train without it): {e}") from None

    # Everything is checked: from here on the run creates things.
    if dist.main:
        try:
            if fresh:
                for name in ("checkpoint.pt", "metrics.json", "history.csv", "samples"):
                    shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
            atomic_write(out / "config.resolved.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
            (out / "samples").mkdir(exist_ok=True)  # a DVC out, even when no grid is due
            for folder in (out, out / "samples"):
                remove_stale_temps(folder)  # left by a run killed mid-write
        except OSError as e:  # e.g. the disk is already full
            raise TrainError(f"cannot write to {out} ({e.strerror or e})") from None

    ema = copy.deepcopy(model).eval().requires_grad_(False)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if tc.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, **fast)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay,
                              foreach=True)
    precision = resolve_precision(tc.precision, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    it = data.BatchIterator(images, tc.batch_size, seed=derive_seed(cfg.seed, 1), device=device,
                            random_flip=cfg.data.random_flip)
    gen = torch.Generator(device).manual_seed(derive_seed(cfg.seed, 2))
    step, history, wall, run_id = 0, [], 0.0, None
    sums = {"epoch": torch.zeros((), device=device), "log": torch.zeros((), device=device), "log_n": 0}
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            reason = " ".join(str(e).split())[:200]  # the first line alone is just "Error(s) in loading state_dict"
            raise CheckpointError(f"{ckpt_path}: does not fit this model ({reason}); pass --fresh to start over") \
                from None
        scaler.load_state_dict(state["scaler"])
        it.load_state_dict(state["data"])
        gen.set_state(state["rng"]["noise"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        step, history, wall, run_id = state["step"], state["history"], state["wall_time_s"], state["wandb_id"]
        sums = {"epoch": state["sums"]["epoch"].to(device), "log": state["sums"]["log"].to(device),
                "log_n": state["sums"]["log_n"]}

    # channels_last pays on CUDA and with bf16 on the CPU (oneDNN); the EMA copy follows, so its lerp is layout-aligned.
    channels_last = tc.channels_last is True or (tc.channels_last == "auto" and
                                                 (device.type == "cuda" or amp_dtype == torch.bfloat16))
    if channels_last:
        model.to(memory_format=torch.channels_last)
        ema.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if tc.compile is True or (tc.compile == "auto" and device.type == "cuda"):
        net = torch.compile(net)
    schedule = schedule_from_config(to_dict(cfg)).to(device)

    # A fixed held-out batch, timesteps and noise for the EMA loss (comparable across epochs and runs).
    held = ddpm.from_uint8(data.load_dataset(data_dir / "test.npy")[:256]).to(device)
    held_t, held_noise = ddpm.draw_t_noise(schedule, held.shape, device=device,
                                           generator=torch.Generator(device).manual_seed(derive_seed(cfg.seed, 4)))

    run = init_wandb(cfg, out, config_path, run_id) if dist.main else None
    stop = Stop()
    bad_step = torch.full((), -1, device=device, dtype=torch.long)  # first non-finite step, checked at syncs
    last_ckpt = (ckpt_path, state["step"] if state else None)

    def kept() -> str:
        return f"; {ckpt_path} (step {last_ckpt[1]}) is kept" if last_ckpt[1] is not None else ""

    def check_finite() -> None:
        if int(bad_step) >= 0:
            raise TrainError(f"non-finite loss or gradient at step {int(bad_step) + 1}{kept()}; "
                             f"lower train.lr, enable train.grad_clip, or use precision fp32")

    def save() -> None:
        nonlocal last_ckpt
        check_finite()
        if not dist.main:
            return
        try:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "epoch": it.epoch, "data": it.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "noise": gen.get_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0)},
                "sums": {"epoch": sums["epoch"].cpu(), "log": sums["log"].cpu(), "log_n": sums["log_n"]},
                "config": to_dict(cfg), "model_args": model_args, "device_type": device.type, "data_id": data_id,
                "history": history,
                "wall_time_s": wall + time.perf_counter() - t_start, "wandb_id": run.id if run else None})
        except OSError as e:
            raise TrainError(f"could not write {ckpt_path} ({e.strerror or e}){kept()}") from None
        last_ckpt = (ckpt_path, step)

    def reduce(x: Tensor) -> Tensor:
        if dist.world > 1:
            x = x.clone()
            torch_dist.all_reduce(x)
        return x

    t_start = t_log = time.perf_counter()
    img_log, bar = 0, None
    try:
        for epoch in range(it.epoch, tc.epochs):
            model.train()
            bar = _bar(len(it), it.index, f"epoch {epoch + 1}/{tc.epochs}", progress and dist.main)
            for x in it.epoch_batches():
                B = x.shape[0]
                t_all, noise_all = ddpm.draw_t_noise(schedule, x.shape, generator=gen, device=device)
                x, t, noise = (v.tensor_split(dist.world)[dist.rank] for v in (x, t_all, noise_all))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if step == 0 and run is not None:
                    run.log({"inputs": wandb_image(ddpm.to_uint8(x[:64]))}, step=0)
                lr = lr_at(step, tc.lr, tc.warmup_steps)
                loss, grad_norm = train_step(net, model, ema, opt, scaler, schedule, x, t, noise, lr=lr,
                                             grad_clip=tc.grad_clip, ema_decay=tc.ema_decay, amp_dtype=amp_dtype,
                                             weight=x.shape[0] * dist.world / B)
                finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | (precision == "fp16"))
                bad_step = torch.where((bad_step < 0) & ~finite, step, bad_step)
                contrib = loss.detach() * x.shape[0] / B
                sums["epoch"] += contrib
                sums["log"] += contrib
                sums["log_n"] += 1
                step += 1
                img_log += B
                bar.update(1)
                if step % cfg.wandb.log_every == 0:  # the only host-device sync of the loop
                    check_finite()
                    now = time.perf_counter()
                    logs = {"train/loss": float(reduce(sums["log"])) / sums["log_n"], "train/lr": lr,
                            "train/grad_norm": float(grad_norm), "train/images_per_sec": img_log / (now - t_log)}
                    sums["log"].zero_(), sums.update(log_n=0)
                    t_log, img_log = now, 0
                    bar.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{logs['train/images_per_sec']:.0f}")
                    if run is not None:
                        run.log(logs, step=step)
                if step % tc.checkpoint_every == 0:
                    save()
                if stop.signum and (dist.world == 1 or step % cfg.wandb.log_every == 0):
                    save()
                    raise SystemExit(128 + stop.signum)
            bar.close()
            check_finite()  # before a NaN reaches history.csv, metrics.json or a sample grid
            end_epoch(cfg, epoch, step, sums, history, ema, schedule, held, held_t, held_noise, device, run, out,
                      wall + time.perf_counter() - t_start, reduce, dist, lr_at(step - 1, tc.lr, tc.warmup_steps),
                      scorer)
            sums["epoch"].zero_()
            save()
    except SystemExit as e:
        _finish(run, int(e.code or 0))
        raise
    except OSError as e:  # history.csv, metrics.json or a grid could not be written (disk full, ...)
        _finish(run, 1)
        raise TrainError(f"could not write to {out} ({e.strerror or e}){kept()}") from None
    except BaseException:
        _finish(run, 1)
        raise
    finally:
        stop.restore()
        if bar is not None:
            bar.close()  # clear a half-drawn progress bar before the error line or the exit
    metrics = history[-1] if history else {}
    _finish(run, 0)
    if dist.world > 1:
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    return metrics


def end_epoch(cfg, epoch, step, sums, history, ema, schedule, held, held_t, held_noise, device, run, out, wall,
              reduce, dist, lr, scorer=None) -> None:
    """Per-epoch metrics, the EMA loss on the held-out batch, the sample grid, the FID (`scorer`, every
    eval.every_epochs and at the last epoch), history.csv, metrics.json."""
    steps_in_epoch = step - (history[-1]["step"] if history else 0)
    with torch.no_grad():
        ema_loss = float(ddpm.loss(schedule, ema, held, t=held_t, noise=held_noise))
    row = {"epoch": epoch + 1, "step": step, "loss": float(reduce(sums["epoch"])) / max(steps_in_epoch, 1),
           "ema_loss": ema_loss, "lr": lr, "images_per_sec": 0.0, "wall_time_s": round(wall, 3)}
    row["images_per_sec"] = round(step * cfg.train.batch_size / max(wall, 1e-9), 2)
    history.append(row)
    if not dist.main:
        return
    logs = {"epoch/loss": row["loss"], "epoch/ema_loss": ema_loss, "epoch": epoch + 1}
    every = cfg.sample.every_epochs
    if every and ((epoch + 1) % every == 0 or epoch + 1 == cfg.train.epochs):
        sc = cfg.sample  # the same noise every epoch, so that the grids show the model's progress
        images = generate(ema, schedule, sc.num_images, steps=sc.steps, variance=sc.variance, clip=sc.clip,
                          sampler=sc.sampler, eta=sc.eta, spacing=sc.spacing, seed=derive_seed(cfg.seed, 3),
                          device=device, progress=False)
        save_grid(images, out / "samples" / f"epoch_{epoch + 1:03d}.png")
        if run is not None:
            logs["samples"] = wandb_image(images)
    every = cfg.eval.every_epochs
    if scorer is not None and ((epoch + 1) % every == 0 or epoch + 1 == cfg.train.epochs):
        t0 = time.perf_counter()
        scores = scorer(ema, derive_seed(cfg.seed, 5))  # the same noise every time: FID moves with the model only
        row.update(fid=round(scores["fid"], 4), fid_time_s=round(time.perf_counter() - t0, 1))
        if "class_coverage" in scores:
            row["class_coverage"] = round(scores["class_coverage"], 4)
        logs.update({f"eval/{k}": row[k] for k in ("fid", "class_coverage") if k in row})
    if run is not None:
        run.log(logs, step=step)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(out / "history.csv", buf.getvalue().encode())
    measured = [r for r in history if r.get("fid") is not None]
    write_json(out / "metrics.json", {"loss": row["loss"], "ema_loss": ema_loss, "step": step, "epoch": epoch + 1,
                                      "images_per_sec": row["images_per_sec"], "wall_time_s": row["wall_time_s"],
                                      **({"fid": measured[-1]["fid"], "fid_epoch": measured[-1]["epoch"]}
                                         if measured else {})})


def _bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, leave=False,
                dynamic_ncols=True)


def _finish(run, exit_code: int) -> None:
    if run is not None:
        run.finish(exit_code=exit_code)


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
