# Two commands do all the set-up:   make demo   (run the demo)   make test   (run the tests).
# Both create .venv with python3 -m venv if it is missing and install into it once: torch pinned
# first (an unpinned torch pulls GBs of CUDA wheels), then the package with its test extra, torch
# still pinned, every package at the version in constraints.txt (pip -c: the versions the suite
# last passed with, so a fresh machine tests what CI tested; pyproject.toml keeps loose floors).
# The install is redone only when pyproject.toml or constraints.txt changes (stamp file in .venv).
#
#   make demo ARGS="--forget 7 --steps 200"    pass options to `spare demo`
#   make test ARGS="tests/test_cli.py -x"      pass options to pytest
#   make install                               only set up .venv
#   make constraints                           refresh constraints.txt on purpose: a fresh resolve
#                                              of pyproject's floors in $(CVENV), the whole suite
#                                              run there, then its pip freeze written (only if the
#                                              suite passed); commit it with the result
#   make clean-venv                            delete .venv

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# extra pip options for the torch step (e.g. an --index-url of CPU-only wheels)
TORCH_PIP_ARGS ?=
CONSTRAINTS ?= constraints.txt
# scratch venv of `make constraints`
CVENV ?= /tmp/spare-constraints-venv
ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) | cksum | cut -d' ' -f1)

.PHONY: demo test install constraints clean-venv

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
	$(PY) -m pip install $(TORCH_PIP_ARGS) "$(TORCH)" -c $(CONSTRAINTS)
	$(PY) -m pip install -e ".[test]" "$(TORCH)" -c $(CONSTRAINTS)
	$(PY) -c "import torch, spare_core; print('torch', torch.__version__, '| spare_core', spare_core.__version__)"
	touch $@

# Not -c: the point is to pick up what the floors resolve to today. torch stays $(TORCH), written
# without its local label (+cpu/+cu128) so the pin fits every build of that version.
constraints:
	rm -rf $(CVENV)
	$(PYTHON) -m venv $(CVENV)
	$(CVENV)/bin/python -m pip install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(CVENV)/bin/python -m pip install -e ".[test]" "$(TORCH)"
	$(CVENV)/bin/python -m pytest -q $(ARGS)
	{ grep '^#' $(CONSTRAINTS); $(CVENV)/bin/python -m pip freeze --exclude-editable \
	  | sed -E 's/^torch==([^+]*)\+.*/torch==\1/'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(CVENV)
	@echo "$(CONSTRAINTS) rewritten from a passing suite: review git diff $(CONSTRAINTS), then commit it"

clean-venv:
	rm -rf $(VENV)
