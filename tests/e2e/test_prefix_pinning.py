"""Pinning a prefix: `LLM.pin_prefix` / `unpin_prefix` and the server's /v1/kvwise/pin_prefix,
/v1/kvwise/unpin_prefix and prefix-cache series in /metrics, over one real engine (block 16)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from kvwise import LLM, SamplingParams
from kvwise.errors import InvalidRequestError
from tests.conftest import pydoc_text
from tests.e2e.test_server_frontend import InProcessServer


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2-135m", threads=1, max_model_len=256, num_blocks=24)


@pytest.fixture(scope="module")
def prefix(llm: LLM) -> list[int]:
    return llm.get_tokenizer().encode(pydoc_text()[:2000], add_special_tokens=False)[:40]


def _pinned(llm: LLM) -> int:
    return llm.stats()["num_blocks_pinned"]


def test_llm_pin_computes_then_pins_and_survives_eviction(llm: LLM, prefix: list[int]) -> None:
    assert llm.pin_prefix(prefix) == 32  # 2 full blocks; the 8-token tail is not pinned
    assert llm.stats()["prompt_tokens_total"] == 40  # computed once by a 1-token generation
    assert _pinned(llm) == 2
    assert llm.pin_prefix(prefix) == 32  # nested pin, nothing recomputed
    assert llm.stats()["prompt_tokens_total"] == 40
    # fill the pool with other prompts: the pinned chunks are never evicted
    text = llm.get_tokenizer().encode(pydoc_text()[5000:9000], add_special_tokens=False)
    others = [text[i * 100:(i + 1) * 100] for i in range(6)]
    llm.generate(others, SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    assert llm.stats()["num_evictions"] > 0
    hits = llm.stats()["prefix_hit_tokens"]
    llm.generate([prefix + [11, 12]], SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.stats()["prefix_hit_tokens"] - hits == 32
    assert llm.unpin_prefix(prefix) == 32
    assert _pinned(llm) == 2  # pins nest: one pin left
    assert llm.unpin_prefix(prefix) == 32
    assert _pinned(llm) == 0
    assert llm.unpin_prefix(prefix) == 0
    llm.engine.check_integrity()


def test_pin_needs_prefix_caching() -> None:
    llm = LLM("smollm2-135m", threads=1, max_model_len=64, num_blocks=8,
              enable_prefix_caching=False)
    with pytest.raises(InvalidRequestError):
        llm.pin_prefix([1, 2, 3])


@pytest.fixture(scope="module")
def srv(llm: LLM) -> Any:
    s = InProcessServer(llm.engine)
    yield s
    s.stop()


def test_server_pin_unpin_and_metrics(srv: InProcessServer, llm: LLM, prefix: list[int]) -> None:
    body = {"prompt": list(reversed(prefix))}  # a prefix the engine has not seen
    before = llm.stats()["prompt_tokens_total"]
    r = httpx.post(srv.url + "/v1/kvwise/pin_prefix", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json() == {"num_tokens": 32}
    stats = httpx.get(srv.url + "/v1/kvwise/stats", timeout=30).json()
    assert stats["prompt_tokens_total"] == before + 40
    assert stats["num_blocks_pinned"] == 2
    metrics = httpx.get(srv.url + "/metrics", timeout=30).text
    for series in ("prefix_cache_queries_total", "prefix_cache_hits_total",
                   "prefix_cache_shared_blocks", "prefix_cache_private_blocks",
                   "prefix_cache_pinned_blocks{"):
        assert f"kvwise:{series}" in metrics
    assert 'kvwise:prefix_cache_pinned_blocks{model_name="fake"} 2.0' in metrics
    r = httpx.post(srv.url + "/v1/kvwise/unpin_prefix", json=body, timeout=30)
    assert r.json() == {"num_tokens": 32}
    r = httpx.post(srv.url + "/v1/kvwise/pin_prefix", json={"prompt": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(srv.url + "/v1/kvwise/pin_prefix", json={"prompt": [10**6]}, timeout=30)
    assert r.status_code == 400
