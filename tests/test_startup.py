"""How fast igpt starts: ``igpt --version``, ``--help`` and ``igpt CMD --help`` in a fraction of a second, and
``import igpt`` at little more than torch's own import (the parsers and ``igpt/__init__`` import neither torch
nor the library; see ``igpt.cli``).

Two kinds of check. What is imported is a fact that cannot fail by chance. How long it takes is measured in
subprocesses against ``python -c "import torch"`` on the same machine, the fastest of a few runs of each, so
that a busy machine slows both sides: a command line that imported torch would take longer than torch's import
itself, one that does not takes a small part of it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from igpt.cli import make_parser, named

ROOT = Path(__file__).resolve().parents[1]
# what must wait until a command runs (numpy too: nothing in the parsers needs it)
HEAVY = ("torch", "torch.distributed.checkpoint", "numpy", "matplotlib", "gradio", "transformers", "huggingface_hub")
# what must wait past ``import igpt`` (the API is torch's, but the extras come with the names that use them)
EXTRAS = ("torch.distributed.checkpoint", "matplotlib", "gradio", "transformers", "huggingface_hub")
RUNS = 3
HELP_COMMANDS = (["--version"], ["--help"], ["pretrain", "--help"], ["probe", "--help"], ["palette", "fit", "--help"],
                 ["bench", "quality", "run", "--help"], ["serve", "--help"])


def _python(*args: str) -> subprocess.CompletedProcess:
    """This checkout's igpt in a fresh interpreter, on one thread."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _imported_after(code: str, names: tuple[str, ...]) -> list[str]:
    out = _python("-c", f"import sys\n{code}\nprint(' '.join(m for m in {names!r} if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _fastest(*args: str) -> float:
    """Seconds of the fastest of ``RUNS`` runs (the others waited for the machine, not for igpt)."""
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        out = _python(*args)
        times.append(time.perf_counter() - start)
        assert out.returncode == 0, out.stderr
    return min(times)


@pytest.fixture(scope="module")
def torch_import_s() -> float:
    return _fastest("-c", "import torch")


def test_the_parsers_import_neither_torch_nor_the_library():
    assert _imported_after("from igpt.cli import make_parser\nmake_parser()", HEAVY) == []
    assert _imported_after("import igpt.cli.args, igpt.config", HEAVY) == []


def test_import_igpt_leaves_the_heavy_extras_until_their_names_are_used():
    assert _imported_after("import igpt", HEAVY) == []  # each name of the API is imported on first use
    assert _imported_after("import igpt\nigpt.Palette", EXTRAS) == []
    # loading and sampling weights: the Hub's mixin comes with the model class, the rest stays out
    assert _imported_after("from igpt import load, sample", EXTRAS) == ["huggingface_hub"]


def test_the_lazy_api_is_the_whole_api():
    out = _python("-c", "import igpt\nassert set(igpt.__all__) <= set(dir(igpt))\n"
                        "from igpt import GPT, load, pretrain\nprint(GPT.__module__, load.__module__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["igpt.weights.convert", "igpt.weights.convert"]
    assert "no attribute 'nope'" in _python("-c", "import igpt; igpt.nope").stderr


def test_every_command_names_a_handler_that_exists():
    todo, handlers = [make_parser()], {}
    while todo:
        parser = todo.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += action.choices.values()
        if "handler" in parser._defaults:
            handlers[parser.prog] = parser._defaults["handler"]
    assert len(handlers) >= 20 and "igpt bench quality run" in handlers
    for prog, name in handlers.items():
        assert callable(named(name)), f"{prog}: {name}"


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_help_and_version_take_a_fraction_of_torchs_import(torch_import_s, command):
    # the bar is 0.5 s; torch takes 2-3 s on a quiet 2-core machine, so a half of that is about as much
    seconds = _fastest("-m", "igpt", *command)
    assert seconds < 0.5 * torch_import_s, f"igpt {' '.join(command)}: {seconds:.2f} s, import torch {torch_import_s:.2f} s"


def test_the_console_script_starts_as_fast(torch_import_s):
    """``igpt`` is ``igpt.cli:main`` (pyproject.toml), not ``python -m igpt``."""
    seconds = _fastest("-c", "import sys\nsys.argv = ['igpt', '--help']\nfrom igpt.cli import main\nmain()")
    assert seconds < 0.5 * torch_import_s, f"{seconds:.2f} s, import torch {torch_import_s:.2f} s"


def test_import_igpt_costs_at_most_half_a_second_beyond_torch(torch_import_s):
    seconds = _fastest("-c", "import igpt")
    assert seconds - torch_import_s < 0.5, f"import igpt {seconds:.2f} s, import torch {torch_import_s:.2f} s"
