"""`kvwise bench kv-memory`: how many long requests a fixed KV budget holds at once, per format.

Per `--kv-cache-dtypes` entry, one engine with the same `--kv-cache-memory` gets
`--num-requests` requests of `--prompt-len` distinct real-text tokens (pydoc topics) submitted
together, each generating `--output-len` greedy tokens (ignore_eos). Reported per format:
- bytes_per_token: a sealed block's bytes / block size (codes, scales, outliers and positions,
  all layers, K and V), the format's steady-state cost;
- side_bytes_per_request: what the format keeps beside its blocks per open request (KVQuant:
  the fp16 open tail block and the sink rows), reserved from the same budget;
- max_concurrent: the most requests decoding in one step, i.e. holding their whole prompt's KV
  at once (measured through the engine's scheduler, which preempts when the pool runs out, so
  a request that does not fit beside the others never decodes beside them);
- output_tok_s: num_requests * output_len / wall time of the whole batch (one run per format:
  a memory bound, not a latency figure; `kvwise bench throughput` measures speed with medians).

Invariants:
- Every format sees the same prompts and the same budget; one engine is loaded at a time.
- max_concurrent comes from the engine's own scheduler, not from arithmetic on the budget.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from kvwise.bench import report
from kvwise.bench.workloads import build_corpus, load_encoder, resolve_model
from kvwise.config import EngineConfig, add_engine_args, engine_kwargs_from_args
from kvwise.errors import KvwiseError

BENCH = "kv-memory"
METRICS = ("bytes_per_token", "side_bytes_per_request", "max_concurrent", "output_tok_s")


@dataclass(frozen=True)
class MemoryWorkload:
    num_requests: int = 48
    prompt_len: int = 2048
    output_len: int = 64

    def __post_init__(self) -> None:
        for name in ("num_requests", "prompt_len", "output_len"):
            if getattr(self, name) < 1:
                raise KvwiseError(f"{name}: must be >= 1, got {getattr(self, name)}")

    def describe(self, kv_cache_memory: str) -> str:
        return (f"{self.num_requests} requests of {self.prompt_len} distinct prompt tokens "
                f"(pydoc topics) submitted together, {self.output_len} greedy output tokens "
                f"each (ignore_eos), kv_cache_memory={kv_cache_memory}; max_concurrent = most "
                f"requests decoding in one engine step")


def add_kv_memory_bench_parser(kinds: Any) -> None:
    p = kinds.add_parser(BENCH, help="requests of a fixed length that one KV budget holds at "
                                     "once, per KV cache format")
    p.add_argument("--kv-cache-dtypes", default="float16,int8,nuq4-1%,nuq3-1%,nuq2-1%",
                   metavar="LIST", help="comma list of KV cache formats")
    p.add_argument("--num-requests", type=int, default=48, help="requests submitted together")
    p.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64,
                   help="output tokens per request (enough that the first requests still decode "
                        "when the last prefill ends)")
    p.add_argument("--output-md", default="BENCHMARKS.md",
                   help="markdown file whose section for this bench is replaced; none: skip")
    p.add_argument("--chart", default="none",
                   help="bar chart path (default: none; a table says it)")
    add_engine_args(p)
    p.set_defaults(func=run_kv_memory_bench, runs=1)



def _engine_kwargs(args: argparse.Namespace, workload: MemoryWorkload, threads: int
                   ) -> dict[str, Any]:
    kwargs = engine_kwargs_from_args(args)
    kwargs["threads"] = threads
    if kwargs.pop("kv_cache_dtype", None) is not None:
        report.log("--kv-cache-dtype is set by --kv-cache-dtypes; ignored")
    if "kv_cache_memory" not in kwargs or "num_blocks" in kwargs:
        raise KvwiseError("kv_cache_memory: this bench needs a fixed --kv-cache-memory (and no "
                          "--num-blocks), the budget every format shares")
    kwargs.setdefault("max_model_len", workload.prompt_len + workload.output_len)
    kwargs.setdefault("max_num_seqs", workload.num_requests)
    kwargs.setdefault("enable_prefix_caching", False)
    return kwargs


def measure_format(name: str, engine_kwargs: dict[str, Any], prompts: list[list[int]],
                   workload: MemoryWorkload) -> list[report.Result]:
    from kvwise import LLM, SamplingParams

    llm = LLM(**engine_kwargs, kv_cache_dtype=name)
    try:
        engine = llm.engine
        cfg = engine.config
        store = engine.kv_store
        shape = engine.model_config
        side = type(store).reserved_bytes(shape, cfg.block_size, 1, cfg.kv_quant_sink)
        params = SamplingParams(temperature=0.0, max_tokens=workload.output_len,
                                ignore_eos=True)
        llm.generate([prompts[0][:32]], SamplingParams(max_tokens=2, ignore_eos=True),
                     use_tqdm=False)  # warm the kernels outside the timed batch
        for i, p in enumerate(prompts):
            engine.add_request(f"mem-{i}", p, params)
        peak, done, preempt0 = 0, 0, engine.stats()["num_preemptions"]
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            outs = engine.step()
            decoding = sum(1 for r in engine.scheduler.running if r.num_output_tokens > 0)
            peak = max(peak, decoding)
            done += sum(1 for o in outs if o.finished)
        seconds = time.perf_counter() - t0
        stats = engine.stats()
        report.log(f"{name}: {engine.num_blocks} blocks of {engine.kv_bytes_per_block} bytes, "
             f"{done} finished in {seconds:.1f} s, peak {peak} decoding at once, "
             f"{stats['num_preemptions'] - preempt0} preemptions")
        values = {"bytes_per_token": engine.kv_bytes_per_block / cfg.block_size,
                  "side_bytes_per_request": float(side), "max_concurrent": float(peak),
                  "output_tok_s": workload.num_requests * workload.output_len / seconds}
    finally:
        del llm
        gc.collect()
    return [report.Result(BENCH, name, m, (values[m],)) for m in METRICS]


def ratio_lines(results: list[report.Result], base: str) -> list[str]:
    """`ratio <format>/<base> bytes_per_token=x max_concurrent=y output_tok_s=z`."""
    by = {(r.engine, r.metric): r.median for r in results}
    lines = []
    for name in dict.fromkeys(r.engine for r in results):
        if name == base:
            continue
        pairs = [f"{m}={by[(name, m)] / by[(base, m)]:.2f}"
                 for m in ("bytes_per_token", "max_concurrent", "output_tok_s")
                 if by.get((base, m))]
        lines.append(f"ratio {name}/{base} " + " ".join(pairs))
    return lines


def run_kv_memory_bench(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.kv_cache_dtypes.split(",") if n.strip()]
    threads = args.threads or len(os.sched_getaffinity(0))
    try:
        if not names:
            raise KvwiseError("kv_cache_dtypes: give at least one format")
        workload = MemoryWorkload(args.num_requests, args.prompt_len, args.output_len)
        engine_kwargs = _engine_kwargs(args, workload, threads)
        for name in names:  # validate every format before any model loads
            EngineConfig.from_kwargs(**engine_kwargs, kv_cache_dtype=name)
        files = resolve_model(engine_kwargs.get("model", EngineConfig().model))
    except KvwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    describe = workload.describe(str(engine_kwargs["kv_cache_memory"]))
    report.log(f"kv-memory: {describe}; threads={threads}; formats={','.join(names)}")
    corpus = build_corpus(load_encoder(files), workload.num_requests * workload.prompt_len)
    prompts = corpus.prompts(workload.num_requests, workload.prompt_len, 0)
    results: list[report.Result] = []
    for name in names:
        res = measure_format(name, engine_kwargs, prompts, workload)
        for r in res:
            print(r.line(), flush=True)
        results += res
    lines = ratio_lines(results, names[0])
    for line in lines:
        print(line, flush=True)
    notes = lines + (["the prompt corpus wrapped around: some prompts repeat."]
                     if corpus.wrapped else [])
    report.publish(BENCH, args, results, title=f"kvwise bench kv-memory: {describe}",
                   workload=describe, threads=threads, notes=notes, ylabel="value")
    return 0
