"""bench.py runs end to end (--quick, with and without diffusers) and writes the JSON it promises."""
import json
import math
import statistics
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import bench
from helpers import child_env, require
from unet import UNet

ROOT = Path(__file__).resolve().parent.parent


def check_result(r: dict, *, with_diffusers: bool) -> None:
    """The JSON's numbers are consistent with each other and with what they are computed from (timings are
    whatever this machine measured: only their relations are checked)."""
    assert r["quick"] is True and r["device_type"] == "cpu"
    assert r["params"]["ours"] == sum(p.numel() for p in UNet(**bench.TINY).parameters())
    p = r["precision"]
    assert p["requested"] == "auto" and p["resolved"] == ("bf16" if p["native_bf16"] else "fp32")
    setting = "bf16+cl" if p["resolved"] == "bf16" else "fp32"  # quick: nothing compiled
    tr, s = r["train"], r["sample"]
    for part, per_s, work in ((tr, "images_per_s", tr["batch"]), (s, "image_steps_per_s", s["batch"] * s["steps"])):
        assert part["fast"] == f"ours {setting}"
        names = {f"ours {setting}", "ours fp32"} | ({f"diffusers {setting}", "diffusers fp32"} if with_diffusers
                                                    else set())
        assert set(part["variants"]) == names
        for v in part["variants"].values():
            assert len(v["times_s"]) == len(v["cpu_s"]) == tr["rounds"] and min(v["cpu_s"]) > 0
            assert v["median_s"] == statistics.median(v["times_s"])
            assert v[per_s] == pytest.approx(work / v["median_s"], rel=1e-12)
        if with_diffusers:  # the headline: ours against diffusers at the same settings, per-round ratios
            mine, theirs = part["variants"][part["fast"]], part["variants"][f"diffusers {setting}"]
            assert part["vs_diffusers"] == pytest.approx(statistics.median(
                a / b for a, b in zip(theirs["times_s"], mine["times_s"])), rel=1e-12)
            assert part["vs_diffusers_cpu"] == pytest.approx(statistics.median(
                a / b for a, b in zip(theirs["cpu_s"], mine["cpu_s"])), rel=1e-12)
        else:
            assert part["vs_diffusers"] is None and part["fp32_vs_diffusers_fp32"] is None
        if setting == "fp32":  # the fast row is fp32 eager: no line compares it with itself
            assert part["settings_vs_ours_fp32"] is None and part["fp32_vs_diffusers_fp32"] is None
    fast = tr["variants"][tr["fast"]]["images_per_s"]
    for v in s["variants"].values():
        assert v["seconds_256x1000"] == pytest.approx(256 * 1000 / v["image_steps_per_s"], rel=1e-12)
    assert "EXTRAPOLATED" in s["basis"]
    fl = r["flops"]
    assert 2.5 * fl["forward_per_image"] < fl["train_per_image"] < 3.5 * fl["forward_per_image"]  # bwd ≈ 2x fwd
    assert fl["mfu"] is None or fl["mfu"] == pytest.approx(fl["train_per_image"] * fast / fl["peak_bf16"], rel=1e-12)
    assert r["data"]["train_images_per_s"] == fast
    assert r["data"]["headroom"] == pytest.approx(r["data"]["images_per_s"] / fast, rel=1e-12)
    assert 100 < r["memory"]["mib"] < 64 * 1024 and "RSS" in r["memory"]["kind"]  # torch alone takes > 100 MiB
    minutes = bench.EPOCH_100_STEPS * bench.PAPER_BATCH / fast / 60
    assert r["extrapolated_100_epochs"]["minutes"] == pytest.approx(minutes, rel=1e-12)
    assert "EXTRAPOLATED" in r["extrapolated_100_epochs"]["basis"]
    assert len(r["load"]["before"]) == len(r["load"]["after"]) == 3
    if with_diffusers:
        assert r["diffusers_skipped"] is None and r["params"]["diffusers"] == r["params"]["ours"]
    else:
        assert "diffusers" in r["diffusers_skipped"] and r["params"]["diffusers"] is None
    json.dumps(r, allow_nan=False)  # no NaN or inf anywhere


def test_quick_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    # One thread: the JSON is checked here, not the speed, and 2 threads next to the busy test process would only
    # contend for the same 2 cores.
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--device", "cpu", "--threads", "1", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EXTRAPOLATED" in proc.stdout and "precision" in proc.stdout
    try:
        require("diffusers")  # under CI it must be there; elsewhere the run without it is checked
        have = True
    except pytest.skip.Exception:
        have = False
    check_result(json.loads(out.read_text()), with_diffusers=have)


@pytest.mark.slow
def test_quick_run_without_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    args = Namespace(device="cpu", threads=torch.get_num_threads(), quick=True, batch=None, warmup=1, rounds=2,
                     sample_batch=None, sample_steps=None, compile="off", precision="auto", out=None)
    r = bench.bench(args)
    check_result(r, with_diffusers=False)
    assert "train ours fp32" in bench.table(r)


@pytest.mark.parametrize("model_args", [bench.TINY, bench.PAPER], ids=["tiny", "paper"])
def test_diffusers_config_has_our_parameter_count(model_args):
    UNet2DModel = require("diffusers").UNet2DModel
    theirs = UNet2DModel(**bench.diffusers_config(model_args))
    ours = UNet(**model_args)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    if model_args is bench.PAPER:
        assert math.isclose(sum(p.numel() for p in ours.parameters()), 35.7e6, rel_tol=2e-3)


@pytest.mark.parametrize("mode, device, precision, quick, expected", [
    ("auto", "cuda", "bf16", False, (True, True)),
    ("auto", "cpu", "bf16", False, (False, True)),  # the AMX CPU: compiled bf16 sampling paid 1.27x
    ("auto", "cpu", "fp32", False, (False, False)),  # the CPU without AMX: 0.98x and 0.97x, so not compiled
    ("auto", "cpu", "bf16", True, (False, False)),
    ("on", "cpu", "fp32", True, (True, True)),
    ("off", "cuda", "bf16", False, (False, False)),
])
def test_compile_auto_compiles_only_where_it_was_measured_to_pay(mode: str, device: str, precision: str, quick: bool,
                                                                  expected: tuple[bool, bool]) -> None:
    assert bench.compile_settings(mode, torch.device(device), precision, quick) == expected
