# Set-up and test commands. `make test` and `make demo` work on a fresh machine with only Python and a compiler.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
DATA_DIR ?= $(if $(LRSPARSE_DATA_DIR),$(LRSPARSE_DATA_DIR),../shared/data)
PYTEST_ARGS ?=

.PHONY: venv install dev test test-fast demo cuda-check bench-ops clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja numpy
	touch $@

venv: $(VENV)/.deps

# Wheel install of the package (extension built against the venv's torch) with the test extras.
install: | $(VENV)/.deps
	$(PIP) install --no-build-isolation ".[test,data,plot,export,hf,tensorboard]"

# In-place development build: compiles lrsparse/_C into python/lrsparse (use with PYTHONPATH=python).
dev: | $(VENV)/.deps
	$(PY) -m cmake -S . -B build/dev -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) \
	    -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) -DLRSPARSE_CUDA=$${LRSPARSE_CUDA:-AUTO} >/dev/null
	$(PY) -m cmake --build build/dev
	cp build/dev/_C*.so python/lrsparse/

test: install
	cd tests && LRSPARSE_DATA_DIR=$(abspath $(DATA_DIR)) ../$(PY) -m pytest -q $(PYTEST_ARGS)

# LPAF on SST-2 at keep 0.25, sized for about 15 minutes on 2 CPU cores: 10,000 training sentences, one epoch per
# stage (dense fine-tuning, pruning, mixed-rank fine-tuning: 313 steps each at batch 32), full dev set after every
# stage. DEMO_ARGS=--resume continues an interrupted demo instead of starting over.
DEMO_DIR ?= runs/demo-sst2-keep0.25
DEMO_ARGS ?= --overwrite
demo: install
	$(PY) -m lrsparse.cli compress --task sst2 --keep 0.25 --data-dir $(abspath $(DATA_DIR))/glue \
	    --output $(DEMO_DIR) --max-train-samples 10000 --epochs 1 --seed 0 --no-inspect $(DEMO_ARGS)
	$(PY) -m lrsparse.cli inspect $(DEMO_DIR)

# Compile-check of the raw CUDA kernels (no torch headers needed); CI runs it when nvcc is present.
cuda-check:
	@for f in csrc/cuda/*_kernels.cu; do \
	    [ -e "$$f" ] || continue; echo "nvcc -c $$f"; \
	    nvcc -std=c++17 -arch=sm_80 -gencode arch=compute_90,code=sm_90 -Icsrc -c "$$f" -o /tmp/lrsparse_$$(basename $$f).o || exit 1; \
	done

bench-ops: install
	$(PY) benchmarks/ops.py --json benchmarks/results/ops_cpu.json --markdown benchmarks/results/ops_cpu.md

clean:
	rm -rf build python/lrsparse/_C*.so
