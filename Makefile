# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
UPOP := $(VENV)/bin/upop
DEMO_BASE ?= runs/demo-base
DEMO_OUT ?= runs/demo-2x

.PHONY: venv test demo bench lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

test: venv
	OMP_NUM_THREADS=2 $(PY) -m pytest -q --durations=8 tests

# Trains a tiny ViT on the built-in shapes world once (cached in $(DEMO_BASE)), then compresses it 2x.
demo: venv
	@if [ ! -f $(DEMO_BASE)/model.safetensors ]; then \
		$(UPOP) train --task classification --model vit-tiny --epochs 12 --output-dir $(DEMO_BASE); \
	fi
	$(UPOP) compress --task classification --model vit-tiny --pretrained $(DEMO_BASE)/model.safetensors \
		--p 0.5 --epochs-search 2 --epochs 2 --output-dir $(DEMO_OUT) --overwrite

# Torch-Pruning is a benchmark-only extra (the peer comparison), never a runtime dependency.
bench: venv
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	$(PY) benchmarks/bench_vit.py
	$(PY) benchmarks/bench_clip.py
	$(PY) benchmarks/bench_blip.py
	$(PY) benchmarks/bench_seg.py
	$(PY) benchmarks/search_cost.py --out benchmarks/results_search_cost.json
	$(PY) benchmarks/bench_peers.py
	$(PY) benchmarks/bench_peers.py --study

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs
