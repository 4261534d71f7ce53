"""Shared test settings: one CPU thread (fast, steady, bitwise-reproducible), every test starting from the same
global random state and seeing a CPU without native bf16, a derandomized hypothesis profile under CI, the `device`
fixture that runs a test on cpu and, when there is one, cuda, the small synthetic dataset that end-to-end tests
train on and the `workdir` that links it in, and under CI no skips but the CUDA ones, of a test or of a whole
module (a test that skips in CI has checked nothing)."""
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")
# precision auto means fp32 in every test and every process it starts, on any CPU (on one with AMX-BF16 it would be
# bf16, and tests compare runs with fp32 references); tests/test_precision.py checks both answers itself.
os.environ["DDPM_CPU_BF16"] = "0"
CI = bool(os.environ.get("CI"))

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if CI else "dev")

NEEDS_CUDA = "needs CUDA"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason=NEEDS_CUDA)])]
# Under CI a skip fails the test unless its reason starts with one of these. "CUDA is available" marks the few
# checks of what happens without a GPU, skipped on a GPU machine.
CI_SKIPS = (NEEDS_CUDA, "CUDA is available")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global torch random state, whatever ran before it (a model built
    without an explicit seed still gets the same weights every time)."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cifar(tmp_path_factory) -> Path:
    """A synthetic CIFAR-format dataset folder (64 train, 16 test images), as data.py would prepare it."""
    from helpers import write_synthetic_cifar
    folder = tmp_path_factory.mktemp("datasets") / "cifar10"
    write_synthetic_cifar(folder, n_train=64, n_test=16)
    return folder


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch, cifar: Path) -> Path:
    """An empty working folder with data/cifar10 linked in, as the cwd (test_train.py, test_samplers.py; a module
    may define its own workdir, which then takes its place there)."""
    from helpers import link_datasets
    link_datasets(tmp_path, {"cifar10": cifar})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _fail_a_skip_under_ci(report) -> None:
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not reason.startswith(CI_SKIPS):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI, where only {' / '.join(CI_SKIPS)} may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a skip for any reason but CI_SKIPS is reported as a failure (e.g. a missing optional package)."""
    outcome = yield
    _fail_a_skip_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped while it is collected (a module-level importorskip)."""
    outcome = yield
    _fail_a_skip_under_ci(outcome.get_result())
