# The README's two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON_BASE ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PORT ?= 7860

.PHONY: setup demo test bench browser-deps prepare clean-cache

# llama-cpp-python (the serving tests' and the benchmark's llama.cpp) compiles llama.cpp here. Its
# default -march=native turns AMX on wherever cpuid lists it, and on a VM that lists AMX without
# letting a process use the tiles the first decode dies in `ldtilecfg` (seen on a Xeon guest:
# the llama.cpp server tests failed and the generation benchmark crashed). So on x86_64 this
# CPU's other instruction sets are named one by one and AMX stays off.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
has_all = $(if $(strip $(foreach f,$(1),$(if $(filter $(f),$(CPU_FLAGS)),,missing))),OFF,ON)
ggml_isa = -DGGML_$(1)=$(call has_all,$(2))
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF \
  $(call ggml_isa,SSE42,sse4_2) $(call ggml_isa,AVX,avx) $(call ggml_isa,AVX2,avx2) \
  $(call ggml_isa,BMI2,bmi2) $(call ggml_isa,FMA,fma) $(call ggml_isa,F16C,f16c) \
  $(call ggml_isa,AVX_VNNI,avx_vnni) $(call ggml_isa,AVX512,avx512f avx512cd avx512vl avx512dq avx512bw) \
  $(call ggml_isa,AVX512_VBMI,avx512vbmi) $(call ggml_isa,AVX512_VNNI,avx512_vnni) \
  $(call ggml_isa,AVX512_BF16,avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)

$(STAMP): pyproject.toml
	$(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: this machine's CPU wheel; an open range would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# built on its own first, never from a wheel cached by an earlier (native) build; the same
	# CMAKE_ARGS below in case pyproject.toml's llama-cpp-python range ever asks for a rebuild
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-cache-dir 'llama-cpp-python[server]>=0.3'
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

prepare: setup
	$(PY) -m assistant prepare

demo: prepare
	$(PY) app.py --port $(PORT)

# Browser tests drive Debian's Chromium (never a downloaded browser build); dciodvfy (dicom3tools)
# validates exported DICOM SR; Orthanc with its DICOMweb plugin is the test PACS (tests/test_pacs.py).
ORTHANC_DICOMWEB := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
browser-deps:
	@command -v chromium >/dev/null 2>&1 && command -v dciodvfy >/dev/null 2>&1 \
	  && command -v Orthanc >/dev/null 2>&1 && test -e $(ORTHANC_DICOMWEB) || { \
	  echo "installing Debian chromium, dicom3tools and orthanc(-dicomweb) for the tests"; \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium dicom3tools \
	    orthanc orthanc-dicomweb >/dev/null; }

test: setup browser-deps
	$(PY) -m pytest -q

# Every number in the README's Results section: the benchmarks and evaluations write JSON under
# benchmarks/results/, then report.py renders the section. Run on a quiet machine (decoding is
# memory-bound; a busy machine is recorded and flagged). About 1.5 hours on 2 CPU cores, most of
# it the 1M-vector retrieval builds and the report evaluation; EVAL_LIMIT= (empty) scores all 590.
EVAL_LIMIT ?= 20
bench: prepare
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/retrieval.py
	$(PY) benchmarks/generation.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/train_parallel.py
	$(PY) -m assistant evaluate --task triage
	$(PY) -m assistant evaluate --task report $(if $(EVAL_LIMIT),--limit $(EVAL_LIMIT))
	$(PY) benchmarks/report.py
