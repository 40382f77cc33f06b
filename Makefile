# Two entry points for a fresh machine: `make train` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ENV_ID ?= CartPole-v1
STEPS ?= 20000

.PHONY: install train test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# any torch>=2.3 works; prefer the CPU wheel where one is available locally (much smaller than a CUDA build)
	$(PY) -m pip install --quiet "torch==2.13.0" 2>/dev/null || $(PY) -m pip install --quiet "torch>=2.3"
	$(PY) -m pip install --quiet -e ".[zoo,tests]"
	touch $@

install: $(VENV)/.installed

# Train DreamerV2 through the zoo launcher on a default environment and print its evaluation.
train: install
	MPLBACKEND=Agg $(PY) -m sb3_dreamer.zoo train --algo dreamerv2 --env $(ENV_ID) -n $(STEPS) \
		--log-folder logs --eval-freq 5000 --eval-episodes 10 --seed 0
	MPLBACKEND=Agg $(PY) -m sb3_dreamer.zoo enjoy --algo dreamerv2 --env $(ENV_ID) -f logs \
		--no-render -n 2000 --deterministic

test: install
	MPLBACKEND=Agg $(PY) -m pytest -n 2 --durations=15 tests

lint: install
	$(PY) -m ruff check sb3_dreamer tests benchmarks

clean:
	rm -rf $(VENV) logs .pytest_cache
