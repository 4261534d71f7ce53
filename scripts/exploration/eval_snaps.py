"""Evaluate exploration snapshots: FID (FMNIST classifier features) vs the test set.
usage: python eval_snaps.py RUN_DIR N SAMPLER STEPS VARIANTS(comma: raw,0.995,...) [SNAP_GLOB]
"""
import json, sys, time
from pathlib import Path
import torch, yaml
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import ddpm, sample, features, evaluate as ev, data
from unet import UNet

run, n, sampler, steps, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5].split(",")
glob = sys.argv[6] if len(sys.argv) > 6 else "step_*.pt"
variance = sys.argv[7] if len(sys.argv) > 7 else "auto"
torch.set_num_threads(int(__import__("os").environ.get("THREADS", "1")))
cfg = yaml.safe_load(open(Path(run) / "config.resolved.yaml"))
m = cfg["model"]
import os
from unet import LEGACY_ARGS
legacy = LEGACY_ARGS if os.environ.get("LEGACY") else {}
margs = dict(in_channels=1, channels=m["channels"], channel_mult=m["channel_mult"], num_res_blocks=m["num_res_blocks"],
             attn_resolutions=m["attn_resolutions"], dropout=m["dropout"], image_size=32, **legacy)
import train as T
torch.manual_seed(T.derive_seed(cfg["seed"], 0))
init = {k: v.clone() for k, v in UNet(**margs).state_dict().items()}  # what train.py starts from
model = UNet(**margs).eval()
schedule = sample.schedule_from_config(cfg)
e = features.fashion_mnist_extractor("data/fashion-mnist", "data/fid_stats")
test = data.load_dataset("data/fashion-mnist/test.npy")
ref = ev.reference_stats("data/fashion-mnist/test.npy", e, cache_dir="data/fid_stats")
floor = ev.image_scores(data.load_dataset("data/fashion-mnist/train.npy")[:n], ref, e, classes=True)
out = Path(run) / "evals.jsonl"
for snap in sorted((Path(run) / "snaps").glob(glob)):
    s = torch.load(snap, weights_only=True)
    for v in variants:
        if v.endswith("c"):  # bias-corrected EMA: remove the initial weights' share decay^step
            d = float(v[:-1]); w = d ** s["step"]
            model.load_state_dict({k: (e - w * init[k]) / (1 - w) for k, e in s["ema"][d].items()})
        else:
            model.load_state_dict(s["raw"] if v == "raw" else s["ema"][float(v)])
        t0 = time.perf_counter()
        imgs = sample.generate(model, schedule, n, batch_size=250, steps=steps, sampler=sampler, variance=variance, seed=0)
        dt = time.perf_counter() - t0
        sc = ev.image_scores(imgs, ref, e, classes=True)
        row = {"snap": snap.name, "step": s["step"], "wall": round(s["wall"], 1), "weights": v, "sampler": sampler,
               "steps": steps, "variance": variance, "n": n, "fid": round(sc["fid"], 3), "floor": round(floor["fid"], 3),
               "ratio": round(sc["fid"] / floor["fid"], 2), "coverage": round(sc["class_coverage"], 2),
               "mean_pixel": round(float(imgs.float().mean()), 1), "sample_s": round(dt, 1)}
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
