# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
UPOP := $(VENV)/bin/upop
PIP := $(VENV)/bin/pip install --quiet -c constraints.txt
DEMO_BASE ?= runs/demo-base
DEMO_OUT ?= runs/demo-2x

.PHONY: venv test test-fast demo bench bench-peers lint docs docs-check clean

# The exact set the tests ran with (constraints.txt) within the ranges pyproject.toml allows.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# The whole suite (CI runs it). `make test-fast` skips the tests marked slow, ddp or e2e (about a minute).
test: venv
	OMP_NUM_THREADS=2 $(PY) -m pytest -q --durations=8 tests

test-fast: venv
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m "not slow and not ddp and not e2e" tests

# Trains a tiny ViT on the built-in shapes world once (cached in $(DEMO_BASE)), then compresses it 2x.
demo: venv
	@if [ ! -f $(DEMO_BASE)/model.safetensors ]; then \
		$(UPOP) train --task classification --model vit-tiny --epochs 12 --output-dir $(DEMO_BASE); \
	fi
	$(UPOP) compress --task classification --model vit-tiny --pretrained $(DEMO_BASE)/model.safetensors \
		--p 0.5 --epochs-search 2 --epochs 2 --output-dir $(DEMO_OUT) --overwrite

# ruff, and the layer contract (pyproject.toml [tool.importlinter]).
lint: venv
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/lint-imports

# The docs site (mkdocs, the .[docs] extra) into site/, strictly: a broken link, snippet or reference fails.
docs: venv
	$(PIP) -e '.[docs]'
	$(PY) benchmarks/tables.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

# Every command the docs show, run (tests/test_docs.py); `make docs` first builds the tables they include.
docs-check: venv
	OMP_NUM_THREADS=2 $(PY) -m pytest -q tests/test_docs.py

# Torch-Pruning is a benchmark-only extra (the peer comparison), never a runtime dependency. The peer comparison
# runs in parts: `make bench-peers PEERS=nlvr` (any of the tasks of benchmarks/bench_peers.py, comma-separated).
PEERS ?= classification,retrieval,nlvr,blip-retrieval,caption,vqa,segmentation
bench-peers: venv
	$(PIP) -e '.[bench]'
	$(PY) benchmarks/bench_peers.py --tasks $(PEERS)

bench: venv
	$(PIP) -e '.[bench]'
	$(PY) benchmarks/bench_vit.py
	$(PY) benchmarks/bench_clip.py
	$(PY) benchmarks/bench_blip.py
	$(PY) benchmarks/bench_seg.py
	$(PY) benchmarks/search_cost.py --out benchmarks/results/search_cost.json
	$(PY) benchmarks/bench_peers.py
	$(PY) benchmarks/bench_peers.py --study
	$(PY) benchmarks/tables.py

clean:
	rm -rf runs site
