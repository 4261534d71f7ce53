"""A fresh machine has what the code and its tests import: every third-party module imported by the top-level
modules, scripts/ and tests/ comes from a distribution pinned (==) in requirements-dev.txt or a file it includes,
which is what .ci/run installs; and .ci/run runs the set-up commands that README.md gives."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("*.py"), *ROOT.glob("scripts/**/*.py"), *ROOT.glob("tests/*.py")])
LOCAL = {p.stem for p in SOURCES if p.parent in (ROOT, ROOT / "tests")}  # `import helpers`, `import train`
# Calls that import a module named by a string: helpers.require, pytest.importorskip, importlib.import_module.
IMPORTING_CALLS = {"require", "importorskip", "import_module"}


def normalized(name: str) -> str:
    """PEP 503: PyYAML, pyyaml and py_yaml are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path, seen: set[Path] | None = None) -> dict[str, str]:
    """{distribution: version} of `path` and the files it includes with -r; fails on a line that is not `name==x`."""
    seen = set() if seen is None else seen
    seen.add(path)
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            out.update(pins(path.parent / line[3:].strip(), seen))
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"{path.name}: {line!r} is not an exact pin (name==version)"
        out[normalized(match[1])] = match[2]
    return out


def imported_modules(source: str) -> set[str]:
    """The top-level names of the absolute imports in `source`, wherever they are (inside functions too), and of
    the modules that require("x"), pytest.importorskip("x") and importlib.import_module("x") import."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in IMPORTING_CALLS):
            names.add(node.args[0].value)
    return {name.split(".")[0] for name in names}


def unpinned(requirements: Path) -> list[str]:
    """'module (file, ...): why' for every third-party module imported in SOURCES that `requirements` does not pin."""
    pinned = set(pins(requirements))
    where: dict[str, list[str]] = {}
    for path in SOURCES:
        for module in imported_modules(path.read_text()):
            where.setdefault(module, []).append(str(path.relative_to(ROOT)))
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for module in sorted(where.keys() - sys.stdlib_module_names - LOCAL):
        found = [normalized(d) for d in distributions.get(module, [])]
        if not found:
            problems.append(f"{module} ({', '.join(where[module])}): not installed, so no pin can be checked")
        elif not set(found) & pinned:
            problems.append(f"{module} ({', '.join(where[module])}): from {', '.join(found)}, pinned in no "
                            f"requirements file that {requirements.name} includes")
    return problems


def test_every_imported_third_party_module_is_pinned() -> None:
    assert unpinned(ROOT / "requirements-dev.txt") == []


def test_the_check_names_a_module_that_is_imported_but_not_pinned(tmp_path: Path) -> None:
    """The check above can fail: without scipy's line (tests/test_evaluate.py's require("scipy.linalg")), scipy
    is named; a requirement that is not an exact pin is refused."""
    for name in ("requirements.txt", "requirements-eval.txt", "requirements-bench.txt"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    dev = (ROOT / "requirements-dev.txt").read_text()
    assert "\nscipy==" in dev
    (tmp_path / "requirements-dev.txt").write_text(re.sub(r"\nscipy==\S+", "", dev))
    assert [p.split(" ")[0] for p in unpinned(tmp_path / "requirements-dev.txt")] == ["scipy"]
    (tmp_path / "requirements-dev.txt").write_text(dev.replace("scipy==", "scipy>="))
    with pytest.raises(AssertionError, match="'scipy>=1.17.1' is not an exact pin"):
        pins(tmp_path / "requirements-dev.txt")


def test_imports_are_read_wherever_they_are() -> None:
    source = ("import a.b, c\nfrom d.e import f\nfrom . import g\ndef h():\n    import i\n"
              "j = require('k.l')\nm = pytest.importorskip('n', reason='x')\no = importlib.import_module('p')\n"
              "q = importlib.import_module(name)\n")
    assert imported_modules(source) == {"a", "c", "d", "i", "k", "n", "p"}


def test_dev_requirements_include_every_requirements_file() -> None:
    included = {ROOT / "requirements-dev.txt"}
    pins(ROOT / "requirements-dev.txt", included)
    assert included == set(ROOT.glob("requirements*.txt"))


def setup_commands() -> list[str]:
    """The commands of the README's fresh-machine block for the tests (comments dropped)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up and training", 1)[1].split("\n## ", 1)[0]
    block = section.split("On a fresh machine", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_setup_commands() -> None:
    """README.md and .ci/run cannot drift apart: each command of the README's block is a line of .ci/run."""
    commands = setup_commands()
    assert any("requirements-dev.txt" in c for c in commands) and any("dataset-fashion-mnist" in c for c in commands)
    assert commands[-1] == "python3 -m pytest -q"
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert [c for c in commands if c not in ci] == []
