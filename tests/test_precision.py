"""precision auto follows the hardware: bf16 on a CPU only with AMX-BF16 (torch.cpu.get_capabilities, mocked here
both ways), on a GPU where CUDA says bf16 is supported; an explicit bf16 on a CPU without it runs after one warning
line; DDPM_CPU_BF16 overrides the detection. Checked in runtime.resolve_precision, and through train(), sample.py,
evaluate.py and bench.py."""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import evaluate as ev
import runtime
import sample
import train
from helpers import TinyExtractor, make_checkpoint, tiny_config, visible_lines

CPU = torch.device("cpu")


@pytest.fixture
def cpu(monkeypatch):
    """A CPU with or without AMX-BF16 (AVX512-BF16 either way: it does not make bf16 pay); no override, no warning
    given yet in this process."""
    monkeypatch.delenv("DDPM_CPU_BF16", raising=False)
    monkeypatch.setattr(runtime, "_warned", set())

    def with_amx(amx_bf16: bool) -> None:
        caps = {**torch.cpu.get_capabilities(), "amx_bf16": amx_bf16, "amx_tile": amx_bf16, "avx512_bf16": True}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    return with_amx


@pytest.mark.parametrize("amx_bf16", [True, False], ids=["amx", "no-amx"])
def test_auto_on_the_cpu_follows_amx_bf16_without_a_warning(cpu, capsys, amx_bf16: bool) -> None:
    cpu(amx_bf16)
    assert runtime.cpu_has_native_bf16() is amx_bf16
    assert runtime.resolve_precision("auto", CPU) == ("bf16" if amx_bf16 else "fp32")
    assert runtime.resolve_precision("fp32", CPU) == "fp32"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("amx_bf16", [True, False], ids=["amx", "no-amx"])
def test_explicit_bf16_runs_and_warns_once_in_one_line_only_without_native_bf16(cpu, capsys, amx_bf16: bool) -> None:
    cpu(amx_bf16)
    assert runtime.resolve_precision("bf16", CPU) == "bf16"
    assert runtime.resolve_precision("bf16", CPU) == "bf16"  # train() resolves it twice: one line still
    lines = visible_lines(capsys.readouterr().err)
    if amx_bf16:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith("warning: ") and "slower than fp32" in lines[0], lines


@pytest.mark.parametrize("forced, amx_bf16", [("0", True), ("1", False)])
def test_the_environment_variable_overrides_the_detection(cpu, monkeypatch, forced: str, amx_bf16: bool) -> None:
    cpu(amx_bf16)
    monkeypatch.setenv("DDPM_CPU_BF16", forced)
    assert runtime.resolve_precision("auto", CPU) == ("bf16" if forced == "1" else "fp32")


@pytest.mark.parametrize("supported, amx_bf16", [(True, False), (False, True)], ids=["gpu-bf16", "gpu-without"])
def test_auto_on_cuda_follows_cuda_not_the_cpu(cpu, monkeypatch, capsys, supported: bool, amx_bf16: bool) -> None:
    cpu(amx_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert runtime.resolve_precision("auto", torch.device("cuda")) == ("bf16" if supported else "fp32")
    assert capsys.readouterr().err == ""  # the CPU's warning is the CPU's


def test_the_test_processes_see_a_cpu_without_native_bf16() -> None:
    """conftest's setting, inherited by every process a test starts."""
    assert runtime.resolve_precision("auto", CPU) == "fp32"


# ---------------------------------------------------------------- through train(), sample.py, evaluate.py, bench.py

@pytest.mark.parametrize("amx_bf16", [True, False], ids=["amx", "no-amx"])
def test_train_auto_takes_bf16_and_channels_last_only_on_a_cpu_with_it(cpu, workdir, monkeypatch,
                                                                       amx_bf16: bool) -> None:
    cpu(amx_bf16)
    seen = []

    def step(p, x, t, noise, **kwargs):  # records what train() built (bf16 itself is test_fastpath.py's)
        seen.append((p.precision, p.channels_last, p.model.conv_in.weight.is_contiguous(
            memory_format=torch.channels_last)))
        return torch.zeros(()), torch.zeros(())  # loss, grad norm
    monkeypatch.setattr(train, "train_step", step)
    train.train(tiny_config(**{"data.subset": 4, "train.batch_size": 2, "sample.every_epochs": 0}), progress=False)
    assert seen == [("bf16", True, True) if amx_bf16 else ("fp32", False, False)] * 2  # 4 images in batches of 2


@pytest.mark.parametrize("amx_bf16", [True, False], ids=["amx", "no-amx"])
def test_sample_cli_auto_samples_in_the_cpus_precision(cpu, tmp_path: Path, monkeypatch, capsys,
                                                       amx_bf16: bool) -> None:
    cpu(amx_bf16)
    ckpt = make_checkpoint(tmp_path / "checkpoint.pt")
    seen = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: seen.append(k["inference"].precision) or real(*a, **k))
    sample.main(["--checkpoint", str(ckpt), "--num-images", "2", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "s.png")])
    assert seen == ["bf16" if amx_bf16 else "fp32"] and (tmp_path / "s.png").exists()
    assert "warning" not in capsys.readouterr().err


def test_sample_cli_explicit_bf16_without_native_bf16_warns_once_and_samples(cpu, tmp_path: Path, capsys) -> None:
    cpu(False)
    ckpt = make_checkpoint(tmp_path / "checkpoint.pt")
    sample.main(["--checkpoint", str(ckpt), "--num-images", "2", "--steps", "2", "--device", "cpu", "--precision",
                 "bf16", "--out", str(tmp_path / "s.png")])
    lines = [line for line in visible_lines(capsys.readouterr().err) if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: bf16 on this CPU") and (tmp_path / "s.png").exists()


@pytest.mark.parametrize("amx_bf16", [True, False], ids=["amx", "no-amx"])
def test_evaluate_auto_samples_in_the_cpus_precision_into_its_own_folder(cpu, tmp_path: Path,
                                                                         amx_bf16: bool) -> None:
    cpu(amx_bf16)
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoint.pt")
    ref = tmp_path / "ref.npz"
    np.savez(ref, torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8).numpy())
    seen = []

    def generate(*a, **k):
        seen.append(k["inference"].precision)
        return sample.generate(*a, **k)
    result = ev.evaluate(ckpt, num_samples=10, steps=2, batch_size=5, seed=1, ref=ref, device="cpu",
                         extractor=TinyExtractor(), progress=False, stats_cache=tmp_path / "stats", generate=generate,
                         precision="auto")
    expected = "bf16" if amx_bf16 else "fp32"
    assert seen == [expected] * 2 and result["precision"] == expected
    folder = tmp_path / "run" / "eval" / ("samples_2_beta_1" + ("_bf16" if amx_bf16 else ""))
    assert len(list(folder.glob("shard_*.npy"))) == 2
    meta = json.loads((folder / "meta.json").read_text())
    assert meta.get("precision", "fp32") == expected  # fp32 shards keep the identity they had before bf16 existed


@pytest.mark.slow  # ~20 s: bf16 on a CPU without AMX is slow
@pytest.mark.parametrize("amx_bf16", [True, False], ids=["amx", "no-amx"])
def test_bench_compares_ours_with_diffusers_at_the_same_settings(cpu, monkeypatch, amx_bf16: bool) -> None:
    """auto's fast rows are bf16 + channels_last with AMX-BF16 (mocked), fp32 eager without; diffusers gets the
    same settings, and with bf16 the fp32 eager rows are there for what the precision buys."""
    cpu(amx_bf16)
    built = []  # the settings each row was built with: ours and diffusers' must be the same

    def recording(who: str, make):
        return lambda *a, **kw: built.append((who, bench.label(**kw))) or make(*a, **kw)
    for name in ("our_train_step", "diffusers_train_step", "our_sampler", "diffusers_sampler"):
        monkeypatch.setattr(bench, name, recording(name.split("_")[0], getattr(bench, name)))
    args = Namespace(device="cpu", threads=torch.get_num_threads(), quick=True, batch=2, warmup=1, rounds=2,
                     sample_batch=2, sample_steps=1, compile="off", precision="auto", out=None)
    r = bench.bench(args)
    setting = "bf16+cl" if amx_bf16 else "fp32"
    rows = {("our", setting), ("our", "fp32")} | ({("diffusers", setting), ("diffusers", "fp32")}
                                                  if r["diffusers_skipped"] is None else set())
    assert sorted(built) == sorted(list(rows) * 2)  # training and sampling
    assert r["precision"]["resolved"] == setting[:4] and r["precision"]["native_bf16"] is amx_bf16
    assert f"AMX-BF16: {'yes' if amx_bf16 else 'no'}" in r["precision"]["capability"]
    for part in (r["train"], r["sample"]):
        assert part["fast"] == f"ours {setting}"
        names = {f"ours {setting}", "ours fp32"} | ({f"diffusers {setting}", "diffusers fp32"}
                                                    if r["diffusers_skipped"] is None else set())
        assert set(part["variants"]) == names
        if r["diffusers_skipped"] is None:
            assert part["vs_diffusers"] == pytest.approx(bench.ratio(part["variants"], f"diffusers {setting}",
                                                                     f"ours {setting}"), rel=1e-12)
        if amx_bf16:
            assert part["settings_vs_ours_fp32"] == pytest.approx(bench.ratio(part["variants"], "ours fp32",
                                                                              "ours bf16+cl"), rel=1e-12)
        else:
            assert part["settings_vs_ours_fp32"] is None  # the fast row is fp32 eager: nothing to compare
    assert f"auto -> {setting[:4]}" in bench.table(r)
