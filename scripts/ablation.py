"""The quality-per-minute ablation of docs/quality.md: each lever alone, and together, at an equal training budget,
scored the same way. One JSON line per row (appended to --out), with the exact commands that made it:

    python scripts/ablation.py --rows baseline cosine --steps 500 --out docs/quality/ablation.jsonl
    python scripts/ablation.py --table      # the markdown table of docs/quality.md

Every row trains configs/fashion-mnist-cpu.yaml with the row's overrides for --steps optimizer steps
(train.max_steps; the lr schedule ends there) on one thread, with no grids and no FID during training, then
scores the EMA weights with `evaluate.py --features fashion-mnist` (2,000 samples, seed 0; ancestral 20 steps,
σ² = β̃, or with --score dpm++2m-sde:10 SDE-DPM-Solver++(2M) at 10 steps, the second round's). The first round's
rows change neither the model nor the batch, so an equal number of steps is an equal number of minutes; a second
round row with batch 32 runs twice the steps (the same images), and one with another model may cost more per
image: the training time of each row is recorded to show what it cost. The third round's cheaper models (SPEED)
run more steps, for equal minutes. Two rows named on one command line run side by side, one thread each:

    python scripts/ablation.py --rows mult1222 batch32 --steps 500 --score dpm++2m-sde:10
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESET = "configs/fashion-mnist-cpu.yaml"
BASE = ["eval.every_epochs=0", "sample.every_epochs=0", "wandb.mode=disabled", "train.checkpoint_every=100000",
        "train.epochs=10"]
OLD = ["train.lr_schedule=constant", "train.lr=1e-3", "train.ema_warmup=false", "train.ema_decay=0.995",
       "train.loss_weighting=none"]  # the recipe before the ablation: each row changes one thing from it
WARMUP = ["train.ema_warmup=true", "train.ema_decay=0.9999", "train.ema_power=0.75"]
ROWS = {
    "baseline": OLD,
    "cosine": OLD + ["train.lr_schedule=cosine"],
    "cosine-lr2e-3": OLD + ["train.lr_schedule=cosine", "train.lr=2e-3"],
    "ema-warmup": OLD + WARMUP,
    "min-snr": OLD + ["train.loss_weighting=min_snr", "train.snr_gamma=5"],
    "all": OLD + ["train.lr_schedule=cosine", "train.lr=2e-3"] + WARMUP + ["train.loss_weighting=min_snr"],
    "cosine-warmup": OLD + ["train.lr_schedule=cosine", "train.lr=2e-3"] + WARMUP,
}
# The second round: from the recipe (the `all` row), the model's depth and the batch, at an equal number of images.
ROWS |= {
    "mult1222": ROWS["all"] + ["model.channel_mult=[1,2,2,2]"],
    "batch32": ROWS["all"] + ["train.batch_size=32"],
    "batch32-mult1222": ROWS["all"] + ["train.batch_size=32", "model.channel_mult=[1,2,2,2]"],
    "batch16": ROWS["all"] + ["train.batch_size=16"],
}
# The third round: from the recipe (batch32-mult1222), at an equal number of minutes. A model that is cheaper per
# image runs more steps in them: SPEED is its training images/s over the recipe model's, measured at batch 32 on one
# core of the EPYC of docs/quality.md by scripts/exploration/unet_speed.py (64.0 and 56.4 against 46.7).
RECIPE = ROWS["batch32-mult1222"]
ROWS |= {
    "lr4e-3": RECIPE + ["train.lr=4e-3"],
    "batch16-mult1222": RECIPE + ["train.batch_size=16"],
    "mult1122": RECIPE + ["model.channel_mult=[1,1,2,2]"],
    "mult1124": RECIPE + ["model.channel_mult=[1,1,2,4]"],
    "batch16-mult1222-lr1e-3": RECIPE + ["train.batch_size=16", "train.lr=1e-3"],
    "batch8-mult1222": RECIPE + ["train.batch_size=8"],
}
SPEED = {"[1,1,2,2]": 64.0 / 46.7, "[1,1,2,4]": 56.4 / 46.7}  # by model.channel_mult
BATCH = 64  # the first round's; a row with another train.batch_size runs --steps * 64 / batch steps: the same images
SCORE = ["--features", "fashion-mnist", "--num-samples", "2000", "--seed", "0"]
SCORERS = {"ddpm:20": ["--sampler", "ddpm", "--steps", "20"],  # the first round's
           "dpm++2m-sde:10": ["--sampler", "dpm++2m-sde", "--steps", "10"]}
FID_LINE = re.compile(r"classifier features\): ([0-9.]+) \(real-data floor ([0-9.]+) at (\d+) images, ratio ([0-9.]+)\)")


def settings(overrides: list[str]) -> dict[str, str]:
    """key -> value of `overrides`, the last of a key winning, as train.py applies them."""
    return dict(o.split("=", 1) for o in overrides)


def row_steps(name: str, steps: int) -> int:
    """`steps` at the first round's batch of 64, as many images at the row's batch; a cheaper model (SPEED) runs as
    many more as fit in the same minutes."""
    row = settings(ROWS[name])
    speed = SPEED.get(row.get("model.channel_mult", ""), 1.0)
    return round(steps * BATCH / int(row.get("train.batch_size", BATCH)) * speed)


def commands(name: str, steps: int, seed: int, scorer: str = "ddpm:20") -> tuple[list[str], list[str], str]:
    out = f"runs/ablation/{name}-s{steps}-seed{seed}"
    train = [sys.executable, "train.py", "--config", PRESET, f"out_dir={out}", f"seed={seed}",
             f"train.max_steps={row_steps(name, steps)}", *BASE, *ROWS[name]]  # no --fresh: a stopped row resumes
    score = [sys.executable, "evaluate.py", "--checkpoint", f"{out}/checkpoint.pt", *SCORE, *SCORERS[scorer]]
    return train, score, out


def run_row(name: str, steps: int, seed: int, out: Path, scorer: str = "ddpm:20") -> None:
    train, score, folder = commands(name, steps, seed, scorer)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    t0 = time.perf_counter()
    subprocess.run(train, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train_s = time.perf_counter() - t0  # of this call: a resumed row's is the rest only
    t0 = time.perf_counter()
    result = subprocess.run(score, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    score_s = time.perf_counter() - t0
    m = FID_LINE.search(result.stdout)
    if m is None:
        raise SystemExit(f"error: no FID line in evaluate.py's output: {result.stdout[-300:]}")
    history = (ROOT / folder / "history.csv").read_text().splitlines()
    row = {"row": name, "seed": seed, "steps": steps, "scorer": scorer, "fid": float(m[1]), "floor": float(m[2]),
           "num_samples": int(m[3]), "ratio": float(m[4]), "train_s": round(train_s, 1), "score_s": round(score_s, 1),
           "last_history_row": history[-1], "train_cmd": " ".join(train[1:]), "score_cmd": " ".join(score[1:]),
           "date": time.strftime("%Y-%m-%d"), "threads": 1}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def table(path: Path) -> str:
    """The markdown table of docs/quality.md from the JSON lines at `path`, in the order they were measured."""
    lines = ["| row | seed | changes from the old recipe | scored with | FID @ 2,000 | × floor | EMA loss | loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in map(json.loads, path.read_text().splitlines()):
        old = settings(OLD)
        changes = " ".join(f"{k}={v}" for k, v in settings(ROWS[r["row"]]).items() if old.get(k) != v) or "none"
        _, _, loss, ema_loss, *_ = r["last_history_row"].split(",")
        lines.append(f"| {r['row']} | {r['seed']} | `{changes}` | {r.get('scorer', 'ddpm:20')} | **{r['fid']:.1f}** | "
                     f"{r['ratio']:.0f} | {float(ema_loss):.4f} | {float(loss):.4f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", choices=sorted(ROWS))
    p.add_argument("--table", action="store_true", help="print the markdown table of --out instead")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score", choices=sorted(SCORERS), default="ddpm:20",
                   help="the sampler that scores the rows (default: the first round's)")
    p.add_argument("--out", type=Path, default=ROOT / "docs/quality/ablation.jsonl")
    args = p.parse_args()
    if args.table or not args.rows:
        print(table(args.out))
        return
    if len(args.rows) == 1:
        run_row(args.rows[0], args.steps, args.seed, args.out, args.score)
        return
    procs = [subprocess.Popen([sys.executable, __file__, "--rows", r, "--steps", str(args.steps), "--seed",
                               str(args.seed), "--out", str(args.out), "--score", args.score]) for r in args.rows]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
