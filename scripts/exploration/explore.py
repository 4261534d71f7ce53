"""Exploration behind docs/quality.md: train with train.train(), snapshotting the raw weights and EMAs of several
decays every SNAP_EVERY steps (runs/explore/NAME/snaps), to be scored by eval_snaps.py.
usage: THREADS=1 python scripts/exploration/explore.py NAME SNAP_EVERY key=value ...
The runs of docs/quality.md (2026-11-27, 1 thread of the Xeon named there, other jobs on the second core):
    explore.py base 235                               (before the diffusers-aligned layout: eval with LEGACY=1)
    explore.py cosine 235 diffusion.schedule=cosine
    explore.py b32 470 train.batch_size=32
A one-off tool, kept so the numbers can be reproduced; not part of the pipeline.
"""
import copy, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train as T
from config import load_config

name, snap_every, *ov = sys.argv[1:]
snap_every = int(snap_every)
DECAYS = [0.99, 0.995, 0.998, 0.999, 0.9995]
cfg = load_config(str(Path(__file__).with_name("fmnist.yaml")), [f"out_dir=runs/explore/{name}", *ov])
out = Path(cfg.out_dir) / "snaps"
out.mkdir(parents=True, exist_ok=True)
extra = {}
orig_ema = T.ema_update
state = {"step": 0, "model": None, "t0": time.perf_counter()}


def ema_update(ema, model, decay):
    orig_ema(ema, model, decay)
    if not extra:
        for d in DECAYS:
            extra[d] = copy.deepcopy(model).eval().requires_grad_(False)
    for d, m in extra.items():
        orig_ema(m, model, d)
    state["step"] += 1
    state["model"] = model
    if state["step"] % snap_every == 0:
        torch.save({"step": state["step"], "wall": time.perf_counter() - state["t0"],
                    "raw": {k: v.clone() for k, v in model.state_dict().items()},
                    "ema": {d: m.state_dict() for d, m in extra.items()}},
                   out / f"step_{state['step']:05d}.pt")


T.ema_update = ema_update
torch.set_num_threads(int(__import__("os").environ.get("THREADS", "1")))
m = T.train(cfg, fresh=True, progress=False)
print(name, m, flush=True)
