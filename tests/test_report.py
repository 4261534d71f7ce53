"""report.py draws a run's pictures from the run's own files: EMA samples beside real training images, the training
curve (with an FID panel only where FID was measured, against minutes of training without the FID's own time), and
the epoch grids side by side."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import data
import report
import train
from checkpoint import load_checkpoint, model_from_checkpoint
from helpers import decode_png, one_error_line, run_cli, tiny_config
from sample import generate, image_grid, schedule_from_config

GAP, HEAD, SCALE = 16, 26, 2  # report.captioned's layout


def panel(png: torch.Tensor, x: int, y: int, like: torch.Tensor) -> torch.Tensor:
    return png[:, y:y + like.shape[1], x:x + like.shape[2]]


def upscaled(grid: torch.Tensor, scale: int) -> torch.Tensor:
    return grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def test_the_pictures_of_a_tiny_run_show_its_samples_real_images_and_epoch_grids(workdir: Path) -> None:
    train.train(tiny_config(**{"train.epochs": 2, "sample.every_epochs": 1}), progress=False)
    with torch.no_grad():
        report.main(["--run", "runs/tiny", "--out", "pics", "--num-images", "4", "--seed", "3"])

    # samples.png: the run's EMA model with the run's sampler and the given seed, then the first real images.
    state = load_checkpoint(Path("runs/tiny/checkpoint.pt"))
    s = state["config"]["sample"]
    with torch.no_grad():
        images = generate(model_from_checkpoint(state), schedule_from_config(state["config"]), 4, steps=s["steps"],
                          variance=s["variance"], clip=s["clip"], sampler=s["sampler"], eta=s["eta"],
                          spacing=s["spacing"], seed=3)
    ours = upscaled(image_grid(images).permute(2, 0, 1), SCALE)
    real = upscaled(image_grid(data.load_dataset(Path("data/cifar10/train.npy"))[:4]).permute(2, 0, 1), SCALE)
    png = decode_png(workdir / "pics/samples.png")
    assert torch.equal(panel(png, GAP, HEAD, ours), ours)
    assert torch.equal(panel(png, 2 * GAP + ours.shape[2], HEAD, real), real)
    assert not torch.equal(ours, real)

    # progression.png: the two epoch grids, unscaled, in epoch order.
    grids = [decode_png(workdir / f"runs/tiny/samples/epoch_{e:03d}.png") for e in (1, 2)]
    png = decode_png(workdir / "pics/progression.png")
    assert torch.equal(panel(png, GAP, HEAD, grids[0]), grids[0])
    assert torch.equal(panel(png, 2 * GAP + grids[0].shape[2], HEAD, grids[1]), grids[1])

    # --sampler/--steps choose samples.png's sampler instead of the run's (DDPM, 5 steps in TINY).
    with torch.no_grad():
        report.main(["--run", "runs/tiny", "--out", "pics2", "--num-images", "4", "--seed", "3", "--sampler", "ddim",
                     "--steps", "3"])
        other = generate(model_from_checkpoint(state), schedule_from_config(state["config"]), 4, steps=3,
                         variance=s["variance"], clip=s["clip"], sampler="ddim", eta=s["eta"], spacing=s["spacing"],
                         seed=3)
    other = upscaled(image_grid(other).permute(2, 0, 1), SCALE)
    assert not torch.equal(other, ours)
    assert torch.equal(panel(decode_png(workdir / "pics2/samples.png"), GAP, HEAD, other), other)

    # curve.png: no FID measured in this run, so one panel.
    assert decode_png(workdir / "pics/curve.png").shape[1:] == (300, 520)


def test_a_bad_run_folder_or_flag_is_one_line_and_exit_2_and_nothing_is_written(workdir: Path) -> None:
    r = run_cli("report.py", "--run", "runs/none", "--out", "pics", cwd=workdir)
    assert r.returncode == 2 and "runs/none/checkpoint.pt" in one_error_line(r.stderr)
    train.train(tiny_config(), progress=False)
    r = run_cli("report.py", "--run", "runs/tiny", "--out", "pics", "--steps", "999", cwd=workdir)
    assert r.returncode == 2 and one_error_line(r.stderr).startswith("error: --steps: 999 is more than")
    assert not (workdir / "pics").exists()


def test_the_curve_gets_an_fid_panel_only_where_fid_was_measured_and_minutes_leave_out_its_time() -> None:
    rows = [{"epoch": "1", "loss": "0.2", "ema_loss": "0.3", "wall_time_s": "150", "fid": "", "fid_time_s": ""},
            {"epoch": "2", "loss": "0.1", "ema_loss": "0.2", "wall_time_s": "330", "fid": "90.5", "fid_time_s": "30"},
            {"epoch": "3", "loss": "0.1", "ema_loss": "0.1", "wall_time_s": "540", "fid": "60.0", "fid_time_s": "30"}]
    # wall_time_s is read before the epoch's own FID runs: each row less the FID time of the rows before it
    assert np.allclose(report.training_minutes(rows), [2.5, 5.5, 8.5])
    assert report.curve(rows).size == (1040, 300)  # loss panel + FID panel
    assert report.curve([{**r, "fid": "", "fid_time_s": ""} for r in rows]).size == (520, 300)


def test_compare_draws_the_other_runs_fid_in_the_fid_panel() -> None:
    """--compare: the earlier recipe's FID beside this run's, in its own colour, in the FID panel only."""
    rows = [{"epoch": "1", "loss": "0.2", "ema_loss": "0.3", "wall_time_s": "150", "fid": "90", "fid_time_s": "30"},
            {"epoch": "2", "loss": "0.1", "ema_loss": "0.2", "wall_time_s": "330", "fid": "60", "fid_time_s": "30"}]
    old = [{**r, "fid": str(2 * float(r["fid"])), "wall_time_s": str(2 * float(r["wall_time_s"]))} for r in rows]
    fid_panel = lambda img: np.asarray(img)[:, 520:]  # noqa: E731
    orange = lambda a: int((np.abs(a.astype(int) - report.ORANGE).sum(-1) < 30).sum())  # noqa: E731
    alone, both = report.curve(rows, 500), report.curve(rows, 500, compare=("old recipe", old))
    assert orange(fid_panel(alone)) == 0 and orange(fid_panel(both)) > 50
    assert np.array_equal(np.asarray(alone)[:, :520], np.asarray(both)[:, :520])  # the loss panel is the same

