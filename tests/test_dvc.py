"""The DVC pipeline, for real: a temporary git + DVC repository with the project's files copied in, tiny
settings and a synthetic CIFAR-format archive. What reruns is read from `dvc status --json`, not timed."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import config
from helpers import TINY_MODEL, make_cifar_archive, md5_of, nest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
PROJECT_FILES = ["ddpm.py", "unet.py", "data.py", "train.py", "config.py", "checkpoint.py", "sample.py", "runtime.py",
                 "config.yaml", "dvc.yaml", ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore",
                 "evaluate.py", "features.py", "export.py", "requirements-eval.txt", "eval/dvc.yaml", "eval/.dvc/config",
                 "eval/.dvc/.gitignore"]
TINY = nest({**TINY_MODEL, "diffusion.num_timesteps": 50, "train.epochs": 1, "train.batch_size": 8,
             "train.warmup_steps": 0, "sample.num_images": 4, "sample.steps": 3, "wandb.mode": "disabled"})


def run(repo: Path, *args: str) -> str:
    # The timeout only catches a hang: the slowest command, `dvc repro` of both stages, took 46 s beside another
    # test run on a busy 2-core AMD EPYC.
    p = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout


def dvc(repo: Path, *args: str) -> str:
    """The dvc of this Python (not whichever `dvc` comes first on PATH)."""
    return run(repo, sys.executable, "-m", "dvc", *args)


def stale(repo: Path) -> set[str]:
    """The stages `dvc repro` would run now."""
    return set(json.loads(dvc(repo, "status", "--json") or "{}"))


def edit_config(repo: Path, key: str, value) -> None:
    path = repo / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def commit(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("dvc-repo")
    for f in PROJECT_FILES:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, repo / f)
    archive = tmp_path_factory.mktemp("raw") / "cifar-10-python.tar.gz"
    make_cifar_archive(archive, n=8)
    cfg = yaml.safe_load((repo / "config.yaml").read_text())
    for section, values in TINY.items():
        cfg[section].update(values)
    cfg["data"].update(source=str(archive), md5=md5_of(archive))
    (repo / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run(repo, "git", "init", "-q")
    for key, value in (("user.name", "tests"), ("user.email", "tests@example.invalid")):  # git and dvc exp commit
        run(repo, "git", "config", key, value)
    commit(repo, "project")
    return repo


@pytest.fixture(scope="module")
def reproduced(repo: Path) -> dict:
    """The pipeline reproduced and committed, once, by whichever test needs it first: the repository, and what
    `dvc status` said before and `dvc repro` printed."""
    before = stale(repo)
    output = dvc(repo, "repro")
    commit(repo, "first run")
    return {"repo": repo, "stale_before": before, "output": output}


def test_repro_runs_both_stages_then_nothing(reproduced: dict) -> None:
    repo = reproduced["repo"]
    assert reproduced["stale_before"] == {"prepare", "train"}
    assert "Running stage 'prepare'" in reproduced["output"] and "Running stage 'train'" in reproduced["output"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "train"}
    assert (repo / "runs/default/metrics.json").is_file() and (repo / "runs/default/checkpoint.pt").is_file()
    assert stale(repo) == set()  # the opt-in evaluation, never run, is not listed (eval/ is a project of its own)
    assert "Running stage" not in dvc(repo, "repro")
    # ... and stays one documented command away: DVC resolves it (root config, paths, deps) and would run it.
    assert set(json.loads(dvc(repo, "--cd", "eval", "status", "--json"))) == {"evaluate"}
    dry = dvc(repo, "--cd", "eval", "repro", "--dry")
    assert "Running stage 'evaluate'" in dry and "python evaluate.py --checkpoint runs/default/checkpoint.pt" in dry


@pytest.mark.parametrize("change, expected", [
    (("config", "train.lr", 1e-3), {"train"}),
    (("config", "wandb.mode", "offline"), set()),
    (("config", "wandb.log_every", 7), set()),
    (("config", "train.checkpoint_every", 3), set()),
    (("file", "unet.py"), {"train"}),
    (("file", "train.py"), {"train"}),
    (("file", "data.py"), {"prepare", "train"}),
    (("file", "evaluate.py"), {"train"}),  # train.py imports it for FID during training (eval.every_epochs)
    (("config", "data.dataset", "fashion-mnist"), {"prepare", "train"}),
])
def test_a_change_reruns_exactly_the_stages_that_depend_on_it(reproduced: dict, change, expected) -> None:
    repo = reproduced["repo"]
    assert stale(repo) == set(), "a test before this one left the repository changed"
    config_before = (repo / "config.yaml").read_text()
    if change[0] == "config":
        edit_config(repo, change[1], change[2])
    else:
        with open(repo / change[1], "a") as f:
            f.write("\n# an edit\n")
    try:
        assert stale(repo) == expected
    finally:  # put the repository back as it was (the next test checks nothing is stale)
        run(repo, "git", "checkout", "--", ".")
        assert (repo / "config.yaml").read_text() == config_before


def test_exp_run_with_set_param_changes_the_metrics(reproduced: dict) -> None:
    repo = reproduced["repo"]
    assert stale(repo) == set(), "a test before this one left the repository changed"
    dvc(repo, "exp", "run", "-S", "config.yaml:train.lr=0.005", "-n", "higher-lr")
    rows = json.loads(dvc(repo, "exp", "show", "--json"))
    head = run(repo, "git", "rev-parse", "HEAD").strip()
    baseline = next(r for r in rows if r["rev"] == head)
    exps = [e for group in (baseline["experiments"] or []) for e in group["revs"]]
    assert [e["name"] for e in exps] == ["higher-lr"]

    def metrics(rev) -> dict:
        return rev["data"]["metrics"]["runs/default/metrics.json"]["data"]

    def lr(rev) -> float:
        return rev["data"]["params"]["config.yaml"]["data"]["train"]["lr"]

    assert lr(exps[0]) == 0.005 and lr(baseline) != 0.005
    assert metrics(exps[0])["loss"] != metrics(baseline)["loss"]
    assert metrics(exps[0])["step"] == metrics(baseline)["step"]
    # `dvc params diff` / `dvc metrics diff` see the experiment's change in the workspace.
    assert "train.lr" in dvc(repo, "params", "diff")
    assert "loss" in dvc(repo, "metrics", "diff")
    run(repo, "git", "checkout", "--", ".")
    dvc(repo, "checkout", "-q")
    assert stale(repo) == set()


def _local_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """The project's own modules that `module` imports, transitively."""
    seen = set() if seen is None else seen
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            if (ROOT / f"{name}.py").is_file() and name not in seen:
                seen.add(name)
                _local_imports(name, seen)
    return seen


def test_stage_deps_are_the_modules_each_command_imports() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, script in (("prepare", "data"), ("train", "train")):
        deps = {d for d in stages[stage]["deps"] if d.endswith(".py")}
        assert deps == {f"{m}.py" for m in _local_imports(script) | {script}}, stage


def test_params_are_exactly_the_keys_that_change_a_result() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    every = set(config.flatten(config.to_dict(config.Config())))

    def declared(stage: str) -> set[str]:
        keys = stages[stage]["params"][0]["config.yaml"]
        return {k for k in every if any(k == p or k.startswith(p + ".") for p in keys)}

    assert declared("prepare") == {"data.dataset", "data.source", "data.md5"}
    no_effect = {"wandb.mode", "wandb.project", "wandb.entity", "wandb.log_every", "train.checkpoint_every",
                 "data.num_workers", "data.root", "data.source", "data.md5"}  # source/md5: via the data dep
    assert declared("train") == every - no_effect


def test_committed_lock_agrees_with_the_pipeline() -> None:
    """Either no dvc.lock is committed and docs/dvc.md says why (the CIFAR-10 defaults cannot be run where this
    code is developed, and a lock that records no real run would be a lie), or the committed lock records a real
    run of the committed dvc.yaml and config.yaml and docs/dvc.md does not deny it."""
    committed = run(ROOT, "git", "ls-files", "dvc.lock").strip() == "dvc.lock"
    policy = "This repository does not ship one"
    docs = " ".join((ROOT / "docs/dvc.md").read_text().split())
    if not committed:
        assert policy in docs, "no dvc.lock is committed, and docs/dvc.md does not say why"
        return
    assert policy not in docs, "docs/dvc.md says no dvc.lock is committed, but one is"
    assert stale(ROOT) == set(), "the committed dvc.lock does not record the committed pipeline"
