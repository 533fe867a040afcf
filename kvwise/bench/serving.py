"""`kvwise bench serve`: online serving benchmark over HTTP with Poisson arrivals.

Sends `--num-prompts` streaming completions of exactly `--input-len` prompt tokens (random token
ids) and `--output-len` output tokens (`ignore_eos`) to an OpenAI-compatible server, with
exponential inter-arrival times of mean 1/`--request-rate` (inf = all at once), and reports
throughput, TTFT, TPOT, inter-token latency and SLO attainment: the fraction of requests with
TTFT <= `--slo-ttft` and TPOT <= `--slo-tpot` (DistServe, Zhong et al. 2024, section 2).

Without `--url` it starts `kvwise serve` on a free loopback port with the engine flags given,
and stops it afterwards.

Invariants:
- The workload depends only on `--seed` (prompts and arrival times), so runs are comparable.
- A failed request (HTTP error, error event, short output) counts against SLO attainment and is
  reported, never silently dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from kvwise.config import ENGINE_FLAGS, add_engine_args


@dataclass
class ServingWorkload:
    num_prompts: int = 32
    input_len: int = 64
    output_len: int = 32
    request_rate: float = 2.0  # requests/s; math.inf: all at once
    seed: int = 0
    token_range: tuple[int, int] = (1000, 20000)  # ordinary tokens in any sizeable vocab

    def prompts(self) -> list[list[int]]:
        rng = random.Random(self.seed)
        return [[rng.randrange(*self.token_range) for _ in range(self.input_len)]
                for _ in range(self.num_prompts)]

    def arrival_offsets(self) -> list[float]:
        rng = random.Random(self.seed + 1)
        t, out = 0.0, []
        for _ in range(self.num_prompts):
            out.append(t)
            if math.isfinite(self.request_rate):
                t += rng.expovariate(self.request_rate)
        return out


@dataclass
class RequestResult:
    ok: bool = False
    error: Optional[str] = None
    ttft: Optional[float] = None
    e2e: Optional[float] = None
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> Optional[float]:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def _one(client: Any, model: str, prompt: list[int], output_len: int) -> RequestResult:
    res = RequestResult()
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error event")
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - t0
        res.ok = res.output_tokens == output_len
        if not res.ok:
            res.error = f"got {res.output_tokens} of {output_len} output tokens"
    except Exception as e:  # a benchmark reports failures instead of stopping
        res.error = repr(e)
    return res


async def _run_load(url: str, model: str, workload: ServingWorkload, api_key: Optional[str],
                    max_concurrency: Optional[int]) -> tuple[list[RequestResult], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or workload.num_prompts)
    sem = asyncio.Semaphore(max_concurrency or workload.num_prompts)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None,
                                 limits=limits) as client:
        start = time.perf_counter()

        async def launch(prompt: list[int], at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            async with sem:
                return await _one(client, model, prompt, workload.output_len)

        results = await asyncio.gather(*(launch(p, at) for p, at in zip(
            workload.prompts(), workload.arrival_offsets())))
        return list(results), time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def summarize(results: list[RequestResult], duration: float, workload: ServingWorkload,
              slo_ttft: float, slo_tpot: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out: dict[str, Any] = {
        "num_requests": len(results), "num_failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": sum(r.output_tokens for r in ok) / duration if duration else 0.0,
        "workload": asdict(workload),
    }
    for name, values in (("ttft", [r.ttft for r in ok if r.ttft is not None]),
                         ("tpot", [r.tpot for r in ok if r.tpot is not None]),
                         ("itl", [x for r in ok for x in r.itls]),
                         ("e2e", [r.e2e for r in ok if r.e2e is not None])):
        out[f"mean_{name}_s"] = statistics.fmean(values) if values else float("nan")
        out[f"p50_{name}_s"] = _pct(values, 50)
        out[f"p99_{name}_s"] = _pct(values, 99)
    met = [r for r in ok if r.ttft is not None and r.ttft <= slo_ttft
           and (r.tpot is None or r.tpot <= slo_tpot)]
    out["slo"] = {"ttft_s": slo_ttft, "tpot_s": slo_tpot,
                  "attainment": len(met) / len(results) if results else 0.0}
    out["errors"] = sorted({r.error for r in results if r.error})[:5]
    return out


def run_serving_bench(url: str, workload: ServingWorkload, *, model: Optional[str] = None,
                      api_key: Optional[str] = None, max_concurrency: Optional[int] = None,
                      slo_ttft: float = 1.0, slo_tpot: float = 0.2) -> dict[str, Any]:
    """Run the workload against the server at `url`; returns the summary dict."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if model is None:
        model = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    results, duration = asyncio.run(_run_load(url, model, workload, api_key, max_concurrency))
    return summarize(results, duration, workload, slo_ttft, slo_tpot)


def add_serving_bench_parser(bench_subparsers: Any) -> argparse.ArgumentParser:
    """Add `serve` under `kvwise bench`; it dispatches via args.func."""
    p = bench_subparsers.add_parser("serve", help="online serving: Poisson load, SLO attainment")
    p.add_argument("--url", default=None,
                   help="server to load (default: start `kvwise serve` on a free local port)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model", default=None, help="model name to send (default: first)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=32, help="output tokens per request")
    p.add_argument("--request-rate", type=float, default=2.0,
                   help="Poisson arrival rate in requests/s (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--bench-seed", type=int, default=0, help="seed of prompts and arrivals")
    p.add_argument("--slo-ttft", type=float, default=1.0, help="TTFT objective, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.2, help="TPOT objective, seconds")
    p.add_argument("--output-json", default=None, help="also write the summary here")
    add_engine_args(p)
    p.set_defaults(func=run_serve_bench)
    return p


def _server_flags(args: argparse.Namespace) -> list[str]:
    flags: list[str] = []
    for name, typ, _ in ENGINE_FLAGS:
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def run_serve_bench(args: argparse.Namespace) -> int:
    workload = ServingWorkload(args.num_prompts, args.input_len, args.output_len,
                               args.request_rate, args.bench_seed)
    proc = None
    url = args.url
    try:
        if url is None:
            proc, url = _start_server(_server_flags(args), args.api_key)
        summary = run_serving_bench(url, workload, model=args.served_model,
                                    api_key=args.api_key, max_concurrency=args.max_concurrency,
                                    slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    _print(summary)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["num_failed"] == 0 else 1


def _start_server(flags: list[str], api_key: Optional[str]) -> tuple[Any, str]:
    import socket
    import subprocess

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kvwise.serving.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", *flags]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvwise serve exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("kvwise serve did not become healthy within 300 s")


def _print(s: dict[str, Any]) -> None:
    w = s["workload"]
    print(f"serve  requests={s['num_requests']} failed={s['num_failed']} "
          f"rate={w['request_rate']}/s in={w['input_len']} out={w['output_len']} "
          f"duration={s['duration_s']:.2f}s")
    print(f"throughput  {s['request_throughput']:.2f} req/s  "
          f"{s['output_throughput']:.1f} output tok/s")
    for name in ("ttft", "tpot", "itl", "e2e"):
        print(f"{name:<5} mean={s[f'mean_{name}_s'] * 1e3:.1f}ms "
              f"p50={s[f'p50_{name}_s'] * 1e3:.1f}ms p99={s[f'p99_{name}_s'] * 1e3:.1f}ms")
    slo = s["slo"]
    print(f"slo   ttft<={slo['ttft_s']}s tpot<={slo['tpot_s']}s  "
          f"attainment={slo['attainment'] * 100:.1f}%")
    for err in s["errors"]:
        print(f"error {err}")
