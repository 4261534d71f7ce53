"""Everything a run writes or reads back as state: atomic file writes, checkpoints, image grids.

A reader never sees a half-written file: each write goes to a temporary file in the same folder, is
fsynced, and replaces the target with one `os.replace`. The previous file stays valid until then.
"""
from __future__ import annotations

import io
import json
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

FORMAT = 1  # bump when the checkpoint layout changes
# What every reader needs (sample.py, evaluate.py, export.py): the weights and what rebuilds the model. A resume
# needs all that train.TrainState.snapshot() writes, and TrainState.restore() checks for it.
REQUIRED = frozenset({"model", "ema", "optimizer", "config", "model_args", "step", "epoch"})


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line and says what to do."""


def _temporary(path: Path) -> tuple[int, Path]:
    """A new file `.<name>.<random>.tmp` beside `path`, open for writing. It is created with mode 0o666, so that
    the umask (and a folder's default ACL) applies as to any other file: `tempfile.mkstemp` would make it 0600."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash at any moment leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_save(path: str | Path, save: Callable, *args: Any, **kwargs: Any) -> None:
    """`save(file, *args, **kwargs)` (np.save, np.savez) into `path`, atomically."""
    buf = io.BytesIO()
    save(buf, *args, **kwargs)
    atomic_write(path, buf.getvalue())


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temporary files that a killed `atomic_write` left in `folder` (never a completed file)."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(path: str | Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    advice: str = "(restore it, or pass --fresh to start over)") -> dict:
    """Load with `weights_only=True` (no arbitrary code); every failure is a CheckpointError."""
    path = Path(path)
    how = advice
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise next to the one-line error
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a checkpoint") from None
    except Exception as e:  # truncated zip, bad pickle, disallowed global: all mean "not a usable checkpoint"
        raise CheckpointError(f"{path}: {_unusable(e)} {how}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (format "
                              f"{state.get('format') if isinstance(state, dict) else '?'}, expected {FORMAT}) {how}")
    missing = REQUIRED - state.keys()
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {sorted(missing)} {how}")
    return state


def _unusable(e: Exception) -> str:
    """torch.load's error in a few words. Its own text runs to many lines (with terminal colour codes) and, for
    a weights_only refusal, suggests weights_only=False: exactly what must not be done with a file from elsewhere."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"refused: loading it would call {refused.group(1)}, and a checkpoint holds only tensors and plain data"
    text = text.split("WeightsUnpickler error:", 1)[-1].strip()
    detail = text.splitlines()[0].split(". ")[0][:160] if text else ""
    return f"corrupt or unreadable checkpoint ({type(e).__name__}{': ' + detail if detail else ''})"


def model_args(state: dict) -> dict:
    """The UNet constructor arguments of a checkpoint. One written before `norm_eps` and `downsample_padding`
    were arguments lacks them and gets the values it was trained with (unet.LEGACY_ARGS), not today's defaults."""
    from unet import LEGACY_ARGS
    if not isinstance(state["model_args"], dict):
        raise CheckpointError(f"checkpoint model_args is a {type(state['model_args']).__name__}, not a dict")
    return {**LEGACY_ARGS, **state["model_args"]}


def model_from_checkpoint(state: dict, *, ema: bool = True, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the UNet from the checkpoint's constructor arguments alone; EMA weights by default."""
    from unet import UNet
    model = UNet(**model_args(state))
    try:
        model.load_state_dict(state["ema" if ema else "model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its model_args: {str(e).splitlines()[0]}") from None
    return model.to(device).eval().requires_grad_(False)
