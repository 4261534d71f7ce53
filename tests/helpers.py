"""Shared by test_train.py and test_config.py: tiny settings, tiny datasets on disk, running the CLIs, and reading
back what a run wrote (PNG grids, the offline wandb run's transaction log)."""
from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import config

ROOT = Path(__file__).resolve().parent.parent

# A ~0.65M-parameter UNet on 32x32 images with 100 timesteps: a step of 8 images takes ~0.1 s on one CPU thread.
TINY = {
    "device": "cpu", "out_dir": "runs/tiny",
    "data.dataset": "cifar10", "data.subset": 12,
    "model.channels": 32, "model.channel_mult": [1, 2], "model.num_res_blocks": 1, "model.attn_resolutions": [],
    "diffusion.num_timesteps": 100,
    "train.epochs": 1, "train.batch_size": 8, "train.lr": 1e-3, "train.warmup_steps": 0,
    "sample.every_epochs": 0, "sample.num_images": 4, "sample.steps": 5,
    "wandb.mode": "disabled",
}


def overrides(settings: dict) -> list[str]:
    """{'train.lr': 1e-3, 'model.attn_resolutions': []} -> ['train.lr=0.001', 'model.attn_resolutions=[]']
    (JSON is YAML, so every value reads back as itself)."""
    return [f"{k}={json.dumps(v)}" for k, v in settings.items()]


def tiny_config(**changes) -> config.Config:
    """TINY with `changes` (dotted keys, passed as a dict: tiny_config(**{'train.lr': 1e-4}))."""
    return config.load_config(None, overrides({**TINY, **changes}))


def write_synthetic_cifar(folder: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """A CIFAR-10-format dataset folder (uint8 (N, 3, 32, 32) train.npy/test.npy, meta.json) of smooth random
    colour waves: structured enough for a denoiser to learn something in a few steps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    def images(n: int) -> np.ndarray:
        f = rng.uniform(0.5, 3.0, (n, 3, 2, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, (n, 3, 1, 1))
        waves = np.sin(2 * np.pi * (f[:, :, 0] * xx + f[:, :, 1] * yy) + phase)
        return np.round(127.5 + 127.5 * waves).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    train, test = images(n_train), images(n_test)
    np.save(folder / "train.npy", train)
    np.save(folder / "test.npy", test)
    meta = {"dataset": "cifar10", "layout": "uint8 NCHW", "source": "synthetic (tests/helpers.py)",
            "train_shape": list(train.shape), "test_shape": list(test.shape)}
    (folder / "meta.json").write_text(json.dumps(meta))


def write_small_idx(src: Path, dst: Path, counts: dict[str, int]) -> None:
    """Copy the first `counts[name]` records of each gzipped IDX file in `src` into a plain IDX file in `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name, n in counts.items():
        raw = gzip.decompress((src / f"{name}.gz").read_bytes())
        magic = struct.unpack(">I", raw[:4])[0]
        ndim = magic - 2048
        shape = list(struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim]))
        record = int(np.prod(shape[1:]))
        shape[0] = n
        (dst / name).write_bytes(struct.pack(f">I{ndim}I", magic, *shape)
                                 + raw[4 + 4 * ndim:4 + 4 * ndim + n * record])


def link_datasets(cwd: Path, datasets: dict[str, Path]) -> None:
    """Make `cwd/data/<name>` point at each prepared dataset folder (train.py reads data/ in its cwd)."""
    (cwd / "data").mkdir(exist_ok=True)
    for name, folder in datasets.items():
        (cwd / "data" / name).symlink_to(folder, target_is_directory=True)


def run_cli(script: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python ROOT/script args` in `cwd` (the script's folder is first on sys.path, as for a user). One CPU thread,
    as in-process (conftest.py): next to a busy test process, OpenMP threads spinning on 2 cores slow a tiny
    model's sampling down ~30x."""
    env = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_error_line(stderr: str) -> str:
    """The single line a CLI leaves on the terminal for a bad input; fails on tracebacks, warnings or extra lines.
    A progress bar redraws its line with carriage returns and clears it when it closes: only the text after a
    line's last carriage return stays visible."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in stderr.split("\n")]
    lines = [line for line in lines if line]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def decode_png(path: Path) -> torch.Tensor:
    """uint8 (C, H, W) pixels of a PNG file (fails if it is not one)."""
    from torchvision.io import decode_png as decode
    raw = Path(path).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def grid_side(n_images: int, size: int = 32, padding: int = 2) -> tuple[int, int]:
    """(height, width) of checkpoint.image_grid for n images: nrow = floor(sqrt(n)), 2-pixel borders."""
    cols = min(max(1, int(n_images ** 0.5)), n_images)
    rows = -(-n_images // cols)
    return rows * (size + padding) + padding, cols * (size + padding) + padding


def read_wandb_log(path: Path) -> list:
    """The records of a `run-*.wandb` transaction log, as wandb_internal_pb2.Record messages.

    The format is LevelDB's log: a 7-byte file header (':W&B', magic 0xBEE1, version 0), then 32 KiB blocks of
    chunks, each with a 7-byte header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last);
    a block's last < 7 bytes are zero padding. wandb 0.31 has no Python reader for it (its core is in Go)."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw = Path(path).read_bytes()
    assert raw[:7] == b":W&B\xe1\xbe\x00", raw[:7]
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        assert kind in (1, 2, 3, 4), f"chunk type {kind} at byte {pos}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records
