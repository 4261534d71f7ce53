"""bench.py runs end to end (--quick, with and without diffusers) and writes the JSON it promises."""
import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import bench
from unet import UNet

ROOT = Path(__file__).resolve().parent.parent


def check_result(r: dict, *, with_diffusers: bool) -> None:
    assert r["quick"] is True and r["device_type"] == "cpu"
    assert r["params"]["ours"] > 0
    tr = r["train"]
    assert tr["fast"] in tr["variants"] and "ours fp32" in tr["variants"]
    for v in tr["variants"].values():
        assert v["images_per_s"] > 0 and v["median_s"] > 0 and all(s > 0 for s in v["times_s"])
    assert tr["speedup_vs_ours_fp32"] > 0
    s = r["sample"]
    assert s["fast"] in s["variants"] and "EXTRAPOLATED" in s["basis"]
    for v in s["variants"].values():
        assert v["image_steps_per_s"] > 0 and v["seconds_256x1000"] > 0
    fl = r["flops"]
    assert 2.5 * fl["forward_per_image"] < fl["train_per_image"] < 3.5 * fl["forward_per_image"]  # bwd ≈ 2x fwd
    assert fl["mfu"] is None or 0 < fl["mfu"] < 1
    assert r["data"]["images_per_s"] > 0 and r["data"]["train_images_per_s"] > 0
    assert r["memory"]["mib"] > 0 and "RSS" in r["memory"]["kind"]
    assert r["extrapolated_100_epochs"]["minutes"] > 0 and "EXTRAPOLATED" in r["extrapolated_100_epochs"]["basis"]
    if with_diffusers:
        assert r["diffusers_skipped"] is None and r["params"]["diffusers"] == r["params"]["ours"]
        assert "diffusers fp32" in tr["variants"] and "diffusers fp32" in s["variants"]
        assert tr["speedup_vs_diffusers"] > 0 and s["speedup_vs_diffusers"] > 0
    else:
        assert "diffusers" in r["diffusers_skipped"] and r["params"]["diffusers"] is None
        assert tr["speedup_vs_diffusers"] is None and s["speedup_vs_diffusers"] is None
        assert not any(k.startswith("diffusers") for k in (*tr["variants"], *s["variants"]))
    json.dumps(r, allow_nan=False)  # no NaN or inf anywhere


def test_quick_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train speedup" in proc.stdout and "EXTRAPOLATED" in proc.stdout
    try:
        import diffusers  # noqa: F401
        have = True
    except ImportError:
        have = False
    check_result(json.loads(out.read_text()), with_diffusers=have)


@pytest.mark.slow
def test_quick_run_without_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    args = Namespace(device="cpu", threads=torch.get_num_threads(), quick=True, batch=None, warmup=1, rounds=2,
                     sample_batch=None, sample_steps=None, compile="off", out=None)
    r = bench.bench(args)
    check_result(r, with_diffusers=False)
    assert "bf16+cl" in bench.table(r)


@pytest.mark.parametrize("model_args", [bench.TINY, bench.PAPER], ids=["tiny", "paper"])
def test_diffusers_config_has_our_parameter_count(model_args):
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel
    theirs = UNet2DModel(**bench.diffusers_config(model_args))
    ours = UNet(**model_args)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    if model_args is bench.PAPER:
        assert math.isclose(sum(p.numel() for p in ours.parameters()), 35.7e6, rel_tol=2e-3)
