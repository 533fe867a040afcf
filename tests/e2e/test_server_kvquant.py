"""`kvwise serve --kv-cache-dtype nuq3-1%`: completions through a KVQuant cache, KV bytes in
/metrics, and a per-request setting the format cannot run refused without harm."""

from __future__ import annotations

import re
from typing import Any

import httpx

SERVER_ARGS = ["--threads", "1", "--kv-cache-dtype", "nuq3-1%", "--kv-cache-memory", "64MiB",
               "--max-num-batched-tokens", "64"]


def _gauge(text: str, name: str) -> float:
    m = re.search(rf"^kvwise:{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
    assert m, f"no kvwise:{name} in /metrics"
    return float(m.group(1))


def test_completions_and_kv_bytes_in_metrics(server: Any) -> None:
    body = {"model": "smollm2-135m", "prompt": "The printing press changed Europe because",
            "max_tokens": 24, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 24
    stats = server.wait_drained()
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    per_block = _gauge(metrics, "kv_cache_bytes_per_block")
    assert per_block == stats["kv_bytes_per_block"]
    # 30 layers x 16 slots x 3 KV heads x 61 bytes (nuq3-1% with head dim 64) + positions
    assert per_block == 30 * 16 * 3 * 61 + 8 * 16
    assert _gauge(metrics, "kv_cache_bytes_used") == stats["kv_bytes_used"] > 0


def test_compression_request_is_refused_and_the_server_keeps_serving(server: Any) -> None:
    bad = {"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 4,
           "kv_compression": "streaming", "window_tokens": 32}
    r = httpx.post(server.url + "/v1/completions", json=bad, timeout=60)
    assert r.status_code == 400 and "kv_compression" in r.text
    ok = {"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    assert httpx.post(server.url + "/v1/completions", json=ok, timeout=60).status_code == 200
