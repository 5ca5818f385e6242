# fedge: two commands on a fresh Linux machine with Python 3.11.
#   make demo   set up .venv and run the main demo
#   make test   set up .venv and run ruff, mypy --strict and the test suite
#   make test-containers   build the container images and run them with Podman
#   make test-lab          run fedge lab: a shaped, faulty 4-device fleet (2 emulated arm64)
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedge-installed
# The CPU build of PyTorch, pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: demo test test-containers test-lab lint typecheck unit bench clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,torch,ray]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedge demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict src

unit: $(STAMP)
	$(VENV)/bin/pytest -m "not containers and not lab" -rs --durations=15

# Builds the images from offline bundles and runs them with Podman (root; see docs/deployment.md).
test-containers: $(STAMP)
	$(VENV)/bin/pytest -m containers

# fedge lab end to end: namespaces, shaped links, emulated arm64 agents in Podman (root; docs/lab.md).
# The images it builds are cached in Podman's store between runs on the same machine.
test-lab: $(STAMP)
	$(VENV)/bin/pytest -m lab -rs

test: lint typecheck unit

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
