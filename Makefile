# The commands of the README: `make demo`, `make test` (the whole suite, what CI runs) and `make test-fast` (the
# suite without the tests marked slow). demo and test install what they need first.
PYTHON ?= python3

.PHONY: install demo test test-fast

# torch first, pinned to the CPU wheel this project is tested with, unless a torch is already there
# (a GPU machine's CUDA build must not be replaced).
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test,hf]'

demo: install
	$(PYTHON) -m igpt demo

test: install
	$(PYTHON) -m pytest -q -n auto --dist loadfile

# What install puts in place, by import name. test-fast runs install only when the igpt distribution or one of
# these is missing: an install that finds everything present still rebuilds igpt's editable wheel, which takes
# longer than many of the fast tests. After a change to the dependencies in pyproject.toml, run `make install`.
TEST_MODULES := torch pytest xdist importlinter gradio playwright transformers

# Everything but the tests marked slow (pyproject.toml): those that start the CLI, torchrun, a server or a
# browser in other processes, or take more than a few seconds.
test-fast:
	$(PYTHON) -c "import importlib.metadata as m, importlib.util as u, sys; m.version('igpt'); \
	sys.exit(any(u.find_spec(n) is None for n in sys.argv[1:]))" $(TEST_MODULES) 2>/dev/null || $(MAKE) install
	$(PYTHON) -m pytest -q -n auto --dist loadfile -m "not slow"
