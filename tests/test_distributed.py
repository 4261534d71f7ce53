"""DistributedDataParallel on CPU with gloo: 2 processes through torchrun train on exactly the single-process
run's batches, timesteps and noise, so the weights agree up to float reduction order, also when the last batch
of an epoch splits unevenly; checkpoints resume across world sizes and continue where they stopped; only rank 0
writes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint
from helpers import ROOT, TIMEOUT_S, TINY, child_env, launch, launched_steps, overrides

pytestmark = pytest.mark.slow
# SGD, no dropout, no flips: Adam would magnify float noise in near-zero gradients (see the issue). 43 images in
# batches of 16: 3 steps an epoch, the last one of 11 images, split 6 + 5 over 2 processes; each process's loss
# must be weighted by its share for DDP's gradient average to be the batch's mean.
SETTINGS = {**TINY, "data.subset": 43, "train.batch_size": 16, "model.dropout": 0, "data.random_flip": False,
            "train.optimizer": "sgd", "train.lr": 0.05, "sample.steps": 3}
STEPS_PER_EPOCH = 3
TOL = 1e-5  # max abs weight difference allowed from reduction order after 6 SGD steps


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with a small synthetic dataset prepared where train.py looks for it."""
    work = tmp_path_factory.mktemp("ddp")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48 + 16, 3, 32, 32), generator=gen, dtype=torch.uint8)
    folder = work / "data" / "cifar10"  # what `python data.py` writes; train.py only needs meta.json to exist
    folder.mkdir(parents=True)
    np.save(folder / "train.npy", images[:48].numpy())
    np.save(folder / "test.npy", images[48:].numpy())
    (folder / "meta.json").write_text('{"dataset": "cifar10", "source": "synthetic test images"}\n')
    return work


def train_run(work: Path, out: str, *changes: str, procs: int = 1) -> int:
    """python train.py (through the step-counting launcher) in `procs` processes; it must succeed. Returns the
    training steps it executed, the same on every rank."""
    p = launch({}, ["--config", str(ROOT / "config.yaml"), *overrides(SETTINGS), f"out_dir={out}", *changes],
               cwd=work, procs=procs)
    assert p.returncode == 0, p.stderr
    steps = [launched_steps(work, rank) for rank in range(procs)]
    assert len(set(steps)) == 1, steps
    return steps[0]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_match_one_and_resume_across_world_sizes(workdir: Path) -> None:
    # Reference: one process, two epochs (3 steps each).
    assert train_run(workdir, "runs/ref", "train.epochs=2") == 2 * STEPS_PER_EPOCH
    # Two processes for epoch 1 (with wandb on: one run, written by rank 0 alone), then one process for epoch 2.
    assert train_run(workdir, "runs/a", "train.epochs=1", "wandb.mode=offline", procs=2) == STEPS_PER_EPOCH
    assert len(list((workdir / "runs/a/wandb").glob("offline-run-*"))) == 1
    assert sorted(x.name for x in (workdir / "runs").iterdir()) == ["a", "ref"]  # one run folder
    history_a = load_checkpoint(workdir / "runs/a/checkpoint.pt")["history"]
    history_ref = load_checkpoint(workdir / "runs/ref/checkpoint.pt")["history"]
    assert history_a[0]["step"] == history_ref[0]["step"] == STEPS_PER_EPOCH
    assert history_a[0]["loss"] == pytest.approx(history_ref[0]["loss"], rel=1e-5)  # averaged over ranks
    # The resumes continue: they train only the epoch left (a restart would redo both and end at the same weights).
    assert train_run(workdir, "runs/a", "train.epochs=2", "wandb.mode=offline") == STEPS_PER_EPOCH
    # One process for epoch 1, then two processes for epoch 2.
    assert train_run(workdir, "runs/b", "train.epochs=1") == STEPS_PER_EPOCH
    assert train_run(workdir, "runs/b", "train.epochs=2", procs=2) == STEPS_PER_EPOCH

    w_ref = weights(workdir / "runs/ref/checkpoint.pt")
    assert max_diff(weights(workdir / "runs/a/checkpoint.pt"), w_ref) < TOL
    assert max_diff(weights(workdir / "runs/b/checkpoint.pt"), w_ref) < TOL
    assert load_checkpoint(workdir / "runs/b/checkpoint.pt")["step"] == 2 * STEPS_PER_EPOCH


def test_the_papers_settings_under_two_processes_are_reproducible_and_draw_their_own_dropout(workdir: Path) -> None:
    """Dropout 0.1, random flips and Adam (the paper's): two launches of 2 processes end at bitwise the same weights
    (reproducible per world size), and training matches one process in distribution, not bitwise: each process
    draws its own dropout masks (train.dropout_seed), where every rank once drew the same ones."""
    paper = ["model.dropout=0.1", "data.random_flip=true", "train.optimizer=adam", "train.lr=1e-3",
             "train.epochs=2"]
    for out in ("runs/p1", "runs/p2"):
        assert train_run(workdir, out, *paper, procs=2) == 2 * STEPS_PER_EPOCH
    assert train_run(workdir, "runs/p0", *paper) == 2 * STEPS_PER_EPOCH
    two, again, one = (load_checkpoint(workdir / f"runs/{o}/checkpoint.pt") for o in ("p1", "p2", "p0"))
    assert max_diff(two["model"], again["model"]) == 0
    assert max_diff(two["model"], one["model"]) > TOL  # other masks: not the same run as one process
    for a, b in zip(two["history"], one["history"]):  # but the same process: the same loss, within its noise
        assert a["loss"] == pytest.approx(b["loss"], rel=0.2)


def test_batch_not_divisible_by_world_size_is_refused_before_the_process_group(workdir: Path) -> None:
    # One worker alone, told it is rank 0 of 2: if it tried to set up the process group it would wait for
    # rank 1 until the timeout; it must exit 2 at once instead.
    env = child_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "config.yaml"),
                        *overrides(SETTINGS), "train.batch_size=15"], cwd=workdir, capture_output=True, text=True,
                       timeout=TIMEOUT_S, env=env)
    assert p.returncode == 2
    assert p.stderr.strip() == "error: train.batch_size: 15 is not divisible by the 2 processes"
    # Through torchrun, every worker says the same and torchrun reports exit code 2.
    p = launch({}, ["--config", str(ROOT / "config.yaml"), *overrides(SETTINGS), "out_dir=runs/never",
                    "train.batch_size=15"], cwd=workdir, procs=2)
    assert p.returncode != 0
    assert p.stderr.count("error: train.batch_size: 15 is not divisible by the 2 processes") == 2
    assert not (workdir / "runs/never").exists()
