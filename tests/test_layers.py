"""The package's layers (docs/architecture.md), checked by import-linter's contract in pyproject.toml."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = "from importlinter.cli import lint_imports; raise SystemExit(lint_imports(no_cache=True, no_logo=True))"


def lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the ``igpt`` package found in ``root``, with ``root``'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}  # before site-packages: this copy of igpt is the one analysed
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_layers_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line", [
    ("igpt/model.py", "import igpt.weights.checkpoint"),  # the core reaching up into a stage
    ("igpt/data/streams.py", "from igpt.weights import convert"),  # a sibling of the same layer
    ("igpt/train/pretrain.py", "import igpt.cli"),  # a stage reaching up to the command line
])
def test_an_upward_or_sideways_import_breaks_the_contract(tmp_path, module, line):
    shutil.copytree(ROOT / "igpt", tmp_path / "igpt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / module
    path.write_text(path.read_text().replace("from __future__ import annotations\n",
                                             f"from __future__ import annotations\n\n{line}\n", 1))
    result = lint(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout.upper(), result.stdout + result.stderr


def test_no_igpt_import_hides_inside_a_function():
    """A deferred import is how a cycle is hidden; the layers make none necessary."""
    found = []
    for path in sorted((ROOT / "igpt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    names = ([inner.module or ""] if isinstance(inner, ast.ImportFrom) else
                             [a.name for a in inner.names] if isinstance(inner, ast.Import) else [])
                    found += [f"{path.relative_to(ROOT)}:{inner.lineno}" for n in names
                              if n == "igpt" or n.startswith("igpt.")]
    assert not found, found


@pytest.mark.parametrize("door, names", [
    # what a --data spec is, and how each kind is opened
    ("igpt/data/open.py", ("is_shard_dir", "is_cache", "sources.read", "open_cache", "open_shard_split")),
    # how weights of each format are read
    ("igpt/weights/convert.py", ("load_igpt", "load_hf", "is_hf_dir", "load_openai")),
])
def test_one_front_door_per_question(door, names):
    """Only the front door calls the functions that decide; every other module goes through it."""
    found = []
    for path in sorted((ROOT / "igpt").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel == door:
            continue
        tree = ast.parse(path.read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                called = ast.unparse(node.func)
                hits = [n for n in names if (called == n or called.endswith("." + n)) and n not in defined]
                found += [f"{rel}:{node.lineno} calls {h}" for h in hits]
    assert not found, found
