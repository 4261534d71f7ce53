"""The sampler table of docs/samplers.md: FID (Fashion-MNIST classifier features) and seconds per 1,000 images for
each sampler at each number of steps, on one checkpoint, with the same noise seeds for every cell, beside the
real-data floor at the same number of images. Resumable (evaluate.py's shards), one row per cell in a JSON-lines
file, then the markdown table:

    python scripts/sampler_table.py --checkpoint runs/fashion-mnist-cpu/checkpoint.pt \\
        --cells ddpm-beta:10,20,50,100:1000 ddpm-posterior:10,20,50,100:1000 ddim:10,20,50,100:1000 \\
                dpm++2m:10,20,50:1000 dpm++2m-quadratic:10,20,50:1000 --out docs/samplers.jsonl

A cell is SAMPLER:STEPS:IMAGES, SAMPLER one of ddpm-beta, ddpm-posterior, ddim (η = 0), dpm++2m (DPM-Solver++(2M))
on the uniform spacing, dpm++2m-quadratic on the quadratic one. Sampling time is measured only for shards sampled
by this call (a resumed cell keeps the time measured when it was sampled).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402
import sample  # noqa: E402

SAMPLERS = {"ddpm-beta": dict(sampler="ddpm", variance="beta"), "ddpm-posterior": dict(sampler="ddpm", variance="posterior"),
            "ddim": dict(sampler="ddim", variance="auto"), "dpm++2m": dict(sampler="dpm++2m", variance="auto"),
            "dpm++2m-quadratic": dict(sampler="dpm++2m", variance="auto", spacing="quadratic"),
            "dpm++2m-sde": dict(sampler="dpm++2m-sde", variance="auto")}


class Timed:
    """sample.generate, timing the images it makes."""

    def __init__(self) -> None:
        self.seconds, self.images = 0.0, 0

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        t0 = time.perf_counter()
        out = sample.generate(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.images += len(out)
        return out


def cells(specs: list[str]) -> list[tuple[str, int, int]]:
    out = []
    for spec in specs:
        name, steps, n = spec.split(":")
        if name not in SAMPLERS:
            raise SystemExit(f"error: unknown sampler {name!r} (one of {', '.join(SAMPLERS)})")
        out += [(name, int(s), int(n)) for s in steps.split(",")]
    return out


def markdown(rows: list[dict]) -> str:
    """FID (floor) and s/1000 images per sampler (rows) and steps (columns)."""
    steps = sorted({r["steps"] for r in rows})
    lines = ["| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name in SAMPLERS:
        cells_ = {r["steps"]: r for r in rows if r["sampler"] == name}
        if not cells_:
            continue
        def cell(s: int) -> str:
            r = cells_.get(s)
            if r is None:
                return ""
            t = f", {r['seconds_per_1000']:.0f} s" if r.get("seconds_per_1000") else ""
            return f"**{r['fid']:.2f}** ({r['fid_floor']:.2f} @ {r['num_samples']}{t})"
        lines.append(f"| {name} | " + " | ".join(cell(s) for s in steps) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--cells", nargs="+", required=True, help="SAMPLER:STEPS[,STEPS...]:IMAGES")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", required=True, help="JSON-lines file of results (appended; a cell already there is kept)")
    args = p.parse_args(argv)
    out = Path(args.out)
    done = {(r["sampler"], r["steps"], r["num_samples"]): r for r in map(json.loads, out.read_text().splitlines())} \
        if out.is_file() else {}
    for name, steps, n in cells(args.cells):
        if (name, steps, n) in done:
            continue
        timer = Timed()
        result = evaluate.evaluate(args.checkpoint, num_samples=n, steps=steps, batch_size=args.batch_size,
                                   features="fashion-mnist", device="cpu", generate=timer, progress=False,
                                   **SAMPLERS[name])
        row = {"sampler": name, "steps": steps, "num_samples": n, "fid": result["fid"], "fid_floor": result["fid_floor"],
               "class_coverage": result["class_coverage"], "threads": torch.get_num_threads(),
               "seconds_per_1000": 1000 * timer.seconds / timer.images if timer.images else None,
               "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[name, steps, n] = row
    print(markdown(list(done.values())))


if __name__ == "__main__":
    main()
