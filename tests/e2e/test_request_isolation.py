"""One request never fails another, against the real server (issue 13 item 5).

A held-out probe sent `top_p` values that are 0 in float32 (1e-300, 5e-324); the sampler indexed
-1, the engine step raised and every live request got a 500. Now such a request gets 400 naming
`top_p` (streaming or not, completions or chat), extreme but valid values are served, and a
greedy request in flight meanwhile completes with exactly the text it has alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

SERVER_ARGS = ["--threads", "2", "--max-model-len", "256", "--kv-cache-memory", "64MiB"]
GREEDY = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
CHAT = [{"role": "user", "content": "Name three colors."}]


def _bad_bodies() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for top_p in (1e-300, 5e-324, 1e-40):
        for stream in (False, True):
            out.append(("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "top_p": top_p,
                                            "stream": stream}))
            out.append(("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4,
                                                 "top_p": top_p, "stream": stream}))
    out.append(("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "seed": 2**64}))
    out.append(("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 1e39}))
    return out


def test_top_p_zero_in_float32_gets_400_and_the_request_in_flight_completes(server: Any) -> None:
    alone = httpx.post(server.url + "/v1/completions", json=GREEDY, timeout=120)
    assert alone.status_code == 200, alone.text
    reference = alone.json()["choices"][0]["text"]

    async def main() -> tuple[httpx.Response, list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            in_flight = asyncio.create_task(c.post("/v1/completions", json=GREEDY))
            await asyncio.sleep(0.5)  # admitted and decoding
            bad = [await c.post(path, json=body) for path, body in _bad_bodies()]
            served = [await c.post("/v1/completions", json={
                "prompt": "Hello", "max_tokens": 3, "top_p": top_p, "temperature": 0.7})
                for top_p in (1e-30, 2.0**-126)]  # tiny but normal in float32: the max token
            return await in_flight, bad, served

    good, bad, served = asyncio.run(main())
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["text"] == reference
    for (path, body), r in zip(_bad_bodies(), bad):
        assert r.status_code == 400, (path, body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] in body, err
        assert err["param"] in err["message"]
    for r in served:
        assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/health").status_code == 200
    server.wait_drained()
