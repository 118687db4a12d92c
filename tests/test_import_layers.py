"""The package layers of docs/architecture.md, checked on the source: which of our packages each
package may import (at module level or inside a function), and what config/ and anchor/ may
import from outside the standard library. A new import that breaks a layer fails here, naming
the file and line."""

from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "anchored_megatron")

# package -> the packages of ours it may import. Acyclic by construction: each package lists only
# packages above it in this table. The top-level modules (cli.py, train.py, demo.py) may import any.
ALLOWED = {
    "config": set(),
    "anchor": set(),
    "platform": {"config"},
    "models": {"config", "platform"},
    "data": {"config", "platform"},
    "checkpoint": {"config", "platform", "models"},
    "planning": {"config", "anchor", "platform", "models", "data", "checkpoint"},
    "convert": {"config", "platform", "models", "data", "checkpoint"},
    "training": {"config", "anchor", "platform", "models", "data", "checkpoint", "planning"},
    "eval": {"config", "platform", "models", "data", "checkpoint"},
    "integrations": {"config", "anchor", "platform", "models", "data", "checkpoint", "training"},
    "experiment": {"config", "anchor", "platform", "models", "data", "checkpoint", "planning", "convert", "training", "eval"},
}
# Third-party imports allowed in the two leaf packages: config/ is plain values (YAML in, dataclasses
# out), anchor/ is the method's math on torch tensors (and Megatron-Core's parallel state and collectives).
THIRD_PARTY = {"config": {"yaml"}, "anchor": {"torch", "megatron"}}


def imports_of(path: str, root: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, nested ones included."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    package = os.path.relpath(os.path.dirname(path), os.path.dirname(root)).replace(os.sep, ".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def layer_violations(root: str) -> list[str]:
    problems = []
    for package in sorted(os.listdir(root)):
        directory = os.path.join(root, package)
        if not os.path.isdir(directory) or package.startswith("__"):
            continue
        if package not in ALLOWED:
            problems.append(f"{package}/: a package with no entry in the layer table (add it to docs/architecture.md and here)")
            continue
        for dirpath, _, files in os.walk(directory):
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(dirpath, name)
                where = os.path.relpath(path, os.path.dirname(root))
                for line, module in imports_of(path, root):
                    top, _, rest = module.partition(".")
                    if top == os.path.basename(root):
                        target = rest.split(".")[0]
                        if target != package and target not in ALLOWED[package]:
                            problems.append(f"{where}:{line}: {package}/ imports {module} ({target}/ is not below {package}/)")
                    elif package in THIRD_PARTY and top not in sys.stdlib_module_names and top not in THIRD_PARTY[package]:
                        problems.append(f"{where}:{line}: {package}/ imports {module} (only the standard library and "
                                        f"{', '.join(sorted(THIRD_PARTY[package]))} there)")
    return problems


def test_every_package_imports_only_the_layers_below_it():
    assert layer_violations(ROOT) == []


def test_the_layer_table_has_no_cycle():
    done, visiting = set(), set()

    def visit(package, chain):
        assert package not in visiting, f"cycle: {' -> '.join(chain + [package])}"
        if package in done:
            return
        visiting.add(package)
        for below in ALLOWED[package]:
            visit(below, chain + [package])
        visiting.discard(package)
        done.add(package)

    for package in ALLOWED:
        visit(package, [])


@pytest.mark.parametrize("source, expected", [
    ("from pkg.training import trainer\n", "config/ imports pkg.training"),
    ("def f():\n    import torch\n", "config/ imports torch"),
    ("from ..training import trainer\n", "config/ imports pkg.training"),
])
def test_the_check_finds_a_violation(tmp_path, source, expected):
    """The scanner itself: an upward import, a lazy torch import and a relative import in config/."""
    root = tmp_path / "pkg"
    (root / "config").mkdir(parents=True)
    (root / "training").mkdir()
    (root / "config" / "bad.py").write_text(source)
    (root / "training" / "ok.py").write_text("from pkg.config import bad\n")
    problems = layer_violations(str(root))
    assert len(problems) == 1 and expected in problems[0] and "config/bad.py:" in problems[0], problems
