"""The shape of the package: layers a newcomer can see, kept by the import contracts.

import-linter checks the contracts in pyproject.toml (its graph, grimp, counts imports inside
functions too). These tests run it on the real package, show that it does catch a broken
contract, and check what the contracts cannot say: no import cycle between any two modules,
every sub-package says what it may import, a function-level import of an inpaintd module only
where it defers torch, and modules stay small enough to read.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "daemon" / "inpaintd"
SUBPACKAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
DEFERRED = "# deferred: imports torch"


def lint(package_parent: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", command, "--config", str(config), "--no-cache"], cwd=package_parent,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold() -> None:
    run = lint(PACKAGE.parent, ROOT / "pyproject.toml")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("paint/job.py", "from ..engine import engine as _forbidden", "paint never imports the engine"),
    ("core/quoting.py", "from ..store import fsutil as _forbidden", "Layers"),
    ("engine/memory.py", "from ..modelprep import prepare as _forbidden", "never imports prepare-time code"),
    ("store/spool.py", "from ..testing import models as _forbidden", "test helpers"),
])
def test_a_forbidden_import_breaks_the_contracts(tmp_path: Path, module: str, line: str, contract: str) -> None:
    copy = tmp_path / "daemon" / "inpaintd"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "samples", "model_configs"))
    target = copy / module
    target.write_text(target.read_text() + f"\n\ndef _sneaky() -> None:\n    {line}\n")  # inside a function, too
    run = lint(copy.parent, ROOT / "pyproject.toml")
    assert run.returncode != 0, run.stdout
    broken = [block for block in run.stdout.split("\n\n") if "BROKEN" in block]
    assert any(contract in block for block in broken), run.stdout


def test_no_two_inpaintd_modules_import_each_other_even_through_others() -> None:
    graph = grimp.build_graph("inpaintd", cache_dir=None)
    modules = sorted(graph.modules)
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if d.startswith("inpaintd")} for m in modules}
    cycles = _strongly_connected(modules, edges)
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def _strongly_connected(nodes: list[str], edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively; components of more than one module (a package importing
    its own __init__ is not a cycle of two modules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_sub_package_says_what_it_does_and_what_it_may_import(name: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
    assert len(doc.split()) >= 8, f"{name}/__init__.py: say what the sub-package does"
    assert "may import" in doc.lower(), f"{name}/__init__.py: say what it may import"


def test_an_inpaintd_module_is_imported_inside_a_function_only_to_defer_torch() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                ours = (isinstance(inner, ast.ImportFrom) and (inner.level > 0 or (inner.module or "").startswith("inpaintd"))) \
                    or (isinstance(inner, ast.Import) and any(a.name.startswith("inpaintd") for a in inner.names))
                if ours and DEFERRED not in lines[inner.lineno - 1]:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{inner.lineno}")
    assert offenders == [], f"function-level imports of inpaintd modules without {DEFERRED!r}: {offenders}"


def test_no_module_is_too_long_to_read() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 560}
    assert long == {}, f"split these by their jobs: {long}"
