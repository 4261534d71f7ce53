"""What several test modules share, defined once: tiny settings, tiny datasets and archives on disk, running the CLIs
and reading what they print, comparing two runs, reading back what a run wrote (PNG grids, the offline wandb run's
transaction log), keeping wandb away from the home folder, a malicious pickle, the float64 references of the DDPM
math with the Gaussian sampler oracle, a tiny feature extractor and checkpoint for evaluation, coverage paused
while torch.compile compiles, and `require` for optional packages.
No test module imports another test module. tests/launcher.py is the script that runs train.py with one function
wrapped (a kill, a signal or a hang at a chosen call) and counts the training steps a run executes."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import config
import ddpm

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "launcher.py"

# The tiny UNet every end-to-end test trains: ~0.65M parameters; a step of 8 32x32 images takes ~0.1 s on one thread.
TINY_MODEL = {"model.channels": 32, "model.channel_mult": [1, 2], "model.num_res_blocks": 1,
              "model.attn_resolutions": []}
# A whole tiny run: 12 images in batches of 8 (two steps an epoch, the second one partial), 100 timesteps.
TINY = {
    "device": "cpu", "out_dir": "runs/tiny",
    "data.dataset": "cifar10", "data.subset": 12, **TINY_MODEL,
    "diffusion.num_timesteps": 100,
    "train.epochs": 1, "train.batch_size": 8, "train.lr": 1e-3, "train.warmup_steps": 0,
    "sample.every_epochs": 0, "sample.num_images": 4, "sample.steps": 5,
    "wandb.mode": "disabled",
}


# ---------------------------------------------------------------- settings

def overrides(settings: dict) -> list[str]:
    """{'train.lr': 1e-3, 'model.attn_resolutions': []} -> ['train.lr=0.001', 'model.attn_resolutions=[]']
    (JSON is YAML, so every value reads back as itself)."""
    return [f"{k}={json.dumps(v)}" for k, v in settings.items()]


def nest(settings: dict) -> dict:
    """{'train.lr': 1e-3} -> {'train': {'lr': 1e-3}}: dotted keys as config.yaml's sections."""
    out: dict = {}
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def tiny_config(**changes) -> config.Config:
    """TINY with `changes` (dotted keys, passed as a dict: tiny_config(**{'train.lr': 1e-4}))."""
    return config.load_config(None, overrides({**TINY, **changes}))


def write_config(cfg: config.Config | dict, path: str | Path = "c.yaml") -> str:
    """A config file holding `cfg` (a Config, or a nested dict of some sections); returns its path."""
    path = Path(path)
    path.write_text(yaml.safe_dump(config.to_dict(cfg) if isinstance(cfg, config.Config) else cfg, sort_keys=False))
    return str(path)


# ---------------------------------------------------------------- datasets and archives

def write_synthetic_cifar(folder: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """A CIFAR-10-format dataset folder (uint8 (N, 3, 32, 32) train.npy/test.npy, meta.json) of smooth random
    colour waves: structured enough for a denoiser to learn something in a few steps. The seed is in meta.json,
    as a prepared dataset's source checksums are: other images, other meta.json."""
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
    meta = {"dataset": "cifar10", "layout": "uint8 NCHW", "source": f"synthetic (tests/helpers.py, seed {seed})",
            "train_shape": list(train.shape), "test_shape": list(test.shape)}
    (folder / "meta.json").write_text(json.dumps(meta))


def link_datasets(cwd: Path, datasets: dict[str, Path]) -> None:
    """Make `cwd/data/<name>` point at each prepared dataset folder (train.py reads data/ in its cwd)."""
    (cwd / "data").mkdir(exist_ok=True)
    for name, folder in datasets.items():
        (cwd / "data" / name).symlink_to(folder, target_is_directory=True)


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def make_cifar_archive(path: Path, *, seed: int = 0, n: int = 6, omit: str = "",
                       extra: tuple[tuple[str, bytes], ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10-format tar.gz of random images, n per train batch; returns the (N, 3072) train and test rows. Each
    image's label is its first byte mod 10."""
    rng = np.random.default_rng(seed)
    rows = {f"data_batch_{i}": rng.integers(0, 256, (n, 3072), dtype=np.uint8) for i in range(1, 6)}
    rows["test_batch"] = rng.integers(0, 256, (n + 4, 3072), dtype=np.uint8)
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, blob: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        add("cifar-10-batches-py/batches.meta",
            pickle.dumps({b"label_names": [b"airplane", b"automobile"], b"num_cases_per_batch": n}, protocol=3))
        for name, x in rows.items():
            if name == omit:
                continue
            blob = pickle.dumps({b"batch_label": name.encode(), b"labels": (x[:, 0] % 10).tolist(),  # label: 1st byte
                                 b"data": x, b"filenames": [b"img%d.png" % i for i in range(len(x))]}, protocol=3)
            if name == "data_batch_1":  # the real archive's pickles were written by numpy < 2, with this name
                assert b"cnumpy._core.multiarray\n" in blob
                blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            add(f"cifar-10-batches-py/{name}", blob)
        for name, blob in extra:
            add(name, blob)
    return np.concatenate([rows[f"data_batch_{i}"] for i in range(1, 6)]), rows["test_batch"]


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


class RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ---------------------------------------------------------------- processes and what they print

def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child python: one OpenMP thread (as in-process, conftest.py: next to a busy test
    process, threads spinning on 2 cores slow a tiny model down ~30x), wandb quiet, the project importable,
    and no torchrun variables inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT), **extra}


# A child process that runs longer than this has hung: the slowest one measured, a torchrun launch of
# tests/test_distributed.py, took 19.5 s with two copies of the torchrun and kill-and-resume tests running side by
# side (and other jobs) on a 2-core AMD EPYC.
TIMEOUT_S = 300


def run_python(argv: list[str], *, cwd: Path, timeout: float = TIMEOUT_S, env: dict | None = None) \
        -> subprocess.CompletedProcess:
    """`python argv` in `cwd`. Output is decoded here rather than in text mode, which would turn the carriage
    returns of a progress bar into line breaks and hide what a terminal really shows."""
    p = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, timeout=timeout, env=env or child_env())
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(errors="replace"),
                                       p.stderr.decode(errors="replace"))


def run_cli(script: str, *args: str, cwd: Path, timeout: float = TIMEOUT_S, env: dict | None = None) \
        -> subprocess.CompletedProcess:
    """`python ROOT/script args` in `cwd`, as a user runs it."""
    return run_python([str(ROOT / script), *args], cwd=cwd, timeout=timeout, env=env)


def launch(spec: dict, args: list[str], *, cwd: Path, procs: int = 1, timeout: float = TIMEOUT_S,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """train.py's main(args) through tests/launcher.py with `spec` (see there), in `procs` processes (torchrun)."""
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    try:
        return run_python([*runner, str(LAUNCHER), json.dumps(spec), *args], cwd=cwd, timeout=timeout, env=env)
    finally:
        for marker in Path(cwd).glob("launcher.done.*"):  # the ranks' meeting point at exit (tests/launcher.py)
            marker.unlink()


def launched_steps(cwd: Path, rank: int = 0) -> int:
    """The training steps (train.train_step calls) that the launcher's last run in `cwd` executed, by rank; the
    file is removed, so the next run reports afresh."""
    path = cwd / f"launcher.steps.{rank}"
    steps = int(path.read_text())
    path.unlink()
    return steps


def visible_lines(stderr: str) -> list[str]:
    """The non-blank lines a terminal ends up showing: a progress bar redraws its line after carriage returns and
    clears it when it closes, so only the text after a line's last carriage return stays visible."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in stderr.split("\n")]
    return [line for line in lines if line]


def one_error_line(stderr: str) -> str:
    """The single line a CLI leaves on the terminal for a bad input; fails on tracebacks, warnings, a leftover
    progress bar or any other extra line."""
    lines = visible_lines(stderr)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


# ---------------------------------------------------------------- what a run wrote

def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes (None for a folder) under `folder`, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def temps(out: Path) -> list[Path]:
    """Temporary files an interrupted atomic write left in a run folder."""
    return [*out.glob(".*.tmp"), *out.glob("samples/.*.tmp")]


def flat_weights(state_dict: dict) -> torch.Tensor:
    return torch.cat([v.detach().flatten().double() for v in state_dict.values()])


def initial_weights(state: dict, seed: int) -> torch.Tensor:
    """The weights train.py starts from (flat, float64): the UNet of the checkpoint's model_args, built right after
    seeding random stream 0 of `seed`."""
    import train
    from unet import UNet
    with torch.random.fork_rng(devices=[]):  # leave the caller's global generator alone
        torch.manual_seed(train.derive_seed(seed, 0))
        return flat_weights(UNet(**state["model_args"]).state_dict())


def assert_equal_nested(a, b, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_equal_nested(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


TIMINGS = ("images_per_sec", "wall_time_s")


def untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMINGS}


def assert_same_training(a: dict, b: dict) -> None:
    """Two checkpoints hold bitwise the same training state (everything but wall-clock times)."""
    for key in ("model", "ema", "optimizer", "scaler", "step", "epoch", "data", "rng", "sums", "config"):
        assert_equal_nested(a[key], b[key], key)
    assert [untimed(r) for r in a["history"]] == [untimed(r) for r in b["history"]]


def assert_same_run(out: Path, ref: Path) -> None:
    """The run folder `out` holds what `ref` holds, bitwise except the timings: the checkpoint's training state,
    history.csv, metrics.json and the sample grids; and no temporary files."""
    from checkpoint import load_checkpoint
    assert_same_training(load_checkpoint(out / "checkpoint.pt"), load_checkpoint(ref / "checkpoint.pt"))
    for name in ("history.csv", "metrics.json"):
        assert read_rows(out / name) == read_rows(ref / name), name
    grids = sorted(p.name for p in (ref / "samples").iterdir())
    assert grids == sorted(p.name for p in (out / "samples").iterdir())
    for name in grids:
        assert (out / "samples" / name).read_bytes() == (ref / "samples" / name).read_bytes(), name
    assert not temps(out)


def read_rows(path: Path) -> list[dict]:
    """history.csv's rows or metrics.json's one row, without the timings."""
    import csv
    if path.suffix == ".json":
        return [untimed(json.loads(path.read_text()))]
    return [untimed(r) for r in csv.DictReader(path.read_text().splitlines())]


def decode_png(path: Path) -> torch.Tensor:
    """uint8 (C, H, W) pixels of a PNG file (fails if it is not one)."""
    from torchvision.io import decode_png as decode
    raw = Path(path).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def grid_side(n_images: int, size: int = 32, padding: int = 2) -> tuple[int, int]:
    """(height, width) of sample.image_grid for n images: nrow = floor(sqrt(n)), 2-pixel borders."""
    cols = min(max(1, int(n_images ** 0.5)), n_images)
    rows = -(-n_images // cols)
    return rows * (size + padding) + padding, cols * (size + padding) + padding


# ---------------------------------------------------------------- wandb

WANDB_FOLDERS = ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")


def wandb_env(home: Path) -> dict[str, str]:
    """Environment variables that keep wandb's settings, caches and artifacts under `home`, not the user's ~."""
    return {var: str(home / var.lower()) for var in WANDB_FOLDERS}


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


# ---------------------------------------------------------------- the DDPM math's references and its oracle
# (test_ddpm.py, test_samplers.py). For data x0 ~ N(MU, S²) per pixel the exact ε-predictor is known in closed
# form (exact_eps_model), so a sampler's output law can be computed in float64 and checked against.

# Statistical tests accept |estimate - truth| <= Z standard errors. Z = 5 has a two-sided false-alarm rate of
# ~6e-7 per check, and every test uses a fixed generator seed, so the outcome is deterministic anyway.
Z = 5.0

T_PAPER = 1000
SCHEDULE = ddpm.make_schedule()  # the paper's: linear β from 1e-4 to 0.02, T = 1000


def reference_betas(num_timesteps: int, beta_start: float, beta_end: float, kind: str) -> np.ndarray:
    """β_t in float64, written independently of ddpm.py."""
    if kind == "linear":  # paper §4
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    # Nichol & Dhariwal eq. 17: ᾱ_t = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2), β_t = 1 - ᾱ_t / ᾱ_{t-1},
    # clipped at 0.999 (their §3.2). Here t runs 0..T and ddpm's β[t] is their β_{t+1}.
    s = 0.008
    f = [math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2 for t in range(num_timesteps + 1)]
    return np.array([min(1 - f[t + 1] / f[t], 0.999) for t in range(num_timesteps)])


def cumprod_prev(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ᾱ_t, ᾱ_{t-1}) in float64, with ᾱ before the first step = 1."""
    ac = np.cumprod(1.0 - betas)
    return ac, np.concatenate([[1.0], ac[:-1]])


REF_AC = cumprod_prev(reference_betas(T_PAPER, 1e-4, 0.02, "linear"))[0]


def toy_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An ε-predictor that depends on both x_t and t, so that other draws of either give other results."""
    return 0.5 * x_t + torch.sin(t.to(x_t.dtype)).reshape(-1, *[1] * (x_t.ndim - 1))


MU, S = 0.2, 0.3
ORACLE_SHAPE = (313, 1, 8, 8)  # 20,032 scalars, independent: the model and the noise act per pixel


def exact_eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[ε | x_t] for x0 ~ N(MU, S²); t are original timestep indices."""
    ac = torch.from_numpy(REF_AC)[t].reshape(-1, *[1] * (x.ndim - 1))
    return ((1 - ac).sqrt() * (x.double() - ac.sqrt() * MU) / (ac * S ** 2 + 1 - ac)).to(x.dtype)


def clamped_normal_moments(m: float, v: float, lo: float = -1.0, hi: float = 1.0) -> tuple[float, float]:
    """Mean and variance of clamp(X, lo, hi) for X ~ N(m, v): ddpm.sample clamps its output to [-1, 1]."""
    sd = math.sqrt(v)
    a, b = (lo - m) / sd, (hi - m) / sd
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    inside = cdf(b) - cdf(a)
    mean = lo * cdf(a) + hi * (1 - cdf(b)) + m * inside + sd * (pdf(a) - pdf(b))
    second = (lo ** 2 * cdf(a) + hi ** 2 * (1 - cdf(b)) + (m * m + v) * inside + 2 * m * sd * (pdf(a) - pdf(b))
              + v * (a * pdf(a) - b * pdf(b)))
    return mean, second - mean ** 2


def is_within_oracle(samples: torch.Tensor, law: tuple[float, float], z: float = Z) -> bool:
    """Sample mean and variance within z standard errors of the clamped law: √(v/n) for the mean, v √(2/(n-1))
    for the variance (the Gaussian value; clamping lowers the fourth moment, so this is conservative)."""
    mean, var = clamped_normal_moments(*law)
    n = samples.numel()
    return (abs(samples.mean().item() - mean) <= z * math.sqrt(var / n)
            and abs(samples.var().item() - var) <= z * var * math.sqrt(2 / (n - 1)))


# ---------------------------------------------------------------- evaluation (test_evaluate.py, test_samplers.py)

class TinyExtractor:
    """A fixed random conv net (its weights from a seeded generator): uint8 (B, 3, H, W) -> 16 pooled features
    and 10 logits, in float64. Counts the images it has seen."""

    def __init__(self, name: str = "tiny", seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(8, 3, 3, 3, generator=g, dtype=torch.float64) / 5
        self.w2 = torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64) / 8
        self.fc = torch.randn(16, 10, generator=g, dtype=torch.float64)
        self.name, self.seen = name, 0

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, images.shape
        self.seen += len(images)
        x = images.double() / 127.5 - 1.0
        h = F.relu(F.conv2d(F.relu(F.conv2d(x, self.w1, stride=2)), self.w2, stride=2))
        pool = h.mean(dim=(2, 3))
        return pool, pool @ self.fc * 4


UNET_ARGS = {**{key.split(".")[1]: value for key, value in TINY_MODEL.items()}, "in_channels": 3, "dropout": 0.0,
             "image_size": 32}  # the tiny end-to-end model, as a checkpoint's model_args


def make_checkpoint(path: Path, *, seed: int = 0, step: int = 100, num_timesteps: int = 20) -> Path:
    """A tiny checkpoint in train.py's format, made without train.py."""
    from checkpoint import save_checkpoint
    from unet import UNet
    torch.manual_seed(seed)
    model = UNet(**UNET_ARGS)
    with torch.no_grad():  # the output layer starts at zero: make the samples depend on the weights
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = config.to_dict(config.load_config(None, overrides(
        {**TINY_MODEL, "model.dropout": 0.0, "diffusion.num_timesteps": num_timesteps})))
    save_checkpoint(path, {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": {}, "step": step,
                           "epoch": 1, "config": cfg, "model_args": dict(UNET_ARGS)})
    return path


# ---------------------------------------------------------------- coverage

@contextlib.contextmanager
def coverage_paused():
    """Coverage off inside the block, when it is on (pytest's default --cov): for long work that runs none of the
    measured lines but many Python calls, which coverage's tracer slows all the same. torch.compile's first call
    (dynamo, inductor, sympy; dynamo reads our forward's bytecode, it does not run it): +50% CPU time for
    tests/test_fastpath.py's compiled step; training the Fashion-MNIST classifier (features.py): +6%."""
    try:
        import coverage
        cov = coverage.Coverage.current()
    except ImportError:
        cov = None
    if cov is not None:
        cov.stop()
    try:
        yield
    finally:
        if cov is not None:
            cov.start()


# ---------------------------------------------------------------- optional packages

def require(module: str):
    """Import an optional package that a test needs. Without it the test skips, except under CI (env CI set),
    where a missing package is a failure: CI installs requirements-dev.txt, and a test that silently skipped
    there would pass having checked nothing."""
    if os.environ.get("CI"):
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"CI is set and {module} cannot be imported ({e}); "
                        "pip install -r requirements-dev.txt")
    return pytest.importorskip(module)
