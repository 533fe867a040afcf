"""A real server with one sequence slot, one queue slot and an API key (RELIABILITY #4, security),
ending with a SIGTERM while requests are in flight (graceful shutdown, exit status 0).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from typing import Any

import httpx
import openai
import pytest

API_KEY = "test-key-123"
# room for a request long enough to outlast the 4 s shutdown grace at any decode speed
SERVER_ARGS = ["--threads", "2", "--max-model-len", "2048", "--kv-cache-memory", "160MiB",
               "--max-num-seqs", "1", "--max-queued-requests", "1", "--shutdown-timeout", "4"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_api_key_guards_everything_but_health_and_metrics(server: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("GET", "/v1/kvwise/stats"), ("POST", "/tokenize"),
                             ("GET", "/openapi.json")):
            r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "a"})
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200
    assert "kvwise:num_requests_running" in httpx.get(server.url + "/metrics").text
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert oai.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    server.wait_drained()


def test_queue_limit_answers_503_without_hanging(server: Any) -> None:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json={
                "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True})
                for _ in range(10)))

    t0 = time.monotonic()
    resps = asyncio.run(main())
    assert time.monotonic() - t0 < 60
    codes = sorted(r.status_code for r in resps)
    assert codes == [200] * 2 + [503] * 8, codes
    for r in resps:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 16
    server.wait_drained()
    metrics = httpx.get(server.url + "/metrics").text
    assert 'kvwise:request_rejected_total{model_name="smollm2-135m",reason="queue_full"} 8.0' \
        in metrics
    # the server is still healthy and serving
    r = httpx.post(server.url + "/v1/completions", headers=AUTH,
                   json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_sigterm_finishes_in_flight_then_exits_0(server: Any) -> None:
    """SIGTERM: the running request finishes; one that cannot finish within --shutdown-timeout
    is cut off; the process exits 0."""
    results: dict[str, Any] = {}

    def stream(name: str, max_tokens: int) -> None:
        events: list[Any] = []
        try:
            with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, timeout=120,
                              json={"prompt": "Once upon a time", "max_tokens": max_tokens,
                                    "ignore_eos": True, "stream": True}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:] if line == "data: [DONE]" else
                                      json.loads(line[6:]))
        except httpx.HTTPError as e:
            events.append(e)
        results[name] = events

    short = threading.Thread(target=stream, args=("short", 8))
    short.start()
    time.sleep(0.3)
    long = threading.Thread(target=stream, args=("long", 2000))  # > 4 s even at 400 tok/s
    long.start()
    deadline = time.monotonic() + 30
    while server.stats()["generation_tokens_total"] == 0 or server.stats()["num_running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    short.join(30)
    long.join(30)
    events = results["short"]
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert results["long"][-1] != "[DONE]"  # cut off after the grace period
