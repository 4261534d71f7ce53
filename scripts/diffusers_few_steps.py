"""An exported run sampled by diffusers itself at few steps, scored with the project's metric (docs/diffusers.md):

    python scripts/diffusers_few_steps.py --checkpoint runs/fashion-mnist-cpu/checkpoint.pt --num-samples 500 \\
        --cells DDPMScheduler:20 DPMSolverMultistepScheduler:10 DPMSolverMultistepScheduler:20 \
                DPMSolverMultistepScheduler:10:thresholding=true --out docs/quality/diffusers-few-steps.jsonl

export.py writes the run's DDPMScheduler (σ² = β, "fixed_large", right at all T steps). A cell
SCHEDULER:STEPS[:KEY=VALUE,...] swaps in `SCHEDULER.from_config(pipe.scheduler.config, KEY=VALUE, ...)`
(DDPMScheduler: the exported one), calls the pipeline with
`num_inference_steps=STEPS` and a seeded generator, and scores the images with `evaluate.py --features
fashion-mnist`'s FID beside its real-data floor. One JSON line per cell.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402
import export  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402


def pipeline_images(pipe, scheduler: Any, steps: int, n: int, batch: int, seed: int) -> tuple[torch.Tensor, float]:
    """uint8 (n, C, H, W) from the diffusers pipeline with `scheduler` swapped in, and the seconds it took."""
    pipe.scheduler = scheduler
    out, t0 = [], time.perf_counter()
    for i, start in enumerate(range(0, n, batch)):
        gen = torch.Generator().manual_seed(seed + i)
        x = pipe(batch_size=min(batch, n - start), generator=gen, num_inference_steps=steps, output_type="np").images
        out.append(torch.from_numpy(np.round(x * 255).astype(np.uint8)).permute(0, 3, 1, 2))
    return torch.cat(out), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--cells", nargs="+", required=True, help="SCHEDULER:STEPS (a diffusers scheduler class)")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON-lines file (appended)")
    args = p.parse_args(argv)
    import diffusers
    state = load_checkpoint(args.checkpoint)
    dataset = state["config"]["data"]["dataset"]
    extractor = evaluate.feature_extractor("fashion-mnist", torch.device("cpu"), "data/fid_stats", progress=False)
    ref = evaluate.reference_stats(evaluate.default_ref(dataset, "fashion-mnist"), extractor, cache_dir="data/fid_stats")
    real = evaluate.read_images(Path("data") / dataset / "train.npy")[:args.num_samples]
    floor = evaluate.image_scores(real, ref, extractor, classes=True)["fid"]
    with tempfile.TemporaryDirectory() as tmp:
        pipe = diffusers.DDPMPipeline.from_pretrained(export.export(state, Path(tmp) / "pipe"))
        pipe.set_progress_bar_config(disable=True)
        exported = pipe.scheduler.config  # the run's DDPMScheduler
        for cell in args.cells:
            scheduler, steps, *rest = cell.split(":")
            options = {k: yaml.safe_load(v) for k, v in (o.split("=") for o in rest[0].split(","))} if rest else {}
            swapped = getattr(diffusers, scheduler).from_config(exported, **options)
            images, seconds = pipeline_images(pipe, swapped, int(steps), args.num_samples, args.batch_size, args.seed)
            fid = evaluate.image_scores(images, ref, extractor, classes=True)["fid"]
            row = {"scheduler": scheduler, "options": options, "steps": int(steps), "num_samples": args.num_samples,
                   "fid": fid, "fid_floor": floor, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                   "diffusers": diffusers.__version__, "checkpoint_step": state["step"],
                   "date": time.strftime("%Y-%m-%d")}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
