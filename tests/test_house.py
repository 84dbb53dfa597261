"""The house rules, checked: the library never loads Prefect or MLflow, has no import circle, imports only
packages pyproject.toml declares, the lint (ruff, including the TID251 ban) is clean, and no source file
grows past 400 lines."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lsq", "tasks", "flows", "deployments", "experiments")
MAX_LINES = 400


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, ast.AST]]:
    """Every module name ``path`` imports, at any depth (lazy imports count), with the node."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, node)] + [(f"{node.module}.{a.name}", node) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names]
    return found


def test_every_lsq_module_imports_without_prefect_or_mlflow_in_a_fresh_interpreter():
    names = [n for n in _modules("lsq") if not n.endswith("__main__")]
    probe = ("import importlib, sys\n"
             f"for name in {names!r}:\n    importlib.import_module(name)\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow'}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[]", done.stdout[-500:]


def test_the_library_has_no_import_circle():
    """Lazy imports count: a circle dodged by importing inside a function is still a circle."""
    modules = _modules("lsq")
    edges = {name: {t for t, _ in _imports(path) if t in modules and t != name} for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    circles = sorted((a, b) for a in edges for b in edges[a] if reaches(b, a))
    assert not circles, circles


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_pyproject_declares_every_package_the_code_imports():
    providers = importlib.metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    declared = _declared()
    missing = {}
    for package in PACKAGES:
        for path in _modules(package).values():
            for name, _ in _imports(path):
                top = name.split(".")[0]
                if top in stdlib or top in PACKAGES or top == "__future__" or top not in providers:
                    continue
                dists = {d.lower().replace("_", "-") for d in providers[top]}
                if not dists & declared:
                    missing.setdefault(top, set()).add(str(path.relative_to(REPO)))
    assert not missing, missing


def test_lint_is_clean_and_lsq_never_imports_prefect_or_mlflow():
    """ruff with the repository's settings: pyflakes, the E4/E7/E9 errors, and flake8-tidy-imports' banned-api
    (TID251), which bans prefect and mlflow under lsq/."""
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    done = subprocess.run([str(ruff), "check", *PACKAGES, "benchmarks"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_ban_is_live(tmp_path):
    """The TID251 rule fires on an lsq module that imports mlflow (so the check above can fail)."""
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    (tmp_path / "lsq").mkdir()
    (tmp_path / "lsq" / "bad.py").write_text("import mlflow\nfrom prefect import flow\n\nprint(mlflow, flow)\n")
    done = subprocess.run([str(ruff), "check", "--config", str(REPO / "pyproject.toml"), "lsq"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1 and done.stdout.count("TID251") == 2, done.stdout


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for package in PACKAGES for p in _modules(package).values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
