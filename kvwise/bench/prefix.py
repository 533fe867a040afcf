"""`kvwise bench prefix`: what sharing a system prompt saves end to end (ChunkAttention-style).

`--num-requests` requests submitted together, each one shared `--prefix-len`-token system prompt
(real text, pydoc topics) + its own `--question-len`-token question, `--output-len` greedy output
tokens (ignore_eos). Three engine configurations:
- sharing_off: `--no-enable-prefix-caching`, paged attention;
- sharing_paged: prefix caching on, paged attention;
- sharing_two_phase: prefix caching on, `--attention-backend two_phase`.
Metrics per run: peak KV memory (peak blocks used x bytes per block, MiB) and output tok/s
(num_requests * output_len / wall time of the whole batch).

Invariants:
- Run i (warm-ups first) uses the i-th system prompt and questions, identical across
  configurations; every run starts from an empty prefix cache and a reset peak, so nothing is
  carried from one run to the next.
- Unless `--num-blocks` / `--kv-cache-memory` is given, the pool holds every request unshared
  at once, so sharing_off is not throttled by the pool and its peak is the true unshared need.
- One engine is loaded at a time and released before the next.
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
from kvwise.bench.workloads import TokenCorpus, build_corpus, load_encoder, resolve_model
from kvwise.config import EngineConfig, add_engine_args, engine_kwargs_from_args
from kvwise.errors import KvwiseError

BENCH = "prefix"
CONFIGS: dict[str, dict[str, Any]] = {
    "sharing_off": {"enable_prefix_caching": False, "attention_backend": "paged"},
    "sharing_paged": {"enable_prefix_caching": True, "attention_backend": "paged"},
    "sharing_two_phase": {"enable_prefix_caching": True, "attention_backend": "two_phase"},
}
BASE = "sharing_off"


@dataclass(frozen=True)
class PrefixWorkload:
    num_requests: int = 64
    prefix_len: int = 1024
    question_len: int = 64
    output_len: int = 64

    def __post_init__(self) -> None:
        for name in ("num_requests", "prefix_len", "question_len", "output_len"):
            if getattr(self, name) < 1:
                raise KvwiseError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @property
    def context_len(self) -> int:
        return self.prefix_len + self.question_len + self.output_len

    def tokens_per_run(self) -> int:
        return self.prefix_len + self.num_requests * self.question_len

    def prompts(self, corpus: TokenCorpus, run: int) -> list[list[int]]:
        """Run `run`'s prompts: its own system prompt + one distinct question per request."""
        start = run * self.tokens_per_run()
        (system,) = corpus.prompts(1, self.prefix_len, start)
        questions = corpus.prompts(self.num_requests, self.question_len, start + self.prefix_len)
        return [system + q for q in questions]

    def describe(self) -> str:
        return (f"{self.num_requests} requests submitted together: one shared "
                f"{self.prefix_len}-token system prompt (pydoc topics) + a distinct "
                f"{self.question_len}-token question each, {self.output_len} greedy output "
                f"tokens (ignore_eos); peak KV = peak blocks used x bytes per block; output "
                f"tok/s = {self.num_requests * self.output_len} / wall time")


def add_prefix_bench_parser(kinds: Any) -> None:
    p = kinds.add_parser("prefix", help="shared system prompt: peak KV memory and throughput "
                                        "with prefix sharing off / on (paged) / on (two_phase)")
    p.add_argument("--num-requests", type=int, default=64, help="requests submitted together")
    p.add_argument("--prefix-len", type=int, default=1024, help="shared system prompt tokens")
    p.add_argument("--question-len", type=int, default=64, help="own prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma list of configurations: {', '.join(CONFIGS)}")
    p.add_argument("--runs", type=int, default=3, help="measured runs per configuration")
    p.add_argument("--warmup", type=int, default=0,
                   help="unmeasured full runs before them (a short warm-up batch always runs)")
    p.add_argument("--output-md", default="BENCHMARKS.md",
                   help="markdown file whose section for this bench is replaced; none: skip")
    p.add_argument("--chart", default=None,
                   help="bar chart path (default docs/bench_prefix.png); none: skip")
    add_engine_args(p)
    p.set_defaults(func=run_prefix_bench)



def _engine_kwargs(args: argparse.Namespace, workload: PrefixWorkload, threads: int
                   ) -> dict[str, Any]:
    kwargs = engine_kwargs_from_args(args)
    kwargs["threads"] = threads
    for key in ("enable_prefix_caching", "attention_backend"):
        if kwargs.pop(key, None) is not None:
            report.log(f"--{key.replace('_', '-')} is set by each configuration; ignored")
    if "num_blocks" not in kwargs and "kv_cache_memory" not in kwargs:
        s = kwargs.get("block_size", EngineConfig().block_size)
        kwargs["num_blocks"] = workload.num_requests * -(-workload.context_len // s) + 16
    kwargs.setdefault("max_model_len", workload.context_len)
    EngineConfig.from_kwargs(**kwargs)  # validate before any model loads
    return kwargs


def measure_config(name: str, engine_kwargs: dict[str, Any], workload: PrefixWorkload,
                   corpus: TokenCorpus, runs: int, warmup: int) -> list[report.Result]:
    from kvwise import LLM, SamplingParams

    llm = LLM(**engine_kwargs, **CONFIGS[name])
    try:
        kv = llm.engine.kv_manager
        params = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=True)
        warm = [p[:32] for p in workload.prompts(corpus, 0)[:4]]
        llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        peaks, rates = [], []
        for run in range(warmup + runs):
            prompts = workload.prompts(corpus, run)
            assert kv.reset_prefix_cache(), "blocks still used between runs"
            kv.reset_peak()
            before = llm.stats()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            assert all(len(o.outputs[0].token_ids) == workload.output_len for o in outs)
            stats = llm.stats()
            peak_mib = stats["peak_blocks_used"] * stats["kv_bytes_per_block"] / 2**20
            delta = {k: stats[k] - before[k] for k in
                     ("prefix_query_tokens", "prefix_hit_tokens", "num_preemptions", "num_steps")}
            report.log(f"{name} run {run}: {seconds:.1f} s, {delta['num_steps']} steps, peak "
                 f"{stats['peak_blocks_used']} blocks, prompt tokens computed "
                 f"{delta['prefix_query_tokens'] - delta['prefix_hit_tokens']}, "
                 f"{delta['num_preemptions']} preemptions")
            if run >= warmup:
                peaks.append(peak_mib)
                rates.append(workload.num_requests * workload.output_len / seconds)
    finally:
        del llm
        gc.collect()
    return [report.Result(BENCH, name, "peak_kv_mib", tuple(peaks)),
            report.Result(BENCH, name, "output_tok_s", tuple(rates))]


def ratio_lines(results: list[report.Result]) -> list[str]:
    """`ratio <config>/sharing_off peak_kv_mib=x output_tok_s=y` (medians)."""
    by = {(r.engine, r.metric): r.median for r in results}
    lines = []
    for name in dict.fromkeys(r.engine for r in results):
        if name == BASE:
            continue
        pairs = [f"{m}={by[(name, m)] / by[(BASE, m)]:.2f}"
                 for m in ("peak_kv_mib", "output_tok_s")
                 if (name, m) in by and by.get((BASE, m))]
        if pairs:
            lines.append(f"ratio {name}/{BASE} " + " ".join(pairs))
    return lines


def run_prefix_bench(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names or args.runs < 1 or args.warmup < 0:
        print(f"error: --configs from {', '.join(CONFIGS)}; --runs >= 1; --warmup >= 0",
              file=sys.stderr)
        return 2
    threads = args.threads or len(os.sched_getaffinity(0))
    try:
        workload = PrefixWorkload(args.num_requests, args.prefix_len, args.question_len,
                                  args.output_len)
        engine_kwargs = _engine_kwargs(args, workload, threads)
        files = resolve_model(engine_kwargs.get("model", EngineConfig().model))
    except KvwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.log(f"prefix: {workload.describe()}; threads={threads}; configs={','.join(names)}")
    corpus = build_corpus(load_encoder(files), (args.warmup + args.runs) *
                          workload.tokens_per_run())
    results: list[report.Result] = []
    for name in names:
        report.log(f"measuring {name}: {args.warmup} warm-up + {args.runs} runs")
        res = measure_config(name, engine_kwargs, workload, corpus, args.runs, args.warmup)
        for r in res:
            print(r.line(), flush=True)
        results += res
    lines = ratio_lines(results)
    for line in lines:
        print(line, flush=True)
    notes = lines + (["the prompt corpus wrapped around: some prompts repeat across runs."]
                     if corpus.wrapped else [])
    _publish(args, results, workload, threads, notes)
    return 0


def _publish(args: argparse.Namespace, results: list[report.Result], workload: PrefixWorkload,
             threads: int, notes: list[str]) -> None:
    report.publish(BENCH, args, results,
                   title=f"kvwise bench prefix: {workload.num_requests} requests, "
                         f"{workload.prefix_len}-token shared prefix",
                   workload=workload.describe(), threads=threads, notes=notes,
                   ylabel="median (MiB | tok/s)")
