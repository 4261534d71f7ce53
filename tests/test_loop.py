"""The training loop's pieces: TrainState's snapshot() and restore() are one list (a round trip is the identity,
item by item), a checkpoint lacking any item is refused, the do-nothing Logger, a world of one; and under torchrun
(2 gloo processes) a stop signal or a non-finite loss that reaches one process only stops both at the same step."""
from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import runtime
import train
from helpers import ROOT, TINY, assert_equal_nested, launch, launched_steps, overrides, tiny_config


class Crash(Exception):
    """Ends run_epochs() in the middle of a step."""


def trained_state(monkeypatch, cfg, steps: int) -> train.TrainState:
    """prepare() and run_epochs() of `cfg`, ended by a Crash at the start of step `steps + 1`; with an enabled
    (CPU) loss scaler, so that it holds a state to restore."""
    setup, state = train.prepare(cfg, progress=False)
    state.parts.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    train.create_outputs(setup.out, fresh=False, cfg=cfg)
    calls, real = [0], train.train_step

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] > steps:
            raise Crash
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", step)
    with train.Stop() as stop, pytest.raises(Crash):
        train.run_epochs(setup, state, train.Logger(), stop, progress=False)
    monkeypatch.setattr(train, "train_step", real)
    return state


def item(snapshot: dict, path: str):
    for key in path.split("."):
        snapshot = snapshot[key]
    return snapshot


def equal(a, b) -> bool:
    try:
        assert_equal_nested(a, b)
    except AssertionError:
        return False
    return True


# Everything snapshot() writes that a restore must bring back; rng.cuda is an empty tensor on the CPU.
RESTORED = ["model", "ema", "optimizer", "scaler", "data", "epoch", "rng.torch", "rng.noise", "sums.epoch", "sums.log",
            "sums.log_n", "step", "history", "wandb_id"]
IDENTITY = ["config", "model_args", "device_type", "data_id"]  # checked by prepare(), not restored
TIMING = "wall_time_s"


def test_snapshot_restore_snapshot_is_the_identity(workdir: Path, monkeypatch) -> None:
    cfg = tiny_config(**{"train.epochs": 3})
    a = trained_state(monkeypatch, cfg, steps=3)  # mid epoch 2: one history row, sums and generators advanced
    a.wandb_id = "run-a"
    saved = a.snapshot()
    assert sorted(saved) == sorted([*{p.split(".")[0] for p in RESTORED}, *IDENTITY, TIMING])
    assert saved["step"] == 3 and saved["epoch"] == 1 and len(saved["history"]) == 1

    _, b = train.prepare(cfg, fresh=True, progress=False)  # a new run of the same settings
    b.parts.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    before = b.snapshot()
    # Every item differs before the restore, so that one restore() forgets shows below.
    assert [p for p in RESTORED if equal(item(before, p), item(saved, p))] == []

    b.restore(saved)
    after = b.snapshot()
    for path in RESTORED + IDENTITY:
        assert_equal_nested(item(after, path), item(saved, path), path)
    assert b.wall_before == saved[TIMING] and after[TIMING] >= saved[TIMING]


def test_restore_refuses_a_checkpoint_lacking_any_item_snapshot_writes(workdir: Path) -> None:
    _, state = train.prepare(tiny_config(), progress=False)
    saved = state.snapshot()
    assert checkpoint.REQUIRED <= saved.keys()  # what every reader needs is written
    for key in sorted(saved.keys() - {"data_id"}):  # data_id: checkpoints written before it existed still resume
        with pytest.raises(checkpoint.CheckpointError, match=rf"lacks \['{key}'\]"):
            state.restore({k: v for k, v in saved.items() if k != key})
    state.restore({k: v for k, v in saved.items() if k != "data_id"})


def test_the_logger_does_nothing_when_off_and_never_imports_wandb(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    for mode, main in (("disabled", True), ("offline", False), ("online", False)):
        logger = train.open_logger(tiny_config(**{"wandb.mode": mode}), tmp_path, main=main, config_path=None,
                                   run_id=None)
        assert logger.id is None
        logger.log({"train/loss": 1.0, "samples": torch.zeros(4, 3, 8, 8, dtype=torch.uint8)}, step=1)
        logger.finish(0)
    with pytest.raises(ImportError):  # on rank 0 with wandb on, it is imported
        train.open_logger(tiny_config(**{"wandb.mode": "offline"}), tmp_path, main=True, config_path=None, run_id=None)


def test_a_world_of_one_needs_no_process_group() -> None:
    one = runtime.Dist()
    x = torch.tensor([1.0, 2.0])
    assert one.all_reduce(x) is x and one.agree(15) == 15 and one.agree(0) == 0
    one.barrier(), one.close()
    assert one.device_spec("auto") == "auto" and runtime.Dist(1, 2, 1).device_spec("cpu") == "cpu"


# ---------------------------------------------------------------- two processes (torchrun, gloo)

# As in test_distributed.py: 43 images in batches of 16, 3 steps an epoch, the last one split 6 + 5; SGD, no
# dropout, so that the processes' weights equal one process's up to float reduction order.
SETTINGS = {**TINY, "data.subset": 43, "train.batch_size": 16, "model.dropout": 0, "data.random_flip": False,
            "train.optimizer": "sgd", "train.lr": 0.05, "sample.steps": 3, "train.epochs": 2, "wandb.log_every": 2}
TOL = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ranks")
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    folder = work / "data" / "cifar10"
    folder.mkdir(parents=True)
    np.save(folder / "train.npy", images[:48].numpy())
    np.save(folder / "test.npy", images[48:].numpy())
    (folder / "meta.json").write_text(json.dumps({"dataset": "cifar10", "source": "synthetic test images"}))
    return work


def run(work: Path, out: str, spec: dict, procs: int):
    return launch(spec, ["--config", str(ROOT / "config.yaml"), *overrides(SETTINGS), f"out_dir={out}"], cwd=work,
                  procs=procs)


def exit_codes(stderr: str) -> list[int]:
    """The workers' exit codes in torchrun's failure report."""
    return sorted(int(code) for code in re.findall(r"^\s+exitcode\s+:\s+(-?\d+)", stderr, re.M))


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_at_the_same_sync_and_the_run_resumes(work: Path) -> None:
    """SIGTERM reaches rank 1 alone, during step 3. Both processes finish the steps up to the next sync (step 4,
    wandb.log_every 2) and agree there to stop: the checkpoint at step 4 is written, both exit 143. (Had rank 1 gone
    alone, rank 0 would wait in step 5's gradient all-reduce for it, and no checkpoint of step 4 would exist.) The
    same command then trains the 2 steps left and ends where one uninterrupted process does."""
    spec = {"wrap": "train.train_step", "call": 3, "action": "signal", "signal": int(signal.SIGTERM), "rank": 1}
    p = run(work, "runs/stopped", spec, procs=2)
    assert p.returncode != 0
    # Both stop by agreement (143). tests/launcher.py holds each rank at exit until both are there: torchrun's agent
    # would otherwise end a rank still closing down once the other has exited (reported as -15).
    assert exit_codes(p.stderr) == [128 + signal.SIGTERM] * 2, p.stderr
    assert p.stderr.count("SIGTERM: finishing this step and writing a checkpoint") == 1, p.stderr
    assert checkpoint.load_checkpoint(work / "runs/stopped/checkpoint.pt")["step"] == 4
    for rank in (0, 1):
        (work / f"launcher.steps.{rank}").unlink(missing_ok=True)

    p = run(work, "runs/stopped", {}, procs=2)
    assert p.returncode == 0, p.stderr
    assert [launched_steps(work, rank) for rank in (0, 1)] == [2, 2]
    p = run(work, "runs/straight", {}, procs=1)
    assert p.returncode == 0, p.stderr
    resumed, straight = (checkpoint.load_checkpoint(work / f"runs/{name}/checkpoint.pt")
                         for name in ("stopped", "straight"))
    assert resumed["step"] == straight["step"] == 6
    assert max((resumed["model"][k] - v).abs().max().item() for k, v in straight["model"].items()) < TOL


@pytest.mark.slow
def test_a_non_finite_loss_in_one_process_stops_both_with_the_same_error(work: Path) -> None:
    """Rank 1's loss of step 2 is NaN (its gradient is not, so rank 0 sees nothing wrong on its own). At the sync
    after step 2, both processes find the first bad step of either and exit 1 with the same line. (Both lines
    show because tests/launcher.py holds the first rank to exit until the other has: otherwise torchrun's agent
    ends a slower rank before it prints, which on a loaded machine made this test fail.)"""
    spec = {"wrap": "ddpm.loss", "call": 2, "action": "nan", "rank": 1}
    p = run(work, "runs/nan", spec, procs=2)
    assert exit_codes(p.stderr) == [1, 1], p.stderr
    line = "error: non-finite loss or gradient at step 2; lower train.lr"
    assert p.stderr.count(line) == 2, p.stderr
    assert not (work / "runs/nan/checkpoint.pt").exists()


@pytest.mark.slow
def test_a_checkpoint_rank_0_cannot_write_stops_both_with_an_error(work: Path) -> None:
    """Rank 0's first checkpoint write fails (disk full). Every process learns it at once (Checkpointer.save
    agrees on the outcome) and exits 1 naming the checkpoint, instead of rank 1 going on into the next step's
    collective until torchrun's agent ends it, with nothing in its output about why."""
    spec = {"wrap": "train.save_checkpoint", "call": 1, "action": "disk-full", "rank": 0}
    t0 = time.perf_counter()
    p = run(work, "runs/full", spec, procs=2)
    took = time.perf_counter() - t0
    assert exit_codes(p.stderr) == [1, 1], p.stderr
    assert p.stderr.count("error: could not write runs/full/checkpoint.pt (") == 2, p.stderr
    assert "No space left on device" in p.stderr
    print(f"both ranks exited {took:.1f} s after the launch")

