"""train.py end to end on a tiny UNet: the loss falls on real Fashion-MNIST images and on a synthetic CIFAR-format
dataset; every output file is well-formed; hyperparameters change what they should; one seed gives bitwise the same
weights, and a resumed run (after a clean stop, a crash mid-epoch, a crash at an epoch's end, or Ctrl-C) equals an
uninterrupted one; the offline wandb run holds the metrics, images, config and config artifact and no code;
sample.py rebuilds the model from a checkpoint alone; bad checkpoints and bad settings exit 2 and write nothing.

train.py reads data/<dataset> and writes runs/... in its working folder, so every run happens in its own tmp folder
with the datasets linked in."""
from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

import checkpoint
import config
import data
import ddpm
import sample
import train
import unet
from helpers import (TINY, UNET_ARGS, assert_equal_nested, assert_same_training, decode_png, flat_weights, grid_side,
                     initial_weights, link_datasets, one_error_line, read_wandb_log, run_cli, snapshot, tiny_config,
                     wandb_env, write_config, write_small_idx, write_synthetic_cifar)

CKPT_KEYS = {"model", "ema", "optimizer", "step", "epoch", "config", "model_args", "data_id"}
METRICS_KEYS = {"loss", "ema_loss", "step", "epoch", "images_per_sec", "wall_time_s"}
HISTORY_HEADER = "epoch,step,loss,ema_loss,lr,images_per_sec,wall_time_s,fid,class_coverage,fid_time_s"
N_IMAGES = TINY["data.subset"]  # 12 images in batches of 8: two steps per epoch, the second one partial
STEPS_PER_EPOCH = math.ceil(N_IMAGES / TINY["train.batch_size"])
REF = {"train.epochs": 3}  # the reference run that the determinism and resume tests compare against


# ---------------------------------------------------------------- datasets and runs

@pytest.fixture(scope="session")
def fmnist(tmp_path_factory) -> Path:
    """The first 64 training and 16 test images of the real Fashion-MNIST, through data.prepare (as a run would)."""
    names = [name for pair in data.FMNIST_FILES.values() for name in pair]
    if not all((data.FMNIST_DIR / f"{name}.gz").is_file() for name in names):
        pytest.skip(f"needs Fashion-MNIST in {data.FMNIST_DIR} ({data.FMNIST_HINT})")
    base = tmp_path_factory.mktemp("fmnist")
    counts = {n: 64 if n.startswith("train") else 16 for n in names}
    write_small_idx(data.FMNIST_DIR, base / "idx", counts)
    return data.prepare(config.Data(dataset="fashion-mnist", source=str(base / "idx")), out_root=base, progress=False)


@contextlib.contextmanager
def wandb_unimportable():
    """`import wandb` raises ImportError inside (sys.modules holds None for it), as if wandb were not installed."""
    missing = object()
    saved = sys.modules.get("wandb", missing)
    sys.modules["wandb"] = None
    try:
        yield
    finally:
        if saved is missing:
            del sys.modules["wandb"]
        else:
            sys.modules["wandb"] = saved


@dataclass
class Run:
    cfg: config.Config
    metrics: dict
    folder: Path

    @property
    def out(self) -> Path:
        return self.folder / self.cfg.out_dir

    @property
    def state(self) -> dict:
        return checkpoint.load_checkpoint(self.out / "checkpoint.pt")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cifar: Path):
    """tiny_run(**changes) -> Run of TINY + changes, each run once per module in its own folder. With
    wandb.mode disabled (TINY's) a run must never import wandb: here it cannot."""
    cache: dict[str, Run] = {}

    def run(**changes) -> Run:
        cfg = tiny_config(**changes)
        key = json.dumps(config.to_dict(cfg), sort_keys=True)
        if key not in cache:
            folder = tmp_path_factory.mktemp("run")
            link_datasets(folder, {"cifar10": cifar})
            with contextlib.chdir(folder), wandb_unimportable() if cfg.wandb.mode == "disabled" \
                    else contextlib.nullcontext():
                cache[key] = Run(cfg, train.train(cfg, progress=False), folder)
        return cache[key]
    return run


@pytest.fixture
def step_counter(monkeypatch) -> dict:
    """Counts the training steps executed (train.train_step calls) from now on: {"n": count}."""
    count, real = {"n": 0}, train.train_step

    def counted(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", counted)
    return count


def copy_run(run: Run, cwd: Path) -> Path:
    """Copy a finished run's out_dir into `cwd` (to continue it there); returns the copy."""
    dst = cwd / run.cfg.out_dir
    shutil.copytree(run.out, dst)
    return dst


def read_history(out: Path) -> list[dict]:
    text = (out / "history.csv").read_text()
    assert text.splitlines()[0] == HISTORY_HEADER
    # fid and friends are empty in epochs without a FID, whose rows (in the checkpoint too) do not have them
    return [{k: (int(v) if k in ("epoch", "step") else float(v)) for k, v in row.items() if v != ""}
            for row in csv.DictReader(text.splitlines())]


# ---------------------------------------------------------------- the loop's pure parts

def test_lr_warmup_is_linear_and_reaches_lr_at_warmup_steps() -> None:
    lr, warmup = 2e-4, 5000
    assert train.lr_at(0, lr, warmup) == pytest.approx(lr / warmup)  # the first step already learns
    assert train.lr_at(warmup // 2 - 1, lr, warmup) == pytest.approx(lr / 2)
    assert train.lr_at(warmup - 1, lr, warmup) == lr  # the warmup_steps-th step (0-indexed warmup - 1)
    assert train.lr_at(warmup, lr, warmup) == train.lr_at(10**9, lr, warmup) == lr
    assert train.lr_at(0, lr, 0) == lr


@given(lr=st.floats(1e-8, 10), warmup=st.integers(1, 10**6), step=st.integers(0, 2 * 10**6))
def test_lr_at_is_linear_then_constant(lr: float, warmup: int, step: int) -> None:
    value = train.lr_at(step, lr, warmup)
    if step + 1 >= warmup:
        assert value == lr
    else:
        assert 0 < value < lr
        assert value == pytest.approx(lr * (step + 1) / warmup, rel=1e-12)
        assert train.lr_at(step + 1, lr, warmup) - value == pytest.approx(lr / warmup, rel=1e-6)  # constant slope


@given(decay=st.floats(0, 0.9999), seed=st.integers(0, 2**32 - 1))
def test_ema_update_is_decay_times_ema_plus_rest_times_model(decay: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ema, model = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    with torch.no_grad():
        for p in (*ema.parameters(), *model.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen))
    old = [p.detach().clone() for p in ema.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    train.ema_update(ema, model, decay)
    for e, o, w, p in zip(ema.parameters(), old, weights, model.parameters()):
        expected = decay * o.double() + (1 - decay) * w.double()
        torch.testing.assert_close(e.double(), expected, rtol=0, atol=1e-6)
        assert torch.equal(p, w)  # the model is untouched
    if decay == 0:
        assert all(torch.equal(e, w) for e, w in zip(ema.parameters(), weights))


@given(lr=st.floats(1e-6, 1), frac=st.floats(0, 1), warmup=st.integers(0, 500), total=st.integers(1, 5000),
       schedule=st.sampled_from(["cosine", "linear"]))
def test_a_decaying_lr_falls_from_lr_after_the_warmup_to_min_lr_at_the_last_step(lr: float, frac: float, warmup: int,
                                                                                total: int, schedule: str) -> None:
    min_lr = lr * frac
    at = [train.lr_at(s, lr, warmup, schedule=schedule, total_steps=total, min_lr=min_lr) for s in range(total + 3)]
    for s in range(min(warmup, total)):
        assert at[s] == pytest.approx(lr * (s + 1) / warmup, rel=1e-12)  # the warmup is the constant schedule's
    after = at[warmup:]
    if not after:
        return
    assert all(b <= a * (1 + 1e-12) for a, b in zip(after, after[1:]))  # never rises
    assert all(min_lr * (1 - 1e-12) <= v <= lr * (1 + 1e-12) for v in after)
    if warmup < total - 1:  # (a run no longer than its warmup never decays)
        assert after[0] == pytest.approx(lr, rel=1e-12)
        assert at[total - 1] == pytest.approx(min_lr, rel=1e-9, abs=1e-15)
        assert at[-1] == at[total - 1]  # past the end it stays at min_lr


def test_cosine_and_linear_lr_at_known_points() -> None:
    lr, kw = 1e-3, dict(total_steps=101, min_lr=1e-4)  # warmup 0: decays over steps 0..100
    assert train.lr_at(50, lr, 0, schedule="cosine", **kw) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-12)
    assert train.lr_at(25, lr, 0, schedule="cosine", **kw) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2)
    assert train.lr_at(25, lr, 0, schedule="linear", **kw) == pytest.approx(1e-4 + 9e-4 * 0.75, rel=1e-12)
    assert train.lr_at(30, lr, 10, schedule="linear", total_steps=51) == pytest.approx(lr / 2, rel=1e-12)
    with pytest.raises(ValueError):
        train.lr_at(5, lr, 0, schedule="cosine")  # no total_steps


@pytest.mark.parametrize("inv_gamma, power, decay", [(1.0, 2 / 3, 0.9999), (1.0, 0.75, 0.999), (10.0, 0.5, 0.995),
                                                     (0.5, 1.0, 0.9)])
def test_ema_warmup_decays_are_diffusers_ema_models(inv_gamma: float, power: float, decay: float) -> None:
    """train.ema_warmup is diffusers' EMAModel(use_ema_warmup=True): our step s (0-based) is its
    optimization_step s + 1, at which its step() calls get_decay(s + 1)."""
    from diffusers.training_utils import EMAModel
    theirs = EMAModel(torch.nn.Linear(2, 2).parameters(), decay=decay, use_ema_warmup=True, inv_gamma=inv_gamma,
                      power=power)
    for s in [0, 1, 2, 3, 10, 99, 1000, 12_345, 10**6, 10**8]:
        ours = train.ema_decay_at(s, decay, warmup=True, inv_gamma=inv_gamma, power=power)
        assert ours == pytest.approx(theirs.get_decay(s + 1), rel=1e-12, abs=1e-15), s
    assert train.ema_decay_at(5, decay) == decay  # without the warmup: the constant decay (the paper)


@pytest.mark.parametrize("kind, gamma", [("linear", 5.0), ("cosine", 5.0), ("linear", 1.0)])
def test_min_snr_weights_are_diffusers_compute_snr_clamped(kind: str, gamma: float) -> None:
    """train.loss_weighting min_snr: the weights of diffusers' train_text_to_image.py (ε-prediction),
    min(compute_snr(t), γ) / compute_snr(t), for the same schedule; and the loss is their weighted mean."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                              beta_schedule="linear" if kind == "linear" else "squaredcos_cap_v2")
    schedule = ddpm.make_schedule(1000, 1e-4, 0.02, kind=kind)
    t = torch.tensor([0, 1, 10, 100, 250, 500, 750, 998, 999])
    snr = compute_snr(scheduler, t)
    theirs = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr
    # diffusers takes 1 - ᾱ_t of a float32 ᾱ_t: ~1e-4 relative error where ᾱ_t is near 1 (t <= 10). Ours, from the
    # float64 schedule's square roots, is held to the float64 values more tightly.
    ours = ddpm.min_snr_weights(schedule, t, gamma)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=0)
    torch.testing.assert_close(ours[t >= 100], theirs[t >= 100], rtol=2e-5, atol=0)
    if kind == "linear":
        ac64 = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t]
        snr64 = ac64 / (1 - ac64)
        torch.testing.assert_close(ours.double(), snr64.clamp(max=gamma) / snr64, rtol=1e-6, atol=0)

    x0, noise = torch.rand(len(t), 1, 4, 4) * 2 - 1, torch.randn(len(t), 1, 4, 4)
    model = lambda x, tt: x * 0.5  # any fixed function of x_t
    per_image = ((model(ddpm.q_sample(schedule, x0, t, noise), t) - noise) ** 2).mean(dim=(1, 2, 3))
    weighted = ddpm.loss(schedule, model, x0, t=t, noise=noise, snr_gamma=gamma)
    torch.testing.assert_close(weighted, (theirs * per_image).mean(), rtol=2e-5, atol=0)
    assert ddpm.loss(schedule, model, x0, t=t, noise=noise) == pytest.approx(float(per_image.mean()), rel=1e-6)


def test_config_diff_refuses_a_new_length_when_the_lr_decays_to_it() -> None:
    """train.epochs and train.max_steps may change on resume with a constant lr, not when the lr decays to the run's
    last step: the steps already taken would have had other learning rates."""
    const, cosine = tiny_config(), tiny_config(**{"train.lr_schedule": "cosine"})
    for key, value in (("train.epochs", 7), ("train.max_steps", 3)):
        longer = lambda cfg: config.to_dict(tiny_config(**{"train.lr_schedule": cfg.train.lr_schedule, key: value}))
        assert train.config_diff(config.to_dict(const), longer(const)) == []
        assert train.config_diff(config.to_dict(cosine), longer(cosine)) == [key]


def test_dropout_draws_other_masks_on_every_process_and_step() -> None:
    """Under torchrun each process holds other images, so its dropout masks must be its own (they were all the same
    while every rank seeded the global generator alike); and a function of the step, for an exact resume."""
    for world in (1, 2, 4):  # within a run (one world size): no two (step, rank) share a seed
        seeds = [train.dropout_seed(0, step, train.Dist(rank, world)) for step in range(50) for rank in range(world)]
        assert len(set(seeds)) == len(seeds)
    masks = []
    for rank in (0, 1):
        torch.manual_seed(train.dropout_seed(0, 7, train.Dist(rank, 2)))
        masks.append(unet.Dropout(0.1).train()(torch.ones(1000)) == 0)
    assert not torch.equal(*masks) and all(50 < int(m.sum()) < 150 for m in masks)


def test_config_diff_ignores_only_resumable_keys() -> None:
    a = config.Config()
    changed = dataclasses.replace(a, device="cpu", train=dataclasses.replace(a.train, lr=1e-3, epochs=5,
                                  checkpoint_every=7), wandb=dataclasses.replace(a.wandb, mode="offline"))
    assert train.config_diff(config.to_dict(a), config.to_dict(a)) == []
    assert train.config_diff(config.to_dict(a), config.to_dict(changed)) == ["train.lr"]
    assert "model.channels" in train.config_diff(config.to_dict(a), config.to_dict(tiny_config()))


def test_netrc_with_wandb_credentials_means_online(tmp_path: Path, monkeypatch) -> None:
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not train._netrc_has_wandb()  # no file
    netrc.write_text("machine example.com login a password b\n")
    assert not train._netrc_has_wandb()
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    assert train._netrc_has_wandb()


# ---------------------------------------------------------------- training end to end

@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_training(dataset: str, device: torch.device, workdir: Path, request) -> None:
    if dataset == "fashion-mnist":
        link_datasets(workdir, {"fashion-mnist": request.getfixturevalue("fmnist")})
    channels = {"fashion-mnist": 1, "cifar10": 3}[dataset]
    cfg = tiny_config(**{"device": device.type, "data.dataset": dataset, "data.subset": 16, "train.batch_size": 4,
                         "train.epochs": 4, "train.ema_decay": 0.9, "sample.every_epochs": 2, "train.compile": False})
    t0 = time.perf_counter()
    metrics = train.train(cfg, progress=False)
    elapsed = time.perf_counter() - t0
    out = Path(cfg.out_dir)

    # The loss falls: the last epoch's mean loss is well below the first's, for the model and for its EMA.
    history = read_history(out)
    assert [(r["epoch"], r["step"]) for r in history] == [(1, 4), (2, 8), (3, 12), (4, 16)]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["ema_loss"]) for r in history)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"], history
    assert history[-1]["ema_loss"] < history[0]["ema_loss"], history
    assert all(r["lr"] == cfg.train.lr for r in history)

    # metrics.json: the last epoch's row, as returned by train().
    saved = json.loads((out / "metrics.json").read_text())
    assert saved.keys() == METRICS_KEYS
    assert saved == {k: metrics[k] for k in METRICS_KEYS} == {k: history[-1][k] for k in METRICS_KEYS}
    assert saved["step"] == 16 and saved["epoch"] == 4
    assert 0 < saved["wall_time_s"] <= elapsed  # the training time, within the call's own
    assert saved["images_per_sec"] > 0  # the last epoch's training throughput: see the epoch-row test

    # checkpoint.pt: everything needed to resume and to rebuild the model alone.
    state = checkpoint.load_checkpoint(out / "checkpoint.pt")
    assert CKPT_KEYS <= state.keys()
    assert (state["step"], state["epoch"]) == (16, 4)
    assert state["config"] == config.to_dict(cfg)
    assert state["model_args"]["in_channels"] == channels and state["model_args"]["image_size"] == 32
    assert state["data_id"] == hashlib.sha256((Path("data") / dataset / "meta.json").read_bytes()).hexdigest()
    assert state["history"] == history
    assert yaml.safe_load((out / "config.resolved.yaml").read_text()) == config.to_dict(cfg)

    # Sample grids every 2 epochs (and at the last): PNGs of 4 images in a 2x2 grid with 2-pixel borders.
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_002.png", "epoch_004.png"]
    grids = {p.name: decode_png(p) for p in (out / "samples").iterdir()}
    assert all(g.shape == (3, *grid_side(4)) and g.dtype == torch.uint8 for g in grids.values())

    # The last grid is the EMA model's samples for the grids' seed (the same every epoch): regenerate them from the
    # checkpoint alone.
    ema = checkpoint.model_from_checkpoint(state, device=device)
    schedule = sample.schedule_from_config(state["config"]).to(device)
    sc = cfg.sample  # the config's sampler settings (variance auto: β̃ at 5 of 100 steps)
    x = ddpm.sample(schedule, ema, (4, channels, 32, 32), steps=5, device=device, sampler=sc.sampler, eta=sc.eta,
                    spacing=sc.spacing, variance=sc.variance,
                    generator=torch.Generator(device).manual_seed(train.derive_seed(cfg.seed, 3)))
    assert torch.isfinite(x).all() and -1 <= x.min() and x.max() <= 1 and x.std() > 0.05
    unit = ddpm.to_unit(x)
    assert 0 <= unit.min() and unit.max() <= 1
    regenerated = sample.image_grid(ddpm.to_uint8(x)).permute(2, 0, 1)
    if device.type == "cpu":
        assert torch.equal(regenerated, grids["epoch_004.png"])
    else:  # other kernels on the GPU: allow rounding differences
        assert (regenerated.float() - grids["epoch_004.png"].float()).abs().mean() < 1.0


def test_the_epoch_rows_numbers_computed_again_independently(workdir: Path, monkeypatch) -> None:
    """history.csv's `loss` is the mean over the epoch's images (12 images in batches of 8: the partial second
    batch counts by its 4 images), `ema_loss` the EMA weights' L_simple on the held-out batch (the first 256 test
    images with t and ε of stream 4), recomputed from the checkpoint alone, and `images_per_sec` the training
    throughput, without the grid drawn at the epoch's end (made to take 3 s here)."""
    losses, real_step, real_generate = [], train.train_step, train.generate

    def step(p, x, *args, **kwargs):
        loss, grad_norm = real_step(p, x, *args, **kwargs)
        losses.append((float(loss), x.shape[0]))
        return loss, grad_norm

    def slow_generate(*args, **kwargs):
        time.sleep(3.0)
        return real_generate(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "generate", slow_generate)
    cfg = tiny_config(**{"train.epochs": 2, "sample.every_epochs": 1})
    train.train(cfg, progress=False)
    rows = read_history(Path(cfg.out_dir))
    for row, epoch in zip(rows, (losses[:2], losses[2:])):
        assert row["loss"] == pytest.approx(sum(l * n for l, n in epoch) / sum(n for _, n in epoch), rel=1e-6)
        assert row["images_per_sec"] > N_IMAGES / 3.0  # the 3 s grid is not in it
    state = checkpoint.load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")
    ema = checkpoint.model_from_checkpoint(state)
    schedule = sample.schedule_from_config(state["config"])
    held = ddpm.from_uint8(data.load_dataset(Path("data/cifar10/test.npy"))[:256])
    t, noise = ddpm.draw_t_noise(schedule, held.shape, generator=torch.Generator().manual_seed(
        train.derive_seed(cfg.seed, 4)))
    with torch.no_grad():
        assert rows[-1]["ema_loss"] == pytest.approx(float(ddpm.loss(schedule, ema, held, t=t, noise=noise)), rel=1e-6)


@pytest.mark.slow
def test_one_fixed_batch_is_memorised(workdir: Path) -> None:
    """50 Adam steps on one batch of 4 images bring the training loss below 0.5 (it starts near 1: the zero-initialised
    output layer predicts ε = 0). No dropout and no flips, so the batch really is the same every step."""
    cfg = tiny_config(**{"data.subset": 4, "train.batch_size": 4, "train.epochs": 50, "train.lr": 5e-4,
                         "train.warmup_steps": 0, "data.random_flip": False, "model.dropout": 0.0})
    metrics = train.train(cfg, progress=False)
    losses = [r["loss"] for r in read_history(Path(cfg.out_dir))]
    assert len(losses) == 50 and losses[0] > 0.9
    assert metrics["loss"] == losses[-1] < 0.5, losses
    assert sum(losses[-5:]) / 5 < 0.5, losses


# ---------------------------------------------------------------- hyperparameters change what they should

def test_adam_and_sgd_end_at_other_weights(tiny_run) -> None:
    """Adam (a) and SGD with momentum (b) from the same seed end at other weights."""
    a, b = tiny_run(**{"train.optimizer": "adam"}), tiny_run(**{"train.optimizer": "sgd"})
    sa, sb = a.state, b.state
    init = initial_weights(sa, a.cfg.seed)
    wa, wb = flat_weights(sa["model"]), flat_weights(sb["model"])
    assert not torch.equal(wa, init) and not torch.equal(wb, init)
    assert (wa - wb).norm() > 0.1 * (wa - init).norm()
    assert {"exp_avg", "exp_avg_sq"} <= sa["optimizer"]["state"][0].keys()
    assert "momentum_buffer" in sb["optimizer"]["state"][0]


def test_adam_is_fused_on_the_cpu_too() -> None:
    """train.build()'s Adam is the one-pass fused kernel on the CPU as on CUDA (44 ms against foreach's 132 ms per
    step of the paper model on one core, docs/benchmarks.md), and bench.py's diffusers rows get the same options."""
    import bench
    parts = train.build(config.Config(), bench.TINY, torch.device("cpu"))
    assert parts.opt.defaults["fused"] is True and not parts.opt.defaults["foreach"]
    assert train.adam_options(torch.device("cpu")) == {"fused": True}


def test_a_larger_lr_moves_the_weights_further(tiny_run) -> None:
    """The larger learning rate (b) moves the weights further from the same initial values in the same steps."""
    a, b = tiny_run(**{"train.lr": 1e-4}), tiny_run(**{"train.lr": 1e-3})
    sa, sb = a.state, b.state
    init = initial_weights(sa, a.cfg.seed)
    assert torch.equal(init, initial_weights(sb, b.cfg.seed))
    near, far = (flat_weights(sa["model"]) - init).norm(), (flat_weights(sb["model"]) - init).norm()
    assert a.metrics["step"] == b.metrics["step"]
    assert far > 3 * near > 0, (far, near)


def test_random_flip_shows_the_model_mirrored_images(tiny_run) -> None:
    """Flips on (b) show the model mirrored images: same permutation and seed, other batches, other weights."""
    a, b = tiny_run(**{"data.random_flip": False}), tiny_run(**{"data.random_flip": True})
    images = data.load_dataset(a.folder / "data" / "cifar10", N_IMAGES)
    seed = train.derive_seed(a.cfg.seed, 1)
    plain = list(data.BatchIterator(images, 8, seed=seed, random_flip=False).epoch_batches())
    flipped = list(data.BatchIterator(images, 8, seed=seed, random_flip=True).epoch_batches())
    assert [x.shape for x in plain] == [x.shape for x in flipped]
    n_mirrored = 0
    for x, y in zip(plain, flipped):
        for u, v in zip(x, y):
            assert torch.equal(u, v) or torch.equal(u.flip(-1), v)
            n_mirrored += not torch.equal(u, v)
    assert 0 < n_mirrored < N_IMAGES
    assert not torch.equal(flat_weights(a.state["model"]), flat_weights(b.state["model"]))


def test_more_epochs_take_proportionally_more_steps(tiny_run) -> None:
    """More epochs take proportionally more steps: epochs * ceil(N / B)."""
    a, b = tiny_run(**{"train.epochs": 1}), tiny_run(**{"train.epochs": 3})
    for run in (a, b):
        assert run.metrics["step"] == run.cfg.train.epochs * STEPS_PER_EPOCH == run.state["step"]
        assert [r["step"] for r in read_history(run.out)] == \
            [STEPS_PER_EPOCH * (e + 1) for e in range(run.cfg.train.epochs)]
    assert b.metrics["step"] == 3 * a.metrics["step"]


# ---------------------------------------------------------------- the recipe reaches the loop
# Each test checks what a setting must do to the weights or the logs, against values computed here, not against
# another run of train() (a deterministic bug is equal to itself).

def moved(run: Run) -> float:
    """How far the run's weights are from where training started."""
    state = run.state
    return float((flat_weights(state["model"]) - initial_weights(state, run.cfg.seed)).norm())


def test_grad_clip_bounds_how_far_sgd_moves_the_weights(tiny_run) -> None:
    """Plain SGD (no momentum, no weight decay, constant lr) moves the weights by lr x the clipped gradient, whose
    norm is at most train.grad_clip: after n steps they are at most lr * grad_clip * n from where they started.
    Without clipping the same run goes far beyond (measured: 0.24 against the bound 0.002; gradient norms ~1.2)."""
    sgd = {"train.optimizer": "sgd", "train.momentum": 0.0, "train.lr": 0.05, "train.epochs": 2}
    clipped, free = tiny_run(**sgd, **{"train.grad_clip": 0.01}), tiny_run(**sgd, **{"train.grad_clip": None})
    steps = 2 * STEPS_PER_EPOCH
    bound = 0.05 * 0.01 * steps
    assert clipped.metrics["step"] == free.metrics["step"] == steps
    assert 0.5 * bound < moved(clipped) <= 1.01 * bound  # 1%: float32 rounding of the stored weights
    assert moved(free) > 10 * bound


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_ema_is_the_decay_weighted_average_of_the_model_after_every_step(decay: float, workdir: Path,
                                                                         monkeypatch) -> None:
    """After each step, ema = decay * previous ema + (1 - decay) * model, from the initial weights (read from
    every checkpoint train() writes, one per step); with train.ema_decay 0 the EMA is the model, bitwise."""
    saved = {}
    real_save = train.save_checkpoint

    def save(path, state):
        saved[state["step"]] = (flat_weights(state["model"]), flat_weights(state["ema"]))
        return real_save(path, state)
    monkeypatch.setattr(train, "save_checkpoint", save)
    cfg = tiny_config(**{"train.ema_decay": decay, "train.checkpoint_every": 1, "train.epochs": 2})
    train.train(cfg, progress=False)
    final = checkpoint.load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")
    assert sorted(saved) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    ema = initial_weights(final, cfg.seed)
    for step, (model, logged_ema) in sorted(saved.items()):
        ema = decay * ema + (1 - decay) * model
        torch.testing.assert_close(logged_ema, ema, rtol=0, atol=1e-6, msg=f"EMA after step {step}")
    if decay == 0:
        assert_equal_nested(final["ema"], final["model"], "ema vs model")


def test_warmup_shows_in_the_history(tiny_run) -> None:
    """train.warmup_steps: each epoch's `lr` in history.csv is the learning rate of its last step, rising linearly
    to train.lr at step warmup_steps (2 steps an epoch). The per-step train/lr: the offline wandb run's test."""
    run = tiny_run(**{"train.warmup_steps": 5, "train.epochs": 3})
    lr = run.cfg.train.lr
    assert [r["lr"] for r in read_history(run.out)] == pytest.approx([lr * 2 / 5, lr * 4 / 5, lr], rel=1e-12)


# ---------------------------------------------------------------- determinism and resuming
KNOBS = {"train.lr_schedule": "cosine", "train.min_lr": 1e-4, "train.ema_warmup": True, "train.ema_decay": 0.999,
         "train.loss_weighting": "min_snr", "train.snr_gamma": 2.0,
         "model.norm_groups": 8}  # every quality-per-minute key on


def test_max_steps_stops_mid_epoch_with_a_partial_epoch_row_and_the_lr_at_min_lr(tiny_run) -> None:
    """train.max_steps 3 with 2 steps an epoch: epoch 1, then a row for the partial epoch 2 at step 3, whose lr
    (that of the last step) is min_lr; a sample grid is drawn at the end, as at the last epoch."""
    run = tiny_run(**{"train.epochs": 5, "train.max_steps": 3, "train.lr_schedule": "linear", "train.min_lr": 1e-5,
                      "sample.every_epochs": 4})
    rows = read_history(run.out)
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 2), (2, 3)]
    assert rows[-1]["lr"] == pytest.approx(1e-5, rel=1e-12)
    assert rows[0]["lr"] == pytest.approx(1e-3 - (1e-3 - 1e-5) / 2, rel=1e-12)  # step 1 of 0..2
    assert run.state["step"] == 3 and (run.out / "samples" / "epoch_002.png").is_file()


def test_min_snr_and_ema_warmup_reach_the_step(tiny_run) -> None:
    """loss_weighting min_snr gives the step snr_gamma; ema_warmup's decay is 0 at the first step, so after one
    step the EMA is the model, bitwise (with the constant decay 0.999 it would still be 99.9% the initial weights)."""
    parts = train.build(tiny_config(**KNOBS), dict(UNET_ARGS), torch.device("cpu"))
    assert parts.snr_gamma == 2.0
    assert train.build(tiny_config(), dict(UNET_ARGS), torch.device("cpu")).snr_gamma is None
    one = tiny_run(**KNOBS, **{"train.max_steps": 1}).state
    assert torch.equal(flat_weights(one["ema"]), flat_weights(one["model"]))
    two = tiny_run(**KNOBS, **{"train.max_steps": 2}).state
    assert not torch.equal(flat_weights(two["ema"]), flat_weights(two["model"]))
    # model.norm_groups: recorded with the network, and every GroupNorm of the network the checkpoint rebuilds has it
    assert one["model_args"]["norm_groups"] == 8
    norms = [m for m in checkpoint.model_from_checkpoint(one).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {8}


@pytest.mark.parametrize("key, value, weights", [("train.lr_schedule", "cosine", "model"),
                                                ("train.loss_weighting", "min_snr", "model"),
                                                ("train.ema_warmup", True, "ema")])
def test_each_switch_changes_what_it_trains(key: str, value, weights: str, tiny_run) -> None:
    """Each key alone, from the reference run: its weights differ (the EMA's for ema_warmup, whose model is the
    same), so none of them is read and then dropped on the way to the step."""
    ref, other = tiny_run(**REF).state, tiny_run(**REF, **{key: value}).state
    assert not torch.equal(flat_weights(other[weights]), flat_weights(ref[weights]))
    if key == "train.ema_warmup":
        assert torch.equal(flat_weights(other["model"]), flat_weights(ref["model"]))



def test_one_seed_gives_bitwise_identical_runs(tiny_run, workdir: Path) -> None:
    ref = tiny_run(**REF)
    cfg = tiny_config(**REF)
    metrics = train.train(cfg, progress=False)
    timeless = ("images_per_sec", "wall_time_s")
    assert {k: v for k, v in metrics.items() if k not in timeless} == \
        {k: v for k, v in ref.metrics.items() if k not in timeless}
    assert_same_training(checkpoint.load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt"), ref.state)
    other = tiny_config(**{**REF, "seed": 1, "out_dir": "runs/seed1"})  # and another seed gives other weights
    train.train(other, progress=False)
    assert not torch.equal(flat_weights(checkpoint.load_checkpoint(Path(other.out_dir) / "checkpoint.pt")["model"]),
                           flat_weights(ref.state["model"]))


def test_continuing_a_finished_run_with_more_epochs_equals_a_straight_run(tiny_run, workdir: Path,
                                                                         step_counter: dict) -> None:
    ref = tiny_run(**REF)
    copy_run(tiny_run(), workdir)  # 1 epoch
    step_counter["n"] = 0  # (the tiny runs above may have just been trained)
    metrics = train.train(tiny_config(**REF), progress=False)  # train.epochs may change on resume
    assert step_counter["n"] == 2 * STEPS_PER_EPOCH  # it continued: only the two new epochs were trained
    state = checkpoint.load_checkpoint(Path(TINY["out_dir"]) / "checkpoint.pt")
    assert_same_training(state, ref.state)
    assert metrics["step"] == 3 * STEPS_PER_EPOCH
    assert [r["loss"] for r in read_history(Path(TINY["out_dir"]))] == [r["loss"] for r in state["history"]]
    # Running the finished run again trains nothing and changes nothing.
    before = snapshot(workdir / TINY["out_dir"])
    assert train.train(tiny_config(**REF), progress=False) == metrics
    assert step_counter["n"] == 2 * STEPS_PER_EPOCH
    after = snapshot(workdir / TINY["out_dir"])
    assert {k: v for k, v in after.items() if k != "config.resolved.yaml"} == \
        {k: v for k, v in before.items() if k != "config.resolved.yaml"}


class Crash(Exception):
    """Stands in for a power cut or an OOM kill in the middle of a run."""


@pytest.mark.parametrize("where, knobs", [("step", False), ("epoch_end", False), ("sigint", False), ("step", True)])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(where: str, knobs: bool, tiny_run, workdir: Path,
                                                                  monkeypatch) -> None:
    """step: crash before step 4 (mid epoch 2), with a checkpoint every step. epoch_end: crash in epoch 2's
    bookkeeping, after the checkpoint written at its last batch. sigint: Ctrl-C during step 5 finishes the step,
    writes a checkpoint and exits 130. Then the same command resumes: it executes only the steps left, and the
    result is bitwise the uninterrupted run."""
    calls = {"train_step": 0, "end_epoch": 0}
    real = {"train_step": train.train_step, "end_epoch": train.end_epoch}
    interrupting = True

    def train_step(*args, **kwargs):
        calls["train_step"] += 1
        if interrupting and where == "step" and calls["train_step"] == 4:
            raise Crash
        if interrupting and where == "sigint" and calls["train_step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real["train_step"](*args, **kwargs)

    def end_epoch(*args, **kwargs):
        calls["end_epoch"] += 1
        if interrupting and where == "epoch_end" and calls["end_epoch"] == 2:
            raise Crash
        return real["end_epoch"](*args, **kwargs)

    monkeypatch.setattr(train, "train_step", train_step)
    monkeypatch.setattr(train, "end_epoch", end_epoch)
    handler = signal.getsignal(signal.SIGINT)
    ref = {**REF, **(KNOBS if knobs else {})}  # knobs: every quality-per-minute key on
    interrupted = tiny_config(**ref, **{"train.checkpoint_every": {"step": 1, "epoch_end": 2, "sigint": 5000}[where]})
    with pytest.raises(SystemExit if where == "sigint" else Crash) as e:
        train.train(interrupted, progress=False)
    if where == "sigint":
        assert e.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler  # train's own handler is gone again
    ckpt = Path(interrupted.out_dir) / "checkpoint.pt"
    saved = checkpoint.load_checkpoint(ckpt)
    assert saved["step"] == {"step": 3, "epoch_end": 4, "sigint": 5}[where]
    assert len(saved["history"]) == {"step": 1, "epoch_end": 1, "sigint": 2}[where]

    interrupting, calls["train_step"] = False, 0
    train.train(tiny_config(**ref), progress=False)  # the same command again; checkpoint_every may differ
    # It continued from the checkpoint: only the steps left were executed (a restart would redo them all and,
    # being deterministic, end at the same weights).
    assert calls["train_step"] == 3 * STEPS_PER_EPOCH - saved["step"]
    resumed = checkpoint.load_checkpoint(ckpt)
    assert_same_training(resumed, tiny_run(**ref).state)
    assert read_history(Path(interrupted.out_dir)) == resumed["history"]


# ---------------------------------------------------------------- wandb

def test_wandb_auto_without_credentials_runs_offline_with_metrics_images_config_and_no_code(workdir: Path,
                                                                                            monkeypatch) -> None:
    """wandb.mode auto with no API key and no netrc entry: an offline run in out_dir/wandb, holding the config,
    the per-step scalars every log_every steps (their loss the mean over the window, their lr the warmup's), the
    per-epoch scalars and images, the config artifact, and no code."""
    import wandb
    for var, value in wandb_env(workdir / "wandb-home").items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(workdir / "no-netrc"))
    init_kwargs = {}
    real_init = wandb.init

    def spy(*args, **kwargs):
        init_kwargs.update(kwargs)
        return real_init(*args, **kwargs)
    monkeypatch.setattr(wandb, "init", spy)
    # wandb's service process outlives a run and keeps the working folder it started in: start it elsewhere first,
    # as a later train() call in the same process (a notebook, a sweep, a test session) finds it.
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    wandb.teardown()
    with contextlib.chdir(elsewhere):
        wandb.setup()
    # 3 epochs of two full batches of 4: steps 1-6, logged at 2, 4 and 6; the warmup ends at step 5.
    cfg = tiny_config(**{"wandb.mode": "auto", "wandb.log_every": 2, "train.warmup_steps": 5, "data.subset": 8,
                         "train.batch_size": 4, "train.epochs": 3, "sample.every_epochs": 1})
    config_path = write_config(cfg)
    train.train(config.load_config(config_path), config_path=config_path, progress=False)
    wandb.teardown()  # the service writes the rest of its transaction log on shutdown (atexit, in a real run)
    out = Path(cfg.out_dir)
    assert init_kwargs["settings"].save_code is False and init_kwargs["mode"] == "offline"

    assert not any(elsewhere.iterdir())
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    records = read_wandb_log(log)
    by_type: dict[str, list] = {}
    for r in records:
        by_type.setdefault(r.WhichOneof("record_type"), []).append(r)

    # The config: every hyperparameter, as config.to_dict gives it.
    assert {"run", "history", "artifact", "exit"} <= by_type.keys(), {k: len(v) for k, v in by_type.items()}
    (run,) = [r.run for r in by_type["run"]]
    logged = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert logged == config.to_dict(cfg)

    # History: per-step scalars every 2 steps and nowhere else, per-epoch scalars and images at each epoch's end.
    rows: dict[int, dict] = {}
    for r in by_type["history"]:
        row = rows.setdefault(r.history.step.num, {})
        for item in r.history.item:
            keys = list(item.nested_key) or [item.key]
            node = row
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = json.loads(item.value_json)
    history = read_history(out)
    lr = cfg.train.lr
    assert sorted(rows) == [0, 2, 4, 6]
    assert [r["lr"] for r in history] == pytest.approx([lr * 2 / 5, lr * 4 / 5, lr], rel=1e-12)
    for epoch, step in ((1, 2), (2, 4), (3, 6)):
        row = rows[step]
        assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_sec"} <= row.keys()
        assert row["train/lr"] == pytest.approx(lr * min(step, 5) / 5, rel=1e-12)  # the lr of this very step
        assert math.isfinite(row["train/grad_norm"]) and row["train/grad_norm"] > 0
        assert {"epoch/loss", "epoch/ema_loss", "epoch", "samples"} <= row.keys()
        assert row["epoch"] == epoch
        assert row["epoch/loss"] == history[epoch - 1]["loss"]
        assert row["epoch/ema_loss"] == history[epoch - 1]["ema_loss"]
        # The logged loss is the mean over the 2-step window, which here is the epoch (two full batches of 4).
        assert row["train/loss"] == pytest.approx(row["epoch/loss"], rel=1e-6)

    # Images: PNG files under files/media/images, pixel for pixel the grids train.py made from uint8 images.
    images = data.load_dataset(Path("data/cifar10"), 8)
    first = next(data.BatchIterator(images, 4, seed=train.derive_seed(cfg.seed, 1)).epoch_batches())
    expected = {"inputs": (0, sample.image_grid(ddpm.to_uint8(first)).permute(2, 0, 1)),
                "samples": (6, decode_png(out / "samples" / "epoch_003.png"))}
    for name, (step, pixels) in expected.items():
        meta = rows[step][name]
        assert meta["_type"] == "image-file" and meta["format"] == "png"
        assert meta["path"].startswith("media/images/") and meta["path"].endswith(".png")
        assert torch.equal(decode_png(run_dir / "files" / meta["path"]), pixels), name
    assert decode_png(run_dir / "files" / rows[2]["samples"]["path"]).equal(
        decode_png(out / "samples" / "epoch_001.png"))

    # The config artifact: the file given and the resolved config, by content.
    (artifact,) = [r.artifact for r in by_type["artifact"]]
    assert artifact.type == "config"
    files = {c.path: c.digest for c in artifact.manifest.contents}
    md5 = {name: base64.b64encode(hashlib.md5(p.read_bytes()).digest()).decode()
           for name, p in (("config.yaml", Path(config_path)), ("config.resolved.yaml", out / "config.resolved.yaml"))}
    assert files == md5

    # No code: save_code off, no code artifact or job, no source files uploaded, no code path recorded.
    uploaded = [f.path for r in by_type.get("files", []) for f in r.files.files]
    assert not [p for p in uploaded if p.startswith("code/") or p.endswith(".py")], uploaded
    assert all(not r.environment.code_path for r in by_type.get("environment", []))
    assert not (run_dir / "files" / "code").exists() or not any((run_dir / "files" / "code").rglob("*"))
    assert [r.exit.exit_code for r in by_type["exit"]] == [0]


# ---------------------------------------------------------------- sample.py

def test_sample_cli_from_a_training_checkpoint(tiny_run, workdir: Path, capsys) -> None:
    copy_run(tiny_run(**REF), workdir)
    ckpt = f"{TINY['out_dir']}/checkpoint.pt"
    args = ["--checkpoint", ckpt, "--num-images", "4", "--steps", "5", "--device", "cpu", "--seed", "1"]
    result = run_cli("sample.py", *args, "--out", "s1.png", "--npz", "s1.npz", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote 4 images (step {3 * STEPS_PER_EPOCH}, EMA weights) to s1.png and s1.npz")
    sample.main([*args, "--out", "s2.png", "--npz", "s2.npz"])  # the same command again, in-process
    arrays = []
    for name in ("s1", "s2"):
        with np.load(workdir / f"{name}.npz") as f:
            arrays.append(f["arr_0"])
        assert arrays[-1].dtype == np.uint8 and arrays[-1].shape == (4, 32, 32, 3)
        grid = sample.image_grid(torch.from_numpy(arrays[-1]).permute(0, 3, 1, 2)).permute(2, 0, 1)
        assert torch.equal(decode_png(workdir / f"{name}.png"), grid)  # the PNG shows the npz's images
    assert np.array_equal(arrays[0], arrays[1])  # same seed, same images

    # The same images from the checkpoint alone: its EMA weights, its schedule, generate's seed convention.
    state = checkpoint.load_checkpoint(ckpt)
    defaults = {k: getattr(config.Sample(), k) for k in ("sampler", "eta", "spacing", "variance")}  # the CLI's
    images = sample.generate(checkpoint.model_from_checkpoint(state), sample.schedule_from_config(state["config"]),
                             4, steps=5, seed=1, **defaults)
    assert torch.equal(images.permute(0, 2, 3, 1), torch.from_numpy(arrays[0]))

    # Another seed, the raw weights and the paper's variance give other images.
    sample.main([*args[:-1], "2", "--out", "s3.png", "--npz", "s3.npz", "--raw", "--variance", "beta",
                 "--batch-size", "3"])
    assert "raw weights" in capsys.readouterr().out
    with np.load(workdir / "s3.npz") as f:
        assert f["arr_0"].shape == (4, 32, 32, 3) and not np.array_equal(f["arr_0"], arrays[0])


def test_sample_cli_clips_as_the_checkpoint_says_unless_told(tiny_run, workdir: Path) -> None:
    """sample.py's --clip / --no-clip default to the checkpoint's sample.clip (the rule of the training grids, FID
    during training and evaluate.py): a run with sample.clip false samples unclipped unless --clip is given."""
    copy_run(tiny_run(**REF, **{"sample.clip": False}), workdir)
    args = ["--checkpoint", f"{TINY['out_dir']}/checkpoint.pt", "--num-images", "2", "--steps", "5", "--device", "cpu"]
    images = {}
    for flags in ([], ["--no-clip"], ["--clip"]):
        sample.main([*args, *flags, "--out", "s.png", "--npz", "s.npz"])
        with np.load(workdir / "s.npz") as f:
            images[" ".join(flags)] = f["arr_0"]
    assert np.array_equal(images[""], images["--no-clip"]) and not np.array_equal(images[""], images["--clip"])


def test_sample_cli_bad_checkpoint_path_exits_2(workdir: Path) -> None:
    result = run_cli("sample.py", "--checkpoint", "runs/nope/checkpoint.pt", "--out", "s.png", cwd=workdir)
    assert result.returncode == 2
    assert "runs/nope/checkpoint.pt" in one_error_line(result.stderr)
    assert not (workdir / "s.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps"),
    (["--steps", "101"], "--steps"),
    (["--num-images", "0"], "--num-images"),
    (["--batch-size", "0"], "--batch-size"),
    pytest.param(["--device", "cuda"], "--device", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                          reason="CUDA is available")),
    (["--checkpoint", "garbage.pt"], "garbage.pt"),
])
def test_sample_cli_rejects_bad_arguments(args: list[str], message: str, tiny_run, workdir: Path, capsys) -> None:
    copy_run(tiny_run(), workdir)
    Path("garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        sample.main(["--checkpoint", f"{TINY['out_dir']}/checkpoint.pt", "--out", "s.png", *args])
    assert e.value.code == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not Path("s.png").exists()


# ---------------------------------------------------------------- bad checkpoints and bad settings

def damage_state(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"),
    "empty": lambda p: p.write_bytes(b""),
    "folder": lambda p: (p.unlink(), p.mkdir()),
    "other-format": lambda p: damage_state(p, lambda s: s.update(format=99)),
    "missing-keys": lambda p: damage_state(p, lambda s: s.pop("optimizer")),
    "other-weights": lambda p: damage_state(p, lambda s: s["model"].popitem()),
    "other-device": lambda p: damage_state(p, lambda s: s.update(device_type="cuda")),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_unusable_checkpoint_exits_2_naming_it_and_fresh_starts_over(damage: str, tiny_run, workdir: Path,
                                                                      capsys) -> None:
    base = tiny_run()
    out = copy_run(base, workdir)
    DAMAGE[damage](out / "checkpoint.pt")
    config_path = write_config(base.cfg)
    before = snapshot(workdir)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", config_path])
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{TINY['out_dir']}/checkpoint.pt" in line
    if damage != "folder":
        assert "--fresh" in line, line
    if damage == "other-device":
        assert line.startswith("error: device:")
    if damage != "other-weights":  # that one is found only once the model exists
        assert snapshot(workdir) == before
    else:
        assert {k: v for k, v in snapshot(workdir).items() if k != f"{TINY['out_dir']}/config.resolved.yaml"} == \
            {k: v for k, v in before.items() if k != f"{TINY['out_dir']}/config.resolved.yaml"}

    if damage in ("truncated", "folder", "other-weights"):
        train.main(["--config", config_path, "--fresh"])
        assert capsys.readouterr().out.startswith("done: epoch 1, step 2")
        assert_same_training(checkpoint.load_checkpoint(out / "checkpoint.pt"), base.state)


def test_truncated_checkpoint_via_the_cli_exits_2_without_a_traceback(tiny_run, workdir: Path) -> None:
    base = tiny_run()
    out = copy_run(base, workdir)
    DAMAGE["truncated"](out / "checkpoint.pt")
    result = run_cli("train.py", "--config", write_config(base.cfg), cwd=workdir)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"{TINY['out_dir']}/checkpoint.pt" in line and "--fresh" in line and "corrupt" in line


def test_checkpoint_with_other_settings_exits_2_naming_the_key(tiny_run, workdir: Path, capsys) -> None:
    base = tiny_run()
    out = copy_run(base, workdir)
    changed = tiny_config(**{"train.lr": 2e-3, "wandb.log_every": 7, "train.epochs": 2})  # only lr matters
    config_path = write_config(changed)
    before = snapshot(workdir)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", config_path])
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "train.lr" in line and "--fresh" in line
    for key in ("wandb.log_every", "train.epochs"):
        assert key not in line
    assert snapshot(workdir) == before
    train.main(["--config", config_path, "--fresh"])
    assert checkpoint.load_checkpoint(out / "checkpoint.pt")["config"]["train"]["lr"] == 2e-3


@pytest.mark.parametrize("changes, env, key", [
    ({"data.subset": 1000}, {}, "subset"),
    ({"data.subset": 4}, {}, "data.subset"),  # fewer images than one batch
    ({"out_dir": "blocker/run"}, {}, "out_dir"),
    ({"train.batch_size": 7}, {"WORLD_SIZE": "2"}, "train.batch_size"),  # torchrun: batch split over 2 processes
    pytest.param({"device": "cuda"}, {}, "device", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                            reason="CUDA is available")),
    pytest.param({"device": "auto", "train.precision": "fp16"}, {}, "train.precision",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
], ids=["subset-too-large", "subset-below-batch", "out-dir-under-a-file", "batch-not-divisible", "no-cuda",
        "fp16-on-cpu"])
def test_settings_train_cannot_use_exit_2_and_write_nothing(changes: dict, env: dict, key: str, workdir: Path,
                                                            monkeypatch, capsys) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    Path("blocker").write_text("a file where out_dir needs a folder")
    config_path = write_config(tiny_config(**changes))
    before = snapshot(workdir)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", config_path])
    assert e.value.code == 2
    assert key in one_error_line(capsys.readouterr().err)
    assert snapshot(workdir) == before


def test_non_finite_loss_exits_1_and_keeps_the_last_good_checkpoint(tiny_run, workdir: Path, monkeypatch,
                                                                     capsys) -> None:
    base = tiny_run()
    out = copy_run(base, workdir)
    before = snapshot(out)
    real_loss = ddpm.loss
    monkeypatch.setattr(ddpm, "loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    with pytest.raises(SystemExit) as e:
        train.main(["--config", write_config(tiny_config(**{"train.epochs": 2}))])
    assert e.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"non-finite loss or gradient at step {STEPS_PER_EPOCH + 1}" in line
    assert f"{TINY['out_dir']}/checkpoint.pt (step {STEPS_PER_EPOCH}) is kept" in line
    after = snapshot(out)
    for name in ("checkpoint.pt", "metrics.json", "history.csv"):  # no NaN epoch recorded anywhere
        assert after[name] == before[name], name


def test_failed_checkpoint_write_exits_1(workdir: Path, monkeypatch, capsys) -> None:
    def full_disk(path, state):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train, "save_checkpoint", full_disk)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", write_config(tiny_config())])
    assert e.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and f"{TINY['out_dir']}/checkpoint.pt" in line
    assert not (workdir / TINY["out_dir"] / "checkpoint.pt").exists()


def test_resume_on_other_data_of_the_same_size_exits_2_naming_it(tiny_run, tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    """A checkpoint records its dataset's identity (the sha256 of data/<dataset>/meta.json): resuming on other
    images, here as many as before, is refused in one line naming the file; --fresh starts over on them."""
    base = tiny_run()
    other = tmp_path / "other-data" / "cifar10"
    write_synthetic_cifar(other, n_train=64, n_test=16, seed=1)  # same size as the run's dataset, other images
    work = tmp_path / "work"
    work.mkdir()
    link_datasets(work, {"cifar10": other})
    monkeypatch.chdir(work)
    out = copy_run(base, work)
    config_path = write_config(tiny_config(**REF))
    before = snapshot(work)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", config_path])
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: data:") and "data/cifar10/meta.json" in line, line
    assert f"{TINY['out_dir']}/checkpoint.pt" in line and "--fresh" in line, line
    assert snapshot(work) == before
    train.main(["--config", config_path, "--fresh"])
    assert checkpoint.load_checkpoint(out / "checkpoint.pt")["data_id"] == \
        hashlib.sha256((other / "meta.json").read_bytes()).hexdigest()


def test_checkpoint_without_a_dataset_identity_still_resumes(tiny_run, workdir: Path, step_counter: dict) -> None:
    """Checkpoints written before the dataset identity was recorded resume as before (the data is unknown, so
    it is accepted), and equal a straight run."""
    ref = tiny_run(**REF)
    out = copy_run(tiny_run(), workdir)
    damage_state(out / "checkpoint.pt", lambda s: s.pop("data_id"))
    step_counter["n"] = 0  # (the tiny runs above may have just been trained)
    train.train(tiny_config(**REF), progress=False)
    assert step_counter["n"] == 2 * STEPS_PER_EPOCH
    assert_same_training(checkpoint.load_checkpoint(out / "checkpoint.pt"), ref.state)


def test_fresh_removes_the_old_sample_grids_and_evaluations(tiny_run, workdir: Path, capsys) -> None:
    out = copy_run(tiny_run(**{"train.epochs": 2, "sample.every_epochs": 1}), workdir)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    (out / "eval" / "samples_10_posterior_0").mkdir(parents=True)  # what evaluate.py leaves of the old weights
    (out / "eval" / "samples_10_posterior_0_n500_fashion-mnist.json").write_text("{}")
    train.main(["--config", write_config(tiny_config()), "--fresh"])  # 1 epoch, no grids
    assert capsys.readouterr().out.startswith(f"done: epoch 1, step {STEPS_PER_EPOCH}")
    assert list((out / "samples").iterdir()) == []
    assert not (out / "eval").exists()
    assert [r["epoch"] for r in read_history(out)] == [1]


def test_ctrl_c_before_training_exits_130_in_one_line(workdir: Path, monkeypatch, capsys) -> None:
    """Ctrl-C while the data loads, before train()'s own handler is installed: one line, exit 130, nothing written."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    config_path = write_config(tiny_config())
    before = snapshot(workdir)
    monkeypatch.setattr(data, "load_dataset", interrupted)
    try:
        train.main(["--config", config_path])
    except KeyboardInterrupt:  # caught here, or pytest would take it as the user's own Ctrl-C and stop the session
        pytest.fail("the KeyboardInterrupt escaped train.main (a traceback for the user)")
    except SystemExit as e:
        assert e.code == 130
    else:
        pytest.fail("train.main returned")
    assert one_error_line(capsys.readouterr().err) == \
        "error: interrupted before training started; run the same command again"
    assert snapshot(workdir) == before
