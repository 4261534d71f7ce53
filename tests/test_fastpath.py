"""The fast training settings change speed, not results: bf16 autocast, torch.compile and channels_last
give the fp32 eager loss within stated tolerances, and the CPU fp32 step is bitwise reproducible; and train()
itself resolves train.precision, train.channels_last and train.compile as config.yaml says."""
import contextlib
import copy
from pathlib import Path

import pytest
import torch

import bench
import checkpoint
import config
import sample
import ddpm
import train
from helpers import (assert_equal_nested, coverage_paused, flat_weights, initial_weights, link_datasets, tiny_config,
                     untimed)
from unet import UNet

# bf16 keeps 8 mantissa bits. Measured for run_steps' two losses over seeds 0-3 (Xeon, avx512_bf16): up to 9.4e-4
# relative with or without channels_last.
BF16_REL = 3e-3
COMPILE_REL = 1e-4  # fp32 either way; inductor may reorder reductions and fuse ops


def run_steps(device, *, steps=2, precision="fp32", channels_last=False, compile=False, dropout=0.0, seed=0):
    """`steps` train.train_step calls on what train.build() makes, as train.train() does; returns (losses, model,
    ema)."""
    cfg = config.Config(seed=seed, train=config.Train(optimizer="adam", lr=1e-3, grad_clip=1.0, ema_decay=0.9,
                                                      precision=precision, channels_last=channels_last,
                                                      compile=compile))
    parts = train.build(cfg, dict(bench.TINY, dropout=dropout), device)
    with torch.no_grad():  # the zero-initialised output layers would make every loss exactly mean(noise²)
        for p in parts.model.parameters():
            if not p.any():  # drawn contiguous: normal_ on a channels_last tensor fills it in memory order
                p.copy_(torch.empty(p.shape).normal_(0.0, 0.05))
        parts.ema.load_state_dict(parts.model.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        x = (torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1).to(device)
        t, noise = ddpm.draw_t_noise(parts.schedule, x.shape, generator=gen)
        loss, _ = train.train_step(parts, x, t.to(device), noise.to(device), lr=1e-3)
        losses.append(float(loss))
    return losses, parts.model, parts.ema


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_bf16_autocast_loss_matches_fp32(channels_last):
    """bf16 autocast, and with channels_last the fast CPU step bench.py picks, against fp32 eager."""
    cpu = torch.device("cpu")
    ref, _, _ = run_steps(cpu)
    fast, _, _ = run_steps(cpu, precision="bf16", channels_last=channels_last)
    assert ref[0] != pytest.approx(ref[1], rel=1e-3)  # the steps see different data: a real comparison
    assert fast != ref  # bf16 did run
    for a, b in zip(fast, ref):
        assert a == pytest.approx(b, rel=BF16_REL)


def test_channels_last_loss_matches_contiguous():
    cpu = torch.device("cpu")
    ref, _, _ = run_steps(cpu)
    cl, _, _ = run_steps(cpu, channels_last=True)
    for a, b in zip(cl, ref):  # the second loss follows an update: it checks the gradients too
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_cpu_fp32_step_is_bitwise_reproducible():
    cpu = torch.device("cpu")
    a_loss, a_model, a_ema = run_steps(cpu, steps=3, dropout=0.1)
    b_loss, b_model, b_ema = run_steps(cpu, steps=3, dropout=0.1)
    assert a_loss == b_loss
    for a, b in ((a_model, b_model), (a_ema, b_ema)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name


@pytest.mark.slow
def test_compiled_step_matches_eager():
    cpu = torch.device("cpu")
    ref, _, _ = run_steps(cpu)
    with coverage_paused():  # compiling: minutes of dynamo and inductor, none of it our code
        compiled, _, _ = run_steps(cpu, compile=True)
    for a, b in zip(compiled, ref):  # the second loss follows an update from the compiled gradients
        assert a == pytest.approx(b, rel=COMPILE_REL)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_cuda_step_matches_fp32():
    cuda = torch.device("cuda")
    ref, _, _ = run_steps(cuda)
    fast, _, _ = run_steps(cuda, precision="bf16", channels_last=True, compile=True)
    for a, b in zip(fast, ref):
        assert a == pytest.approx(b, rel=BF16_REL)


@pytest.mark.slow
def test_fast_sampler_eps_matches_fp32():
    """bench.py's CPU sampler network (channels_last, torch.compile with frozen weights, bf16 autocast) predicts
    the eager fp32 ε: compiled fp32 to float rounding, bf16 within bf16 rounding (relative RMS error)."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = UNet(**dict(bench.TINY, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
        x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
        ref = model.eval()(x, t)

        def rel_err(amp_dtype, compile):
            fn = sample.fast_eps(copy.deepcopy(model), cpu, amp_dtype=amp_dtype, channels_last=True, compile=compile)
            with coverage_paused() if compile else contextlib.nullcontext():  # compiled: compiles at the 1st call
                eps = fn(x, t)
            return float((eps.float() - ref).norm() / ref.norm())
        assert rel_err(None, True) < 1e-4  # measured ~2e-6
        for compile in (False, True):
            assert 0 < rel_err(torch.bfloat16, compile) < 3e-2  # measured ~1.5e-2 with these random weights


# ---------------------------------------------------------------- through train()

# Measured through train() (tiny UNet, 2 epochs of 2 SGD steps, seeds 0-3, Xeon with avx512_bf16): bf16 ends
# 2.2e-3 to 2.4e-3 of the distance the weights travelled away from fp32, and its epoch losses differ from fp32's
# by up to 9.0e-5 (relative); fp32 with channels_last ends 8.4e-7 away from contiguous. The bounds are a small factor
# around those: a bf16 run that is really fp32 (< 1e-5) or that goes wrong (> 5e-3) fails.
TRAIN_BF16_WEIGHTS = (5e-4, 5e-3)
TRAIN_BF16_LOSS = 3e-4
TRAIN_CHANNELS_LAST_WEIGHTS = 1e-5


def test_train_resolves_precision_channels_last_and_compile(cifar: Path, tmp_path: Path, monkeypatch) -> None:
    """On the CPU, `auto` means fp32, contiguous, not compiled (bitwise the explicit settings); bf16 autocast
    runs in channels_last and lands near fp32; channels_last alone changes only float rounding; compile: true
    compiles the model (torch.compile is replaced by a recorder here: compiling takes minutes on a CPU)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, *args, **kwargs: compiled.append(model) or model)
    link_datasets(tmp_path, {"cifar10": cifar})
    monkeypatch.chdir(tmp_path)

    def run(name: str, **changes) -> dict:
        cfg = tiny_config(**{"train.optimizer": "sgd", "train.lr": 0.05, "model.dropout": 0.0, "data.subset": 16,
                             "train.epochs": 2, "out_dir": f"runs/{name}", **changes})
        train.train(cfg, progress=False)
        return checkpoint.load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")

    def is_channels_last(state: dict) -> bool:
        return state["model"]["conv_in.weight"].is_contiguous(memory_format=torch.channels_last)

    auto = run("auto")  # config.yaml's defaults: precision, channels_last and compile all auto
    fp32 = run("fp32", **{"train.precision": "fp32", "train.channels_last": False, "train.compile": False})
    bf16 = run("bf16", **{"train.precision": "bf16"})
    fp32_cl = run("fp32-cl", **{"train.precision": "fp32", "train.channels_last": True})
    assert compiled == []
    for key in ("model", "ema", "optimizer"):
        assert_equal_nested(auto[key], fp32[key], key)
    assert [untimed(r) for r in auto["history"]] == [untimed(r) for r in fp32["history"]]
    assert not is_channels_last(fp32) and is_channels_last(bf16) and is_channels_last(fp32_cl)

    init, w_fp32 = initial_weights(fp32, 0), flat_weights(fp32["model"])

    def distance(state: dict) -> float:  # from fp32's weights, relative to how far those are from the start
        return float((flat_weights(state["model"]) - w_fp32).norm() / (w_fp32 - init).norm())
    assert TRAIN_BF16_WEIGHTS[0] < distance(bf16) < TRAIN_BF16_WEIGHTS[1]
    for a, b in zip(bf16["history"], fp32["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=TRAIN_BF16_LOSS)
    assert distance(fp32_cl) < TRAIN_CHANNELS_LAST_WEIGHTS

    run("compiled", **{"train.compile": True, "train.epochs": 1})
    assert len(compiled) == 1 and isinstance(compiled[0], UNet)
