# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint typecheck pytest unit-sealed demo bench clean

venv: $(STAMP)

# torch goes in first: a bare `torch` requirement lets pip resolve a multi-GB CUDA
# build; on a machine without an NVIDIA GPU we pin the CPU build that lies on disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch==2.13.0; fi
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check supervisor trainer_child tests bench examples
	$(BIN)/ruff format --check supervisor trainer_child tests bench examples

typecheck: venv
	$(BIN)/mypy

# Two workers (one a core); whole files stay on one worker so module fixtures are
# shared. Tests that really OOM-kill in a memory cgroup run alone afterwards;
# --require-run makes that stage fail if it ran nothing (see tests/conftest.py).
pytest: venv
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -m serial --require-run

# tests/unit in a mount namespace where every filesystem is read-only and /proc
# is empty: proof that the unit tests write nothing and read no /proc (root only).
unit-sealed: venv
	tests/system/run_sealed.sh $(BIN)/python -m pytest tests/unit -q -p no:cacheprovider --capture=sys

test: lint typecheck pytest

demo: venv
	$(BIN)/trainwarden demo

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
