"""The load generator of `kvwise bench serve`: timed streaming completions and their summary.

`run_rate` sends one rate's prompts to an OpenAI-compatible server at the given arrival offsets
(each request on its own connection, none waiting for another) and returns a `RateSummary`:
TTFT, TPOT and end-to-end latency percentiles, output throughput and SLO attainment, the fraction
of requests with TTFT <= `ttft_s` and TPOT <= `tpot_s` (DistServe, Zhong et al. 2024, section 2).

Definitions (per request, wall-clock from `time.perf_counter` in this process):
- TTFT: from sending the request to the first streamed chunk carrying text.
- e2e: from sending the request to the end of the stream.
- TPOT: (e2e - TTFT) / (output tokens - 1); output tokens come from the stream's usage chunk when
  the server sends one, else are counted as text chunks.

Invariants:
- A failed request (HTTP error, error event, no output, timeout after `request_timeout` seconds)
  counts against attainment and its error is reported, never silently dropped.
- Every request is bounded in time, so one rate's run ends by its last arrival + request_timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float
    min_attainment: float = 0.9  # a rate is sustained when at least this fraction meets both


@dataclass
class RequestResult:
    ok: bool = False
    error: Optional[str] = None
    ttft: Optional[float] = None
    e2e: Optional[float] = None
    output_tokens: int = 0

    @property
    def tpot(self) -> Optional[float]:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def meets(self, slo: Slo) -> bool:
        return (self.ok and self.ttft is not None and self.ttft <= slo.ttft_s
                and (self.tpot is None or self.tpot <= slo.tpot_s))


@dataclass(frozen=True)
class RateSummary:
    engine: str
    rate: float  # offered requests/s
    num_requests: int
    num_failed: int
    duration_s: float  # first send to last response
    latency_s: dict[str, float]  # "ttft_p50", "ttft_p99", "tpot_p50", ..., "e2e_p99"
    attainment: float
    output_tok_s: float
    mean_output_tokens: float
    errors: tuple[str, ...] = field(default=())

    def line(self) -> str:
        """`serve engine=.. rate=..` with seconds for ttft/e2e and milliseconds for tpot."""
        lat = self.latency_s
        parts = [f"serve engine={self.engine} rate={self.rate:g}"]
        for name in ("ttft", "tpot", "e2e"):
            unit, scale = ("ms", 1e3) if name == "tpot" else ("s", 1.0)
            parts += [f"{name}_{q}_{unit}={lat[f'{name}_{q}'] * scale:.3f}" for q in ("p50", "p99")]
        parts += [f"attainment={self.attainment:.3f}", f"throughput_tok_s={self.output_tok_s:.1f}",
                  f"out_tokens_mean={self.mean_output_tokens:.1f}",
                  f"requests={self.num_requests}", f"failed={self.num_failed}"]
        return " ".join(parts)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def summarize(engine: str, rate: float, results: list[RequestResult], duration: float,
              slo: Slo) -> RateSummary:
    ok = [r for r in results if r.ok]
    latency: dict[str, float] = {}
    for name, values in (("ttft", [r.ttft for r in ok if r.ttft is not None]),
                         ("tpot", [r.tpot for r in ok if r.tpot is not None]),
                         ("e2e", [r.e2e for r in ok if r.e2e is not None])):
        latency[f"{name}_p50"] = percentile(values, 50)
        latency[f"{name}_p99"] = percentile(values, 99)
    tokens = sum(r.output_tokens for r in ok)
    return RateSummary(
        engine=engine, rate=rate, num_requests=len(results), num_failed=len(results) - len(ok),
        duration_s=duration, latency_s=latency,
        attainment=sum(r.meets(slo) for r in results) / len(results) if results else 0.0,
        output_tok_s=tokens / duration if duration > 0 else 0.0,
        mean_output_tokens=tokens / len(ok) if ok else 0.0,
        errors=tuple(sorted({r.error for r in results if r.error})[:5]))


async def _one(client: Any, body: dict[str, Any]) -> RequestResult:
    res = RequestResult()
    t0 = time.perf_counter()
    chunks = 0
    usage_tokens: Optional[int] = None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return res
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                res.error = str(chunk["error"].get("message", "error event"))[:200]
                return res
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                chunks += 1
                if res.ttft is None:
                    res.ttft = time.perf_counter() - t0
    res.e2e = time.perf_counter() - t0
    res.output_tokens = usage_tokens if usage_tokens is not None else chunks
    res.ok = res.ttft is not None and res.output_tokens > 0
    if not res.ok:
        res.error = "no output tokens"
    return res


async def _timed_one(client: Any, body: dict[str, Any], timeout: float) -> RequestResult:
    try:
        return await asyncio.wait_for(_one(client, body), timeout)
    except TimeoutError:
        return RequestResult(error=f"timeout after {timeout:g} s")
    except Exception as e:  # a benchmark reports failures instead of stopping
        return RequestResult(error=repr(e)[:200])


async def _run(url: str, bodies: list[dict[str, Any]], offsets: list[float],
               headers: dict[str, str], timeout: float) -> tuple[list[RequestResult], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None,
                                 limits=limits) as client:
        start = time.perf_counter()

        async def launch(body: dict[str, Any], at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            return await _timed_one(client, body, timeout)

        results = await asyncio.gather(*(launch(b, at) for b, at in zip(bodies, offsets)))
        return list(results), time.perf_counter() - start


def served_model(url: str, headers: dict[str, str]) -> str:
    import httpx

    resp = httpx.get(url + "/v1/models", headers=headers, timeout=30)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def request_body(model: str, prompt: str, max_tokens: int,
                 extras: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, **extras}


def run_rate(engine: str, url: str, model: str, prompts: list[str], offsets: list[float], *,
             rate: float, max_tokens: int, extras: dict[str, Any], slo: Slo,
             headers: dict[str, str], request_timeout: float) -> RateSummary:
    """Send `prompts[i]` at `offsets[i]` seconds; summarize once every request has ended."""
    bodies = [request_body(model, p, max_tokens, extras) for p in prompts]
    results, duration = asyncio.run(_run(url, bodies, offsets, headers, request_timeout))
    return summarize(engine, rate, results, duration, slo)


def warm_up(url: str, model: str, max_tokens: int, extras: dict[str, Any],
            headers: dict[str, str], request_timeout: float) -> Optional[str]:
    """One unmeasured request (first-call costs); returns its error, if any."""
    body = request_body(model, "def fibonacci(n):\n", max_tokens, extras)
    (result,), _ = asyncio.run(_run(url, [body], [0.0], headers, request_timeout))
    return result.error
