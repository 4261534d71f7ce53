"""Reliability: a run killed at any moment, a corrupt or hostile file, a full disk or a bad setting loses nothing
and explains itself.

Each failure is injected for real where that is cheap (SIGKILL, SIGINT, SIGTERM to a `python train.py` process;
damaged and malicious checkpoint files; bad settings on the command line) and by monkeypatching one function
where it is not (a NaN loss, a full disk). Moments inside a process are made deterministic without test hooks in
the code: a launcher script wraps one project function so that its n-th call kills the process (see LAUNCHER).
"""
from __future__ import annotations

import csv
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import checkpoint
import config
import sample
import train
from checkpoint import load_checkpoint
from helpers import read_wandb_log, write_synthetic_cifar

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# A ~0.65M-parameter UNet, 32 synthetic images in batches of 8: 4 steps an epoch, ~0.3 s a step on one thread.
TINY = ["device=cpu", "data.dataset=cifar10", "data.subset=32", "train.batch_size=8", "model.channels=32",
        "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
        "diffusion.num_timesteps=50", "train.warmup_steps=0", "sample.num_images=4", "sample.steps=3",
        "wandb.mode=disabled"]
# 3 epochs of 4 steps, a checkpoint every 2 steps (and at each epoch's end), a sample grid every epoch.
RUN = [*TINY, "train.epochs=3", "train.checkpoint_every=2", "sample.every_epochs=1", "out_dir=runs/r"]
STEPS = 12
ENV = {**{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
       "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}

LAUNCHER = '''"""python launcher.py SPEC [train.py arguments]: train.main() with one function wrapped so that its
`call`-th call (counted only during the `inside_call`-th call of `inside`, if given) kills this process with
SIGKILL, or touches launcher.waiting and sleeps. Written by tests/test_reliability.py."""
import importlib, json, os, signal, sys, time
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["root"])
import train

state = {"inside": 0, "active": spec.get("inside") is None, "calls": 0}

def patch(dotted, make):
    module, name = dotted.rsplit(".", 1)
    module = importlib.import_module(module)
    setattr(module, name, make(getattr(module, name)))

def counting(real):
    def wrapper(*args, **kwargs):
        state["inside"] += 1
        state["active"] = state["inside"] == spec["inside_call"]
        try:
            return real(*args, **kwargs)
        finally:
            state["active"] = False
    return wrapper

def trigger(real):
    def wrapper(*args, **kwargs):
        if state["active"]:
            state["calls"] += 1
            if state["calls"] == spec["call"]:
                if spec["action"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                open("launcher.waiting", "w").close()
                time.sleep(120)
        return real(*args, **kwargs)
    return wrapper

if spec.get("inside"):
    patch(spec["inside"], counting)
patch(spec["wrap"], trigger)
train.main(sys.argv[2:])
'''


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dataset") / "cifar10"
    write_synthetic_cifar(folder, 32, 16)
    return folder


def new_work(folder: Path, dataset: Path) -> Path:
    """A working folder with the dataset where train.py looks for it (data/ and runs/ are relative)."""
    shutil.copytree(dataset, folder / "data" / "cifar10")
    return folder


@pytest.fixture
def work(tmp_path: Path, dataset: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # for the in-process runs
    return new_work(tmp_path, dataset)


def command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "config.yaml"), *args]


def run(work: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=work, capture_output=True, text=True, timeout=timeout, env=ENV)


def start(work: Path, argv: list[str], env: dict | None = None) -> subprocess.Popen:
    """A background process whose stderr goes to work/stderr.txt (a pipe could fill up and block it)."""
    err = open(work / "stderr.txt", "w")
    p = subprocess.Popen(argv, cwd=work, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env or ENV)
    err.close()
    return p


def launch(work: Path, spec: dict, *args: str) -> subprocess.Popen:
    (work / "launcher.py").write_text(LAUNCHER)
    spec = {"root": str(ROOT), "action": "kill", "inside": None, "inside_call": 0, **spec}
    return start(work, [sys.executable, str(work / "launcher.py"), json.dumps(spec), *command(*args)[2:]])


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before it was due to"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def shown(stderr: str) -> list[str]:
    """The lines a terminal ends up showing: each line's text after its last carriage return, without the
    progress bars (tqdm redraws them with \\r) and blank lines."""
    last = (line.rsplit("\r", 1)[-1].strip() for line in stderr.split("\n"))
    return [s for s in last if s and not (s.startswith("epoch ") and "step/s]" in s)]


def one_line(stderr: str) -> str:
    lines = shown(stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def temps(out: Path) -> list[Path]:
    return [*out.glob(".*.tmp"), *out.glob("samples/.*.tmp")]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def assert_equal(a, b, where: str) -> None:
    """Bitwise equality of nested dicts, lists and tensors."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(out: Path, ref: Path) -> None:
    """`out` holds what the uninterrupted run `ref` wrote, bitwise, except the timings; and no temporary files."""
    a, b = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(ref / "checkpoint.pt")
    for key in ("model", "ema", "optimizer", "scaler", "step", "epoch", "data", "rng", "sums", "config"):
        assert_equal(a[key], b[key], key)
    timing = ("images_per_sec", "wall_time_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in a["history"]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in b["history"]]
    grids = sorted(p.name for p in (ref / "samples").iterdir())
    assert grids == sorted(p.name for p in (out / "samples").iterdir()) == \
        [f"epoch_{e:03d}.png" for e in range(1, 4)]
    for name in grids:
        assert (out / "samples" / name).read_bytes() == (ref / "samples" / name).read_bytes(), name
    def history(d: Path) -> list[tuple]:
        return [(r["step"], r["loss"], r["ema_loss"]) for r in read_csv(d / "history.csv")]

    def metrics(d: Path) -> dict:
        return {k: v for k, v in json.loads((d / "metrics.json").read_text()).items() if k not in timing}
    assert history(out) == history(ref) and metrics(out) == metrics(ref)
    assert not temps(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset: Path) -> Path:
    """The uninterrupted run that every interrupted one must reproduce."""
    work = new_work(tmp_path_factory.mktemp("reference"), dataset)
    result = run(work, *RUN)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(work / "runs/r/checkpoint.pt")["step"] == STEPS
    return work / "runs/r"


# ---------------------------------------------------------------- SIGKILL at three moments

# moment: the wrapped function and which call of it kills; the checkpoint step on disk at that moment.
KILLS = {
    # step 7: the optimizer has stepped, the EMA not yet; the last checkpoint is mid-epoch 2 (step 6).
    "mid-step": ({"wrap": "train.ema_update", "call": 7}, 6),
    # step 6's checkpoint (the 4th write: steps 2, 4, end of epoch 1, 6): its temp file is complete, not renamed.
    "checkpoint-write": ({"wrap": "os.replace", "call": 1, "inside": "train.save_checkpoint", "inside_call": 4}, 4),
    # epoch 2's sample grid, at its 2nd of 3 denoising steps; step 8's checkpoint is written, history.csv is not.
    "sampling": ({"wrap": "ddpm.p_sample_step", "call": 5}, 8),
}


@pytest.mark.parametrize("moment", KILLS)
def test_sigkill_at_any_moment_then_the_same_command_equals_an_uninterrupted_run(moment: str, work: Path,
                                                                                   reference: Path) -> None:
    spec, on_disk = KILLS[moment]
    out = work / "runs/r"
    p = launch(work, spec, *RUN)
    assert p.wait(timeout=180) == -signal.SIGKILL, (work / "stderr.txt").read_text()
    state = load_checkpoint(out / "checkpoint.pt")  # the previous checkpoint stayed valid
    assert state["step"] == on_disk
    if moment == "checkpoint-write":
        (tmp,) = out.glob(".checkpoint.pt.*.tmp")  # killed after the temp file was written, before the rename
        assert torch.load(tmp, weights_only=True)["step"] == 6
    if moment == "sampling":
        assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_001.png"]
        assert [r["step"] for r in read_csv(out / "history.csv")] == ["4"]

    result = run(work, *RUN)  # the same command, no launcher
    assert result.returncode == 0, result.stderr
    assert_same_run(out, reference)


# ---------------------------------------------------------------- SIGINT, SIGTERM

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_checkpoints_and_exits_128_plus_signal(sig: signal.Signals, work: Path,
                                                                       reference: Path) -> None:
    out = work / "runs/r"
    # SIGINT with an offline wandb run: it must be closed with the exit code, not left dangling.
    logging = ["wandb.mode=offline"] if sig == signal.SIGINT else []
    env = {**ENV, **{v: str(work / "wandb-home" / v.lower()) for v in
                     ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")}}
    p = start(work, command(*RUN, *logging), env)
    wait_for(lambda: (out / "checkpoint.pt").exists(), p)
    p.send_signal(sig)
    assert p.wait(timeout=120) == 128 + sig
    stderr = (work / "stderr.txt").read_text()
    assert shown(stderr) == [f"{sig.name}: finishing this step and writing a checkpoint (again to quit at once)"], \
        stderr
    state = load_checkpoint(out / "checkpoint.pt")
    assert 2 < state["step"] < STEPS  # a checkpoint written on the way out, not just the step-2 one
    assert not temps(out)
    if logging:
        (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
        exits = [r.exit.exit_code for r in read_wandb_log(log) if r.WhichOneof("record_type") == "exit"]
        assert exits == [128 + sig]

    result = run(work, *RUN)
    assert result.returncode == 0, result.stderr
    assert_same_run(out, reference)


def test_a_second_sigint_quits_at_once(work: Path) -> None:
    # Step 3 hangs (the launcher sleeps 120 s in it), so only the second SIGINT can end the run in time.
    p = launch(work, {"wrap": "train.ema_update", "call": 3, "action": "sleep"}, *RUN)
    wait_for(lambda: (work / "launcher.waiting").exists(), p)
    p.send_signal(signal.SIGINT)
    wait_for(lambda: "finishing this step" in (work / "stderr.txt").read_text(), p)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 130
    assert time.monotonic() - t0 < 10
    assert "Traceback" not in (work / "stderr.txt").read_text()
    assert load_checkpoint(work / "runs/r/checkpoint.pt")["step"] == 2  # the last one written stays usable


# ---------------------------------------------------------------- corrupt, foreign and malicious checkpoints

class Evil:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]), "corrupt"),
    "random-bytes": (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "corrupt"),
    "foreign-torch-file": (lambda p: torch.save({"a": 1}, p), "not a checkpoint of this project"),
    "other-architecture": (None, "model.channels"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_unusable_checkpoint_exits_2_in_one_line_and_is_left_as_it_is(damage: str, work: Path,
                                                                       reference: Path) -> None:
    change, what = DAMAGE[damage]
    ckpt = work / "runs/r/checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(reference / "checkpoint.pt", ckpt)
    args = [*RUN, "model.channels=64"] if change is None else RUN  # written with 32 channels, asked for 64
    if change:
        change(ckpt)
    before = snapshot(work)
    result = run(work, *args)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "runs/r/checkpoint.pt" in line and what in line and "--fresh" in line, line
    assert snapshot(work) == before  # not overwritten, nothing else created

    if damage == "other-architecture":
        result = run(work, *args, "train.epochs=1", "--fresh")
        assert result.returncode == 0, result.stderr
        assert load_checkpoint(ckpt)["config"]["model"]["channels"] == 64


def test_checkpoint_that_would_run_code_is_refused_without_running_it(work: Path, capsys) -> None:
    marker = work / "pwned"
    ckpt = work / "runs/r/checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"format": checkpoint.FORMAT, "model": Evil(marker)}, ckpt)
    torch.load(ckpt, weights_only=False)["model"].close()  # the file is a real exploit for an unsafe loader
    assert marker.exists()
    marker.unlink()
    before = snapshot(work)

    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(ROOT / "config.yaml"), *RUN])
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert "runs/r/checkpoint.pt" in line and "io.open" in line and "--fresh" in line and "\x1b" not in line
    with pytest.raises(SystemExit) as e:
        sample.main(["--checkpoint", str(ckpt), "--out", "s.png"])
    assert e.value.code == 2 and "io.open" in one_line(capsys.readouterr().err)
    assert not marker.exists()
    assert snapshot(work) == before


# ---------------------------------------------------------------- non-finite loss

def nan_from_step(monkeypatch, bad: int) -> None:
    """Every training loss from step `bad` on is NaN (the EMA loss, computed without grad, is left alone)."""
    real, calls = train.ddpm.loss, [0]

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] >= bad:
                return value * float("nan")
        return value
    monkeypatch.setattr(train.ddpm, "loss", loss)


@pytest.mark.parametrize("changes, bad, kept", [
    (["wandb.log_every=1"], 3, 2),  # found at step 3's log
    ([], 3, 2),  # found before step 4's checkpoint
    (["train.checkpoint_every=100"], 6, 4),  # found at epoch 2's end, before its metrics, grid and checkpoint
], ids=["at-a-log", "at-a-checkpoint", "at-an-epoch-end"])
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(changes: list[str], bad: int,
                                                                                 kept: int, work: Path,
                                                                                 monkeypatch) -> None:
    cfg = config.load_config(ROOT / "config.yaml", [*RUN, *changes])
    nan_from_step(monkeypatch, bad)
    with pytest.raises(train.TrainError, match=rf"non-finite loss or gradient at step {bad}; "
                                               rf"runs/r/checkpoint.pt \(step {kept}\) is kept"):
        train.train(cfg, progress=False)
    state = load_checkpoint(work / "runs/r/checkpoint.pt")
    assert state["step"] == kept
    for key in ("model", "ema"):
        assert all(v.isfinite().all() for v in state[key].values()), key
    assert all(v.isfinite().all() for s in state["optimizer"]["state"].values() for v in s.values())
    # Nothing from the bad steps anywhere: metrics, history and grids stop at the last good epoch.
    epochs = kept // 4
    if epochs:
        assert json.loads((work / "runs/r/metrics.json").read_text())["step"] == kept
        assert [r["step"] for r in read_csv(work / "runs/r/history.csv")] == ["4"]
    else:
        assert not (work / "runs/r/metrics.json").exists() and not (work / "runs/r/history.csv").exists()
    assert sorted(p.name for p in (work / "runs/r/samples").iterdir()) == \
        [f"epoch_{e:03d}.png" for e in range(1, epochs + 1)]


def test_non_finite_loss_exits_1_in_one_line(work: Path, monkeypatch, capsys) -> None:
    nan_from_step(monkeypatch, 3)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(ROOT / "config.yaml"), *RUN])
    assert e.value.code == 1
    assert "non-finite loss or gradient at step 3" in one_line(capsys.readouterr().err)


# ---------------------------------------------------------------- full disk, unwritable or unsafe out_dir

# file: (train's function that writes it, which of its writes finds the disk full, the checkpoint step kept)
FULL = {"checkpoint.pt": ("save_checkpoint", 2, 2),  # step 4's checkpoint
        "history.csv": ("atomic_write", 1, 4)}  # epoch 1's history, after step 4's checkpoint


@pytest.mark.parametrize("target", FULL)
def test_full_disk_exits_1_in_one_line_and_keeps_the_last_checkpoint(target: str, work: Path, monkeypatch,
                                                                     capsys) -> None:
    # The disk is found full when the temp file is flushed: the OSError atomic_write really sees, mid-write.
    name, nth, kept = FULL[target]
    real_write, real_fsync = getattr(train, name), os.fsync
    writing = {"n": 0, "full": False}

    def write(path, *args):
        writing["n"] += Path(path).name == target
        writing["full"] = Path(path).name == target and writing["n"] == nth
        try:
            return real_write(path, *args)
        finally:
            writing["full"] = False

    def fsync(fd):
        if writing["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(train, name, write)
    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(ROOT / "config.yaml"), *RUN])
    assert e.value.code == 1
    line = one_line(capsys.readouterr().err)
    assert "No space left on device" in line and f"runs/r/checkpoint.pt (step {kept}) is kept" in line, line
    assert load_checkpoint(work / "runs/r/checkpoint.pt")["step"] == kept
    assert not temps(work / "runs/r")


@pytest.mark.parametrize("out_dir", ["blocker/run", "../escaped", "runs/../../escaped", "ABSOLUTE"])
def test_out_dir_that_cannot_or_must_not_be_written_exits_2_before_anything_is_created(out_dir: str, work: Path,
                                                                                       capsys) -> None:
    (work / "blocker").write_text("a file where out_dir needs a folder")
    out_dir = str(work.parent / f"{work.name}-absolute") if out_dir == "ABSOLUTE" else out_dir
    outside = {p.name for p in work.parent.iterdir()}
    before = snapshot(work)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(ROOT / "config.yaml"), *RUN, f"out_dir={out_dir}"])
    assert e.value.code == 2
    assert "out_dir" in one_line(capsys.readouterr().err)
    assert snapshot(work) == before and {p.name for p in work.parent.iterdir()} == outside


# ---------------------------------------------------------------- hostile settings

KEYS = sorted(config.flatten(config.to_dict(config.Config())))

# tests/test_config.py feeds load_config random documents, override strings and the usual refusals (unknown keys,
# wrong types, folders, undecodable files, CUDA or fp16 without a GPU, sample.steps above T, channels the UNet
# refuses). Here: what it does not draw: integers far beyond int64 and float range, nesting thousands deep, and
# alias bombs, for every key; and that each answer comes fast.
huge_ints = st.integers() | st.integers(2**63 - 2, 2**63 + 2) | st.sampled_from([-2**63 - 1, 10**400, -10**400,
                                                                                2**1024, 2**1024 - 1])
values = st.recursive(st.none() | st.booleans() | huge_ints | st.floats() | st.text(max_size=20),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=3), max_leaves=8)


def assert_config_or_one_line_error(path, overrides) -> None:
    t0 = time.monotonic()
    try:
        cfg = config.load_config(path, overrides)
    except config.ConfigError as e:
        assert str(e) and len(str(e).splitlines()) == 1, str(e)[:2000]
    else:
        assert isinstance(cfg, config.Config)
    assert time.monotonic() - t0 < 5


@settings(max_examples=300)
@given(st.sampled_from(KEYS), values)
@example("train.lr", 10**400)
@example("diffusion.beta_end", -2**1024)
@example("seed", 2**64)
@example("seed", "[" * 5000)
@example("model.channel_mult", [[[[[[1]]]]]])
def test_any_value_for_any_key_gives_a_config_or_a_one_line_error(key: str, value) -> None:
    text = value if isinstance(value, str) else json.dumps(value)  # JSON is YAML
    assert_config_or_one_line_error(None, [f"{key}={text}"])


def alias_bomb(levels: int) -> str:
    """A few hundred bytes of YAML whose value, written out, is 10**levels integers long."""
    doc = "seed: [&a0 [1,1,1,1,1,1,1,1,1,1]"
    for i in range(1, levels):
        doc += f", &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]"
    return doc + "]\n"


@pytest.mark.parametrize("text", ["[" * 5000, "a: " * 5000, "{" * 5000 + "}" * 5000, "- " * 5000 + "1",
                                  alias_bomb(12), "train:\n  lr: 1" + "0" * 400 + "\n",
                                  "seed: !!python/object/apply:os.system ['touch pwned']\n"],
                         ids=["5000-lists", "5000-mappings", "5000-flow-mappings", "5000-block-lists", "alias-bomb",
                              "lr-10**400", "python-tag"])
def test_hostile_config_file_gives_a_one_line_error_quickly(text: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text(text)
    t0 = time.monotonic()
    with pytest.raises(config.ConfigError) as e:
        config.load_config("c.yaml")
    assert time.monotonic() - t0 < 5 and len(str(e.value).splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


CLI_CASES = {  # name: (arguments after TINY, how the run must end: 0, or a fragment of the one error line)
    "text-override": (["]\n[{\u202e:", "train.lr=\x1b[31m"], "error: "),
    "deeply-nested-override": (["seed=" + "[" * 5000], "seed"),
    "lr-beyond-float": (["train.lr=1" + "0" * 400], "train.lr"),
    "model-beyond-memory": ([f"model.channels={2**40}"], "model"),
    "bf16-on-cpu-runs": (["train.precision=bf16", "train.epochs=1", "data.subset=8", "sample.every_epochs=0"], 0),
}


def test_cli_ends_in_exit_0_or_one_line_and_exit_2_and_a_refused_run_writes_nothing(tmp_path: Path,
                                                                                     dataset: Path) -> None:
    def one(name: str) -> tuple[str, subprocess.CompletedProcess, dict, dict]:
        folder = new_work(tmp_path / name, dataset)
        (folder / "undecodable.yaml").write_bytes(b"seed: \xff\xfe\n")
        args, _ = CLI_CASES[name]
        before = snapshot(folder)
        argv = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "config.yaml"), *TINY, *args]
        result = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=120, env=ENV)
        return name, result, before, snapshot(folder)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # ~3 s of imports each: overlap them
        results = list(pool.map(one, CLI_CASES))
    for name, result, before, after in results:
        expected = CLI_CASES[name][1]
        if expected == 0:
            assert result.returncode == 0, (name, result.stderr)
            assert "Traceback" not in result.stderr
            continue
        assert result.returncode == 2, (name, result.stderr)
        assert expected in one_line(result.stderr), (name, result.stderr)
        assert after == before, name
