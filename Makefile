# Set-up and everyday commands. `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The exact torch build installed first: on the project's machines this is a local CPU wheel; on
# yours pip takes the normal wheel for your platform. The project itself only asks for torch>=2.4.
TORCH ?= torch==2.13.0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow test-all demo sft-demo team-demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# `make test`: everything but the tests marked slow (12 min on 2 CPU cores); `make test-slow`: those
# (kill -9 and SIGTERM of real pipelines, two commands at once, N-process training, the team pool, real tiny
# studies: 12.5 min more); `make test-all`: both in one run. CI (.ci/run) runs test, then test-slow.
test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python -m flows.squeeze_pipeline configs/demo.yaml

# The same pipeline on a real instruct decoder: SmolLM2-135M-Instruct (installed once into ~/.cache/lsq) fine-tuned
# on two-digit addition, scored by exact match of the greedy answer against the base model's zero-shot score.
sft-demo: install
	$(BIN)/python -m flows.squeeze_pipeline configs/sft-demo.yaml

# The team stack on one machine (PostgreSQL, S3, MLflow server, Prefect server, workers), one run across
# two workers; every process it starts stops with it. Last stdout line: a JSON summary.
team-demo: install
	$(BIN)/python -m deployments.team_demo

bench: install
	$(BIN)/python -m benchmarks.squeeze_speed
	$(BIN)/python -m benchmarks.insqueeze_overhead

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
