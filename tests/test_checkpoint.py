"""checkpoint.py's atomic writes leave files with the mode any other file gets under the umask, and their
temporaries have the names that .gitignore and train.py's clean-up expect."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

import checkpoint
import sample
from helpers import ROOT


def write_all(folder: Path) -> list[Path]:
    """One file of each kind the project writes atomically: bytes, a checkpoint, a sample grid, a JSON record."""
    checkpoint.atomic_write(folder / "history.csv", b"epoch\n1\n")
    checkpoint.save_checkpoint(folder / "checkpoint.pt", {"step": 1})
    sample.save_grid(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), folder / "samples" / "epoch_001.png")
    checkpoint.write_json(folder / "eval" / "record.json", {"fid": 1.0})
    return [folder / "history.csv", folder / "checkpoint.pt", folder / "samples" / "epoch_001.png",
            folder / "eval" / "record.json"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=lambda m: f"umask{m:03o}")
def test_written_files_follow_the_umask_like_any_other_file(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        written = write_all(tmp_path)
        (tmp_path / "plain").write_bytes(b"x")  # a file written the ordinary way, for comparison
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*written, tmp_path / "plain"]}
    assert modes == {name: 0o666 & ~umask for name in modes}, {k: oct(v) for k, v in modes.items()}


def test_temporaries_are_ignored_by_git_and_found_by_the_clean_up(tmp_path: Path, monkeypatch) -> None:
    """The real temporary names (seen at the rename), placed where runs and pictures are written, are ignored by
    the repository's .gitignore, and remove_stale_temps finds one that a killed write left behind."""
    temps, replace = [], os.replace
    monkeypatch.setattr(checkpoint.os, "replace", lambda src, dst: temps.append(Path(src)) or replace(src, dst))
    write_all(tmp_path)
    monkeypatch.undo()
    assert [t.name.split(".")[1:3] for t in temps[:2]] == [["history", "csv"], ["checkpoint", "pt"]]
    paths = [f"runs/fashion-mnist-cpu/{t.relative_to(tmp_path)}" for t in temps]
    paths.append(f"docs/fashion-mnist/{temps[2].name}")  # report.py's pictures
    git = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert git.returncode in (0, 1), git.stderr
    assert git.stdout.split() == paths  # every one ignored
    left = tmp_path / temps[1].name  # as if killed between the write and the rename
    left.write_bytes(b"partial")
    assert checkpoint.remove_stale_temps(tmp_path) == [left] and not left.exists()
