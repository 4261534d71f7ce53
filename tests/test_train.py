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
from helpers import (TINY, assert_equal_nested, assert_same_training, decode_png, flat_weights, grid_side,
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
    assert saved["images_per_sec"] == pytest.approx(16 * 4 / saved["wall_time_s"], rel=1e-2)  # 16 steps of 4

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
    regenerated = checkpoint.image_grid(ddpm.to_uint8(x)).permute(2, 0, 1)
    if device.type == "cpu":
        assert torch.equal(regenerated, grids["epoch_004.png"])
    else:  # other kernels on the GPU: allow rounding differences
        assert (regenerated.float() - grids["epoch_004.png"].float()).abs().mean() < 1.0


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


@pytest.mark.parametrize("where", ["step", "epoch_end", "sigint"])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(where: str, tiny_run, workdir: Path,
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
    interrupted = tiny_config(**REF, **{"train.checkpoint_every": {"step": 1, "epoch_end": 2, "sigint": 5000}[where]})
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
    train.train(tiny_config(**REF), progress=False)  # the same command again; checkpoint_every may differ
    # It continued from the checkpoint: only the steps left were executed (a restart would redo them all and,
    # being deterministic, end at the same weights).
    assert calls["train_step"] == 3 * STEPS_PER_EPOCH - saved["step"]
    resumed = checkpoint.load_checkpoint(ckpt)
    assert_same_training(resumed, tiny_run(**REF).state)
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
    expected = {"inputs": (0, checkpoint.image_grid(ddpm.to_uint8(first)).permute(2, 0, 1)),
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
        grid = checkpoint.image_grid(torch.from_numpy(arrays[-1]).permute(0, 3, 1, 2)).permute(2, 0, 1)
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


def test_fresh_removes_the_old_sample_grids(tiny_run, workdir: Path, capsys) -> None:
    out = copy_run(tiny_run(**{"train.epochs": 2, "sample.every_epochs": 1}), workdir)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    train.main(["--config", write_config(tiny_config()), "--fresh"])  # 1 epoch, no grids
    assert capsys.readouterr().out.startswith(f"done: epoch 1, step {STEPS_PER_EPOCH}")
    assert list((out / "samples").iterdir()) == []
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
