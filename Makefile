# make demo | make test | make test-quick | make quality | make style | make bench
# The first target that needs it creates .venv and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: pin torch to the CPU wheel. On GPU machines: make CONSTRAINTS= ...
CONSTRAINTS ?= constraints-cpu.txt
TORCH_PIN := $(shell grep -E '^torch==' $(CONSTRAINTS) 2>/dev/null)
STAMP := $(VENV)/.installed
PYTEST_ENV := HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install demo test test-quick quality style bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(BIN)/python -m pip install -q "$(TORCH_PIN)")
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/elmm-ray run configs/demo.yaml

test: $(STAMP)
	$(PYTEST_ENV) $(BIN)/pytest -q --durations=15

test-quick: $(STAMP)
	$(PYTEST_ENV) $(BIN)/pytest -q -m "not slow"

quality: $(STAMP)
	$(BIN)/ruff check .

style: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Every benchmark (tens of minutes on 2 cores); each prints a table and saves bench/results/*.json
bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache .ruff_cache
