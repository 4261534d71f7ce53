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
import re
import shutil
import signal
import subprocess
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
from helpers import (ROOT, TINY, RunsCode, assert_same_run, child_env, launch, launched_steps, one_error_line,
                     overrides, read_wandb_log, run_cli, snapshot, temps, visible_lines, wandb_env,
                     write_synthetic_cifar)

pytestmark = pytest.mark.slow

# TINY's model, 32 synthetic images in batches of 8: 4 steps an epoch, ~0.3 s a step on one thread. 3 epochs,
# a checkpoint every 2 steps (and at each epoch's end), a sample grid every epoch.
RUN = overrides({**TINY, "data.subset": 32, "diffusion.num_timesteps": 50, "sample.steps": 3, "train.epochs": 3,
                 "train.checkpoint_every": 2, "sample.every_epochs": 1, "out_dir": "runs/r"})
STEPS = 12
CONFIG = ["--config", str(ROOT / "config.yaml")]


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


def run(work: Path, *args: str) -> subprocess.CompletedProcess:
    """`python train.py --config config.yaml args` in `work`."""
    return run_cli("train.py", *CONFIG, *args, cwd=work)


def resume(work: Path, *args: str) -> int:
    """The same command again (through the launcher, which counts steps): it must succeed; returns the training
    steps it executed."""
    result = launch({}, [*CONFIG, *args], cwd=work)
    assert result.returncode == 0, result.stderr
    return launched_steps(work)


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset: Path) -> Path:
    """The uninterrupted run that every interrupted one must reproduce."""
    work = new_work(tmp_path_factory.mktemp("reference"), dataset)
    result = run(work, *RUN)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(work / "runs/r/checkpoint.pt")["step"] == STEPS
    assert sorted(p.name for p in (work / "runs/r/samples").iterdir()) == [f"epoch_{e:03d}.png" for e in (1, 2, 3)]
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
    result = launch({**spec, "action": "kill"}, [*CONFIG, *RUN], cwd=work)
    assert result.returncode == -signal.SIGKILL, result.stderr
    state = load_checkpoint(out / "checkpoint.pt")  # the previous checkpoint stayed valid
    assert state["step"] == on_disk
    if moment == "checkpoint-write":
        (tmp,) = out.glob(".checkpoint.pt.*.tmp")  # killed after the temp file was written, before the rename
        assert torch.load(tmp, weights_only=True)["step"] == 6
    if moment == "sampling":
        assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_001.png"]
        assert [r["step"] for r in read_csv(out / "history.csv")] == ["4"]

    # The same command resumes: only the steps after the checkpoint are trained (a restart from step 0 would end
    # at the same weights, training being deterministic), and the result is the uninterrupted run's.
    assert resume(work, *RUN) == STEPS - on_disk
    assert_same_run(out, reference)


# ---------------------------------------------------------------- SIGINT, SIGTERM

MESSAGE = "{}: finishing this step and writing a checkpoint (again to quit at once)"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_checkpoints_and_exits_128_plus_signal(sig: signal.Signals, work: Path,
                                                                       reference: Path) -> None:
    """The signal arrives during step 7 (sent from inside it: no race with the run's progress). The run finishes
    that step, writes a checkpoint at step 7, says so in one line and exits 128 + signal; the same command resumes."""
    out = work / "runs/r"
    # SIGINT with an offline wandb run: it must be closed with the exit code, not left dangling.
    logging = ["wandb.mode=offline"] if sig == signal.SIGINT else []
    spec = {"wrap": "train.train_step", "call": 7, "action": "signal", "signal": int(sig)}
    result = launch(spec, [*CONFIG, *RUN, *logging], cwd=work, env=child_env(**wandb_env(work / "wandb-home")))
    assert result.returncode == 128 + sig, result.stderr
    assert visible_lines(result.stderr) == [MESSAGE.format(sig.name)], result.stderr
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 7
    assert launched_steps(work) == 7
    assert not temps(out)
    if logging:
        (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
        exits = [r.exit.exit_code for r in read_wandb_log(log) if r.WhichOneof("record_type") == "exit"]
        assert exits == [128 + sig]

    assert resume(work, *RUN) == STEPS - 7
    assert_same_run(out, reference)


def test_a_second_sigint_quits_at_once(work: Path) -> None:
    """Two SIGINTs during step 3 (sent from inside it, the second once the first was handled): exit 130 at once,
    without finishing the step or writing a checkpoint; the last one written (step 2) stays usable."""
    spec = {"wrap": "train.ema_update", "call": 3, "action": "signal", "signal": int(signal.SIGINT), "times": 2}
    result = launch(spec, [*CONFIG, *RUN], cwd=work)
    assert result.returncode == 130, result.stderr
    # The message, then (a hard exit does not tidy up) at most the progress bar as it was drawn last.
    first, *rest = visible_lines(result.stderr)
    assert first == MESSAGE.format("SIGINT") and "Traceback" not in result.stderr, result.stderr
    # tqdm shows the rate as "2.50step/s" or, below one step a second (a slow or loaded machine), "1.25s/step".
    assert all(re.fullmatch(r"epoch 1/3:.*(step/s|s/step)\]", line) for line in rest), result.stderr
    assert load_checkpoint(work / "runs/r/checkpoint.pt")["step"] == 2
    assert not (work / "launcher.steps.0").exists()  # os._exit: the process ended inside step 3


# ---------------------------------------------------------------- corrupt, foreign and malicious checkpoints

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
    line = one_error_line(result.stderr)
    assert "runs/r/checkpoint.pt" in line and what in line and "--fresh" in line, line
    assert snapshot(work) == before  # not overwritten, nothing else created

    if damage == "other-architecture":
        result = run(work, *args, "train.epochs=1", "data.subset=8", "--fresh")  # one step is enough
        assert result.returncode == 0, result.stderr
        assert load_checkpoint(ckpt)["config"]["model"]["channels"] == 64


def test_checkpoint_that_would_run_code_is_refused_without_running_it(work: Path, capsys) -> None:
    marker = work / "pwned"
    ckpt = work / "runs/r/checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"format": checkpoint.FORMAT, "model": RunsCode(marker)}, ckpt)
    torch.load(ckpt, weights_only=False)["model"].close()  # the file is a real exploit for an unsafe loader
    assert marker.exists()
    marker.unlink()
    before = snapshot(work)

    with pytest.raises(SystemExit) as e:
        train.main([*CONFIG, *RUN])
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "runs/r/checkpoint.pt" in line and "io.open" in line and "--fresh" in line and "\x1b" not in line
    with pytest.raises(SystemExit) as e:
        sample.main(["--checkpoint", str(ckpt), "--out", "s.png"])
    assert e.value.code == 2 and "io.open" in one_error_line(capsys.readouterr().err)
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


def test_non_finite_loss_exits_1_in_one_error_line(work: Path, monkeypatch, capsys) -> None:
    nan_from_step(monkeypatch, 3)
    with pytest.raises(SystemExit) as e:
        train.main([*CONFIG, *RUN])
    assert e.value.code == 1
    assert "non-finite loss or gradient at step 3" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- full disk, unwritable or unsafe out_dir

# file: (train's function that writes it, which of its writes finds the disk full, the checkpoint step kept)
FULL = {"checkpoint.pt": ("save_checkpoint", 2, 2),  # step 4's checkpoint
        "history.csv": ("atomic_write", 1, 4)}  # epoch 1's history, after step 4's checkpoint


@pytest.mark.parametrize("target", FULL)
def test_full_disk_exits_1_in_one_line_keeps_the_last_checkpoint_and_the_same_command_resumes(
        target: str, work: Path, reference: Path, monkeypatch, capsys) -> None:
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
        train.main([*CONFIG, *RUN])
    assert e.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and f"runs/r/checkpoint.pt (step {kept}) is kept" in line, line
    assert load_checkpoint(work / "runs/r/checkpoint.pt")["step"] == kept
    assert not temps(work / "runs/r")

    # Space is freed: the same command continues from the checkpoint kept and ends where an uninterrupted run does.
    monkeypatch.undo()
    monkeypatch.chdir(work)
    steps, real_step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda *args, **kwargs: steps.append(1) or real_step(*args, **kwargs))
    train.main([*CONFIG, *RUN])
    assert len(steps) == STEPS - kept
    assert_same_run(work / "runs/r", reference)


def test_full_disk_at_start_up_exits_1_in_one_line_and_writes_nothing(work: Path, monkeypatch, capsys) -> None:
    """The disk is already full: the first file written (config.resolved.yaml) fails at its flush."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    with pytest.raises(SystemExit) as e:
        train.main([*CONFIG, *RUN])
    assert e.value.code == 1
    assert one_error_line(capsys.readouterr().err) == "error: cannot write to runs/r (No space left on device)"
    assert [p for p in (work / "runs").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("out_dir", ["blocker/run", "../escaped", "runs/../../escaped", "ABSOLUTE"])
def test_out_dir_that_cannot_or_must_not_be_written_exits_2_before_anything_is_created(out_dir: str, work: Path,
                                                                                       capsys) -> None:
    (work / "blocker").write_text("a file where out_dir needs a folder")
    out_dir = str(work.parent / f"{work.name}-absolute") if out_dir == "ABSOLUTE" else out_dir
    outside = {p.name for p in work.parent.iterdir()}
    before = snapshot(work)
    with pytest.raises(SystemExit) as e:
        train.main([*CONFIG, *RUN, f"out_dir={out_dir}"])
    assert e.value.code == 2
    assert "out_dir" in one_error_line(capsys.readouterr().err)
    assert snapshot(work) == before and {p.name for p in work.parent.iterdir()} == outside


# ---------------------------------------------------------------- hostile settings

KEYS = sorted(config.flatten(config.to_dict(config.Config())))

# tests/test_config.py feeds load_config random documents, override strings and the usual refusals (unknown keys,
# wrong types, folders, undecodable files, CUDA or fp16 without a GPU, sample.steps above T, channels the UNet
# refuses). Here: what it does not draw: integers far beyond int64 and float range, nesting thousands deep, and
# alias bombs, for every key; and that each answer is one line and comes: a hang, or a bomb being expanded, would
# not end. The time limit only catches those: 5000-deep nesting takes ~1 s on an idle Xeon and 8-12 s with
# coverage on a loaded 2-core EPYC, so it is set far above what any machine that runs the suite needs.
TIME_LIMIT_S = 120
huge_ints = st.integers() | st.integers(2**63 - 2, 2**63 + 2) | st.sampled_from([-2**63 - 1, 10**400, -10**400,
                                                                                2**1024, 2**1024 - 1])
values = st.recursive(st.none() | st.booleans() | huge_ints | st.floats() | st.text(max_size=20),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=3), max_leaves=8)


def assert_config_or_one_line_error(path, args) -> None:
    t0 = time.monotonic()
    try:
        cfg = config.load_config(path, args)
    except config.ConfigError as e:
        assert str(e) and len(str(e).splitlines()) == 1, str(e)[:2000]
    else:
        assert isinstance(cfg, config.Config)
    assert time.monotonic() - t0 < TIME_LIMIT_S


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


HOSTILE = {  # name: (file content, what the one line says)
    "5000-lists": ("[" * 5000, "cannot read config (RecursionError)"),
    "5000-mappings": ("a: " * 5000, "malformed YAML at line 1"),
    "5000-flow-mappings": ("{" * 5000 + "}" * 5000, "cannot read config (RecursionError)"),
    "5000-block-lists": ("- " * 5000 + "1", "cannot read config (RecursionError)"),
    "alias-bomb": (alias_bomb(12), "aliases (*name) are not allowed"),  # refused before anything is expanded
    "lr-10**400": ("train:\n  lr: 1" + "0" * 400 + "\n", "train.lr: expected a finite number"),
    "python-tag": ("seed: !!python/object/apply:os.system ['touch pwned']\n", "could not determine a constructor"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_config_file_gives_a_one_line_error(name: str, tmp_path: Path, monkeypatch) -> None:
    text, says = HOSTILE[name]
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text(text)
    t0 = time.monotonic()
    with pytest.raises(config.ConfigError) as e:
        config.load_config("c.yaml")
    assert time.monotonic() - t0 < TIME_LIMIT_S
    assert len(str(e.value).splitlines()) == 1 and says in str(e.value), str(e.value)[:300]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # e.g. no `pwned`


CLI_CASES = {  # name: (arguments after TINY's, how the run must end: 0, or a fragment of the one error line)
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
        result = run(folder, *overrides(TINY), *args)
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
        assert expected in one_error_line(result.stderr), (name, result.stderr)
        assert after == before, name
