"""Where a run runs, decided once and passed down: the device, the precision and memory format that are fast there,
the processes of a torchrun launch (`Dist`), the seeds of the run's random streams, and the progress bar every
command draws. train.py, data.py, sample.py, evaluate.py and bench.py import it; nothing here knows about the config
file.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as torch_dist
from torch import Tensor

# train.precision / --precision -> the autocast dtype (None: no autocast, fp32 throughout).
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLING_PRECISIONS = ("auto", "fp32", "bf16")  # --precision of sample.py, evaluate.py, bench.py (fp16: training)


def derive_seed(seed: int, stream: int, index: int = 0) -> int:
    """Independent seeds for the run's random streams (0 init, 1 data, 2 noise, 3 samples, 4 held-out batch, 5 FID
    samples, 6 dropout: one index per step and process)."""
    return (seed * 1_000_003 + stream * 10_007 + index) % 2**63


def resolve_device(spec: str | torch.device) -> torch.device:
    """"auto" -> cuda when there is one, else cpu; a CUDA device that is not there is a ValueError."""
    if str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"{spec!r}: expected auto, cpu, cuda or cuda:N") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and not count:
        raise ValueError(f"{spec!r} but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ValueError(f"{spec}: no such CUDA device ({count} available)")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions and matmuls natively: AMX-BF16 tiles (Intel Sapphire Rapids and later),
    which oneDNN uses under autocast. Without them bf16 is emulated or converted and slower than fp32: a training step
    of the paper's model took 1.5x to 2x as long in bf16 on a Xeon with AVX512-BF16 but no AMX, 13x on an AVX2 EPYC
    (docs/benchmarks.md). AVX512-BF16 alone (for which torch's `_is_mkldnn_bf16_supported()` answers True) does not
    make bf16 pay. The environment variable DDPM_CPU_BF16=0 or 1 overrides the detection (the tests set 0, so that
    `auto` means fp32 in every test process on every CPU)."""
    forced = os.environ.get("DDPM_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return bool(torch.cpu.get_capabilities().get("amx_bf16", False))


_warned: set[str] = set()


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast where the hardware runs it natively (CUDA GPUs with bf16; CPUs with AMX-BF16,
    `cpu_has_native_bf16`), fp32 elsewhere (exact, bitwise reproducible). An explicit bf16 on a CPU without it runs,
    after one warning line on stderr. A precision the device cannot run is a ValueError."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16() and "bf16" not in _warned:
        _warned.add("bf16")  # once per process: train() resolves it in prepare() and again in build()
        print("warning: bf16 on this CPU (no AMX-BF16) runs slower than fp32, emulated or converted; precision auto "
              "picks fp32 here", file=sys.stderr)
    if precision not in AMP_DTYPES:
        raise ValueError(f"{precision!r}: expected auto, {', '.join(AMP_DTYPES)}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a CUDA device (use fp32 or bf16)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bf16 is not supported on {torch.cuda.get_device_name(device)}")
    return precision


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32)."""
    return AMP_DTYPES[precision]


def use_channels_last(setting: bool | str, device: torch.device, precision: str) -> bool:
    """The one channels_last rule: `auto` turns it on where it pays, on CUDA and with bf16 on the CPU (oneDNN's
    fast bf16 convolutions are channels_last); True and False are kept."""
    return setting is True or (setting == "auto" and (device.type == "cuda" or precision == "bf16"))


def use_compile(setting: bool | str, device: torch.device) -> bool:
    """`auto` compiles on CUDA only: on a CPU the training step's graph takes minutes to compile and runs no faster
    (docs/benchmarks.md)."""
    return setting is True or (setting == "auto" and device.type == "cuda")


@dataclass(frozen=True)
class Dist:
    """This process's place among the processes of a torchrun launch; a world of one otherwise. Every collective
    below is a no-op in a world of one, so single-process code calls them unconditionally."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        """torchrun's WORLD_SIZE, RANK and LOCAL_RANK (read only; the process group is `setup_dist`'s)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device_spec(self, spec: str) -> str:
        """Under torchrun every CUDA spec means this process's GPU, cuda:LOCAL_RANK."""
        if self.world > 1 and spec != "cpu" and (spec != "auto" or torch.cuda.is_available()):
            return f"cuda:{self.local_rank}"
        return spec

    def all_reduce(self, x: Tensor, op: str = "sum") -> Tensor:
        """The sum (or "max", "min") of `x` over all processes, as a new tensor; `x` itself in a world of one."""
        if self.world == 1:
            return x
        x = x.clone()
        torch_dist.all_reduce(x, op=getattr(torch_dist.ReduceOp, op.upper()))
        return x

    def agree(self, flag: int) -> int:
        """The largest of every process's `flag` (e.g. a signal number, 0 for none), the same on all of them: a
        decision that every process then takes together. A host sync; call it where all processes call it."""
        if self.world == 1:
            return int(flag)
        device = torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else "cpu"
        return int(self.all_reduce(torch.tensor(int(flag), device=device), "max"))

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def close(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def setup_dist(dist: Dist, device: torch.device) -> None:
    """The process group of a torchrun launch (NCCL on CUDA, one GPU per process; gloo on the CPU); nothing in a
    world of one. Call it after every check that could refuse on one process alone, so that none waits here."""
    if dist.world == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


@contextlib.contextmanager
def progress_bar(*, leave: bool = True, **kwargs: Any) -> Iterator[Any]:
    """A tqdm bar (tqdm's keyword arguments; `disable=True` draws nothing) that is erased when an error ends it,
    so the error line that follows is the only line left; on success it stays if `leave`."""
    from tqdm.auto import tqdm
    bar = tqdm(leave=leave, dynamic_ncols=True, **kwargs)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()
