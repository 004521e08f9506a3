# Two commands do all the set-up:   make demo   (run the demo)   make test   (run the tests).
# Both create .venv with python3 -m venv if it is missing and install into it once: torch pinned
# first (an unpinned torch pulls GBs of CUDA wheels), then the package with its test extra, torch
# still pinned. The install is redone only when pyproject.toml changes (stamp file in .venv).
#
#   make demo ARGS="--forget 7 --steps 200"    pass options to `spare demo`
#   make test ARGS="tests/test_cli.py -x"      pass options to pytest
#   make install                               only set up .venv
#   make clean-venv                            delete .venv

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# extra pip options for the torch step (e.g. an --index-url of CPU-only wheels)
TORCH_PIP_ARGS ?=
ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: demo test install clean-venv

demo: $(STAMP)
	$(VENV)/bin/spare demo --overwrite $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

install: $(STAMP)

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "error: '$(PYTHON)' is missing or older than Python 3.10; install Python >= 3.10 or run make PYTHON=/path/to/python3.X" >&2; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "error: '$(PYTHON) -m venv' is not available (no venv/ensurepip module)." >&2; \
	  echo "  On Debian/Ubuntu: sudo apt install python3-venv (or python3.X-venv for your version), then run make again." >&2; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)

$(STAMP): | $(PY)
	rm -f $(VENV)/.installed-*
	$(PY) -m pip install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install -e ".[test]" "$(TORCH)"
	$(PY) -c "import torch, spare_core; print('torch', torch.__version__, '| spare_core', spare_core.__version__)"
	touch $@

clean-venv:
	rm -rf $(VENV)
