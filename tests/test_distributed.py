"""DistributedDataParallel on CPU with gloo: 2 processes through torchrun train on exactly the single-process
run's batches, timesteps and noise, so the weights agree up to float reduction order; checkpoints resume
across world sizes; only rank 0 writes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
# SGD, no dropout, no flips: Adam would magnify float noise in near-zero gradients (see the issue).
TINY = ["data.dataset=cifar10", "data.subset=48", "train.batch_size=16", "model.channels=32",
        "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]", "model.dropout=0",
        "data.random_flip=false", "train.optimizer=sgd", "train.lr=0.05", "train.warmup_steps=0",
        "diffusion.num_timesteps=100", "sample.num_images=4", "sample.steps=3", "wandb.mode=disabled"]
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


def launch(work: Path, out: str, *overrides: str, procs: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    cmd += [str(ROOT / "train.py"), "--config", str(ROOT / "config.yaml"), *TINY, f"out_dir={out}", *overrides]
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300, env=env)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_match_one_and_resume_across_world_sizes(workdir: Path) -> None:
    # Reference: one process, two epochs (3 steps each).
    ref = launch(workdir, "runs/ref", "train.epochs=2")
    assert ref.returncode == 0, ref.stderr
    # Two processes for epoch 1 (with wandb on: one run, written by rank 0 alone), then one process for epoch 2.
    p = launch(workdir, "runs/a", "train.epochs=1", "wandb.mode=offline", procs=2)
    assert p.returncode == 0, p.stderr
    assert len(list((workdir / "runs/a/wandb").glob("offline-run-*"))) == 1
    assert sorted(x.name for x in (workdir / "runs").iterdir()) == ["a", "ref"]  # one run folder
    history_a = load_checkpoint(workdir / "runs/a/checkpoint.pt")["history"]
    history_ref = load_checkpoint(workdir / "runs/ref/checkpoint.pt")["history"]
    assert history_a[0]["step"] == history_ref[0]["step"] == 3
    assert history_a[0]["loss"] == pytest.approx(history_ref[0]["loss"], rel=1e-5)  # averaged over ranks
    p = launch(workdir, "runs/a", "train.epochs=2", "wandb.mode=offline")
    assert p.returncode == 0, p.stderr
    # One process for epoch 1, then two processes for epoch 2.
    assert launch(workdir, "runs/b", "train.epochs=1").returncode == 0
    p = launch(workdir, "runs/b", "train.epochs=2", procs=2)
    assert p.returncode == 0, p.stderr

    w_ref = weights(workdir / "runs/ref/checkpoint.pt")
    assert max_diff(weights(workdir / "runs/a/checkpoint.pt"), w_ref) < TOL
    assert max_diff(weights(workdir / "runs/b/checkpoint.pt"), w_ref) < TOL
    assert load_checkpoint(workdir / "runs/b/checkpoint.pt")["step"] == 6


def test_batch_not_divisible_by_world_size_is_refused_before_the_process_group(workdir: Path) -> None:
    # One worker alone, told it is rank 0 of 2: if it tried to set up the process group it would wait for
    # rank 1 until the timeout; it must exit 2 at once instead.
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29555", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "config.yaml"), *TINY,
                        "train.batch_size=15"], cwd=workdir, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2
    assert p.stderr.strip() == "error: train.batch_size: 15 is not divisible by the 2 processes"
    # Through torchrun, every worker says the same and torchrun reports exit code 2.
    p = launch(workdir, "runs/never", "train.batch_size=15", procs=2)
    assert p.returncode != 0
    assert p.stderr.count("error: train.batch_size: 15 is not divisible by the 2 processes") == 2
    assert not (workdir / "runs/never").exists()
