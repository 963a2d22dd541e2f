# The two commands of the README: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3

.PHONY: install demo test

# torch first, pinned to the CPU wheel this project is tested with, unless a torch is already there
# (a GPU machine's CUDA build must not be replaced).
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test,hf]'

demo: install
	$(PYTHON) -m igpt demo

test: install
	$(PYTHON) -m pytest -q -n auto --dist loadfile
