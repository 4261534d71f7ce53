"""The pictures of a run, from its own files (no plotting library: Pillow only):

    python report.py --run runs/fashion-mnist-cpu --out docs/fashion-mnist

writes into --out: `samples.png` (EMA samples beside real training images), `curve.png` (loss and EMA loss per
epoch from history.csv, and the FID where it was measured, against minutes of training) and `progression.png`
(the run's sample grids, drawn from the same noise after each epoch, side by side).
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import data
import ddpm
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from config import fail
from sample import generate, image_grid, sampler_settings, save_png, schedule_from_config

INK, GREY, BLUE, ORANGE, GREEN = (20, 20, 20), (150, 150, 150), (31, 119, 180), (255, 127, 14), (44, 160, 44)


def _font(size: int = 14) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def captioned(images: list[Image.Image], captions: list[str], scale: int = 2, gap: int = 16) -> Image.Image:
    """Images side by side, each scaled up by `scale` (nearest: pixels stay pixels) under its caption."""
    font = _font(15)
    big = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    head = 26
    canvas = Image.new("RGB", (sum(b.width for b in big) + gap * (len(big) + 1), max(b.height for b in big) + head
                               + gap), "white")
    draw, x = ImageDraw.Draw(canvas), gap
    for b, text in zip(big, captions):
        draw.text((x, 4), text, fill=INK, font=font)
        canvas.paste(b, (x, head))
        x += b.width + gap
    return canvas


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round numbers spanning [lo, hi]."""
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12) / n))
    step *= min((m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n), default=10)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def line_chart(series: dict[str, tuple[list[float], list[float], tuple]], *, title: str, xlabel: str,
               size: tuple[int, int] = (520, 300), log_y: bool = False) -> Image.Image:
    """A small line chart: `series` maps a label to (xs, ys, colour); points are drawn as dots and joined."""
    w, h = size
    left, right, top, bottom = 62, 16, 34, 44
    img = Image.new("RGB", size, "white")
    d, font = ImageDraw.Draw(img), _font(13)
    xs = [x for sx, _, _ in series.values() for x in sx]
    ys = [math.log10(y) if log_y else y for _, sy, _ in series.values() for y in sy]
    x0, x1 = min(xs + [0.0]), max(xs) if xs else 1.0
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = (y1 - y0) * 0.08 or 0.1
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (w - left - right)  # noqa: E731
    py = lambda y: top + (y1 - (math.log10(y) if log_y else y)) / ((y1 - y0) or 1) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline=GREY)
    for t in _ticks(x0, x1):
        d.line([px(t), h - bottom, px(t), h - bottom + 4], fill=GREY)
        d.text((px(t), h - bottom + 6), f"{t:g}", fill=INK, font=font, anchor="ma")
    for t in _ticks(y0, y1):
        d.line([left - 4, py(10 ** t if log_y else t), left, py(10 ** t if log_y else t)], fill=GREY)
        d.text((left - 6, py(10 ** t if log_y else t)), f"{10 ** t if log_y else t:.3g}", fill=INK, font=font,
               anchor="rm")
    d.text((left, 8), title, fill=INK, font=_font(15))
    d.text(((left + w - right) / 2, h - 18), xlabel, fill=INK, font=font, anchor="ma")
    lx = w - right - 8
    for i, (label, (sx, sy, colour)) in enumerate(series.items()):
        pts = [(px(x), py(y)) for x, y in zip(sx, sy)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        d.text((lx, top + 6 + 16 * i), label, fill=colour, font=font, anchor="ra")
    return img


def read_history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def training_minutes(history: list[dict]) -> list[float]:
    """Minutes of training at the end of each epoch: the row's wall time less the FID time of the rows before it.
    train.py reads an epoch's `wall_time_s` before it measures that epoch's FID, so the row's own `fid_time_s` is
    not in it. The time of the sample grids is not recorded and stays in."""
    minutes, spent = [], 0.0
    for r in history:
        minutes.append((float(r["wall_time_s"]) - spent) / 60)
        spent += float(r.get("fid_time_s") or 0)
    return minutes


def curve(history: list[dict], num_samples: int | None = None, *,
          compare: tuple[str, list[dict]] | None = None) -> Image.Image:
    """Loss and EMA loss per epoch and, where measured, the FID, against minutes of training (FID time excluded);
    `compare` (label, another run's history) adds that run's FID to the FID panel."""
    minutes = training_minutes(history)
    loss = line_chart({"loss (epoch mean)": (minutes, [float(r["loss"]) for r in history], BLUE),
                       "EMA loss (held-out)": (minutes, [float(r["ema_loss"]) for r in history], ORANGE)},
                      title="training loss", xlabel="minutes of training")
    measured = [(m, float(r["fid"])) for m, r in zip(minutes, history) if r.get("fid")]
    if not measured:
        return loss
    series = {"FID": ([m for m, _ in measured], [f for _, f in measured], GREEN)}
    if compare is not None:
        label, other = compare
        pts = [(m, float(r["fid"])) for m, r in zip(training_minutes(other), other) if r.get("fid")]
        series[label] = ([m for m, _ in pts], [f for _, f in pts], ORANGE)
    fid = line_chart(series, log_y=True,
                     title=f"FID (Fashion-MNIST classifier features), {num_samples or '?'} samples",
                     xlabel="minutes of training")
    both = Image.new("RGB", (loss.width + fid.width, loss.height), "white")
    both.paste(loss, (0, 0))
    both.paste(fid, (loss.width, 0))
    return both


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run folder written by train.py")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--num-images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=ddpm.SAMPLERS, default=None, help="samples.png's sampler (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="its steps (default: the run's sample.steps)")
    p.add_argument("--variance", choices=ddpm.VARIANCES, default=None, help="ddpm's σ² (default: the run's)")
    p.add_argument("--compare", nargs=2, metavar=("HISTORY_CSV", "LABEL"), default=None,
                   help="also draw this history.csv's FID on the curve, named LABEL (e.g. an earlier recipe)")
    args = p.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    try:  # a bad run folder or flag: one line and exit 2, before anything is written
        state = load_checkpoint(run / "checkpoint.pt", advice="(is --run a folder written by train.py?)")
        cfg, history = state["config"], read_history(run)
        chosen = {"sampler": args.sampler, "steps": args.steps, "variance": args.variance}
        T = cfg["diffusion"]["num_timesteps"]
        s = sampler_settings({**cfg["sample"], **{k: v for k, v in chosen.items() if v is not None}}, state, T)
    except (CheckpointError, ValueError, OSError) as e:
        fail(str(e))
    images = generate(model_from_checkpoint(state), schedule_from_config(cfg), args.num_images, s, seed=args.seed)
    real = data.load_dataset(Path("data") / cfg["data"]["dataset"] / "train.npy")[:args.num_images]
    grid = lambda x: Image.fromarray(image_grid(x).numpy())  # noqa: E731
    how = f"{s.sampler.upper()}, {s.steps or T} steps"
    if s.sampler == "ddpm":
        how += f", variance {ddpm.resolve_variance(s.variance, s.steps, T)}"  # ASCII: the default font
    save_png(captioned([grid(images), grid(real)], [f"samples (EMA, {how})", "real training images"]), out / "samples.png")
    compare = None
    if args.compare:
        with open(args.compare[0]) as f:
            compare = (args.compare[1], list(csv.DictReader(f)))
    save_png(curve(history, cfg.get("eval", {}).get("num_samples"), compare=compare), out / "curve.png")
    grids = sorted((run / "samples").glob("epoch_*.png"))
    by_epoch = {int(r["epoch"]): r for r in history}
    labels = []
    for g in grids:
        r = by_epoch.get(int(g.stem.split("_")[1]), {})
        labels.append(f"epoch {int(g.stem.split('_')[1])}" + (f", {float(r['wall_time_s']) / 60:.0f} min" if r else ""))
    if grids:
        save_png(captioned([Image.open(g).convert("RGB") for g in grids], labels, scale=1), out / "progression.png")
    print(f"wrote {out}/samples.png, curve.png" + (", progression.png" if grids else ""))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
