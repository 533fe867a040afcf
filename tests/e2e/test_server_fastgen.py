"""FastGen through the server: a request turns it on in its extra body, /metrics shows the
KV it keeps against the full cache while it runs, and bad settings are refused by field."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

SERVER_ARGS = ["--threads", "1", "--kv-cache-memory", "64MiB"]
PROMPT = ("The history of the printing press begins in the fifteenth century, when movable "
          "type made books cheap enough for ordinary readers. ") * 6


def _gauge(text: str, name: str) -> float:
    m = re.search(rf"^kvwise:{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
    assert m, f"no kvwise:{name} in /metrics"
    return float(m.group(1))


def test_fastgen_request_keeps_less_kv_while_it_runs(server: Any) -> None:
    body = {"model": "smollm2-135m", "prompt": PROMPT, "max_tokens": 48, "temperature": 0,
            "ignore_eos": True, "stream": True, "kv_compression": "fastgen",
            "recovery_threshold": 0.9}
    ratios, tokens = [], 0
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            tokens += bool(json.loads(line[6:])["choices"][0]["text"])
            if tokens in (8, 24):
                metrics = httpx.get(server.url + "/metrics", timeout=30).text
                ratios.append(_gauge(metrics, "kv_cache_kept_ratio"))
    assert len(ratios) == 2 and max(ratios) < 1.0, ratios
    server.wait_drained()
    assert _gauge(httpx.get(server.url + "/metrics", timeout=30).text,
                  "kv_cache_kept_ratio") == 1.0


def test_bad_fastgen_setting_is_refused_by_field(server: Any) -> None:
    bad = {"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 4,
           "kv_compression": "fastgen", "recovery_threshold": 2}
    r = httpx.post(server.url + "/v1/completions", json=bad, timeout=60)
    assert r.status_code == 400 and "recovery_threshold" in r.text
