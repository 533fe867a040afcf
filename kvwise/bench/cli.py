"""The `kvwise bench` command: parse flags, run kvwise and its peers on one workload, report.

`add_bench_parser(subparsers)` adds `bench` with one sub-subcommand per entry of `BENCH_KINDS`;
each sets `func=` (args -> exit code). Standalone: `python -m kvwise.bench.cli latency ...`.

Invariants:
- Engine flags are kvwise's own (`kvwise.config.add_engine_args`); only flags the user set reach
  `LLM(**kwargs)`, except `threads`, which is always fixed so that every engine gets the same count.
- Result lines go to stdout, progress to stderr; peers that cannot run print a `skip` line.
- By default every engine is loaded first and run i of each is taken in turn (round-robin,
  `report.measure_interleaved`), so machine drift hits all engines alike; `--one-at-a-time`
  loads one engine at a time, measures all its runs and releases it before the next.
- Warm-up runs are unmeasured; run i of every engine uses the same prompts.
- Building the parser imports neither torch nor numba: `attention` (whose flags live beside its
  torch code in kvwise.bench.attention) is declared as a stub that takes any arguments, and its
  real parser is built only when it runs (`config.parse_cli_args` hands it what the stub left
  unparsed).
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any, Optional, Union

from kvwise.bench import report
from kvwise.bench.kv_memory import add_kv_memory_bench_parser
from kvwise.bench.latency import latency_call
from kvwise.bench.peers import PEER_NAMES, RUNNERS, PeerUnavailable, Runner
from kvwise.bench.prefix import add_prefix_bench_parser
from kvwise.bench.serving import add_serving_bench_parser
from kvwise.bench.throughput import throughput_call
from kvwise.bench.workloads import (
    LatencyWorkload,
    ModelFiles,
    ThroughputWorkload,
    build_corpus,
    load_encoder,
    resolve_model,
)
from kvwise.config import EngineConfig, add_engine_args, engine_kwargs_from_args, parse_cli_args
from kvwise.errors import ConfigError, KvwiseError

Workload = Union[LatencyWorkload, ThroughputWorkload]



def _peers(value: str) -> list[str]:
    if value.strip().lower() in ("", "none"):
        return []
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEER_NAMES)} or none")
    return names


# short engine-name suffixes of KV cache dtypes ("kvwise-int4-kvf16")
_KV_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def add_weight_dtypes_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weight-dtypes", default=None, metavar="LIST",
                        help="measure kvwise once per weight dtype, e.g. fp32,int8,int4 "
                             "(engines kvwise-<dtype>); default: one run with --weight-dtype")
    parser.add_argument("--kv-cache-dtypes", default=None, metavar="LIST",
                        help="also cross the kvwise runs with these KV cache dtypes, e.g. "
                             "auto,float16 (engines kvwise-<dtype>-kv<f16>; auto adds no "
                             "suffix); default: --kv-cache-dtype only")
    parser.add_argument("--activation-quants", default=None, metavar="LIST",
                        help="also cross the int4 runs with these activation quantizations, "
                             "e.g. none,int8 (engines kvwise-int4-a8; none adds no suffix); "
                             "default: --activation-quant only")
    parser.add_argument("--batch-invariant-modes", default=None, metavar="LIST",
                        help="also cross the kvwise runs with batch-invariant mode off,on "
                             "(engines kvwise-...-inv when on); default: --batch-invariant only")


def kvwise_configs(args: argparse.Namespace, engine_kwargs: dict[str, Any]
                   ) -> dict[str, dict[str, Any]]:
    """Engine name -> engine kwargs of every kvwise configuration the bench measures
    (--weight-dtypes x --kv-cache-dtypes); raises ConfigError naming the bad entry."""
    weights = [d for d in (getattr(args, "weight_dtypes", None) or "").split(",") if d]
    kvs = [d for d in (getattr(args, "kv_cache_dtypes", None) or "").split(",") if d]
    aqs = [d for d in (getattr(args, "activation_quants", None) or "").split(",") if d]
    bis = [d for d in (getattr(args, "batch_invariant_modes", None) or "").split(",") if d]
    for bi in bis:
        if bi not in ("off", "on"):
            raise ConfigError(f"batch_invariant_modes: entries are off or on, got {bi!r}",
                              "batch_invariant_modes")
    for aq in aqs:
        EngineConfig.from_kwargs(weight_dtype="int4", activation_quant=aq)
    configs: dict[str, dict[str, Any]] = {}
    for w, kv, aq, bi in itertools.product(weights or [None], kvs or [None], aqs or [None],
                                           bis or [None]):
        kwargs, name = dict(engine_kwargs), "kvwise"
        if w is not None:
            kwargs["weight_dtype"], name = w, f"{name}-{w}"
        if aq not in (None, "none") and kwargs.get("weight_dtype") != "int4":
            continue  # int8 activations are an int4 kernel mode
        if aq is not None:
            kwargs["activation_quant"] = aq
        if kv is not None:
            kwargs["kv_cache_dtype"] = kv
            if kv != "auto":
                name = f"{name}-kv{_KV_SHORT.get(kv, kv)}"
        if aq not in (None, "none"):
            name = f"{name}-a{aq.removeprefix('int')}"
        if bi is not None:
            kwargs["batch_invariant"] = bi == "on"
            if bi == "on":
                name = f"{name}-inv"
        EngineConfig.from_kwargs(**kwargs)  # validate all before any model loads
        configs[name] = kwargs
    return configs


def add_common_bench_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every bench kind: repetitions, peers, outputs and the engine flags."""
    parser.add_argument("--runs", type=int, default=5, help="measured runs per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs before them")
    parser.add_argument("--peers", type=_peers, default=list(PEER_NAMES),
                        help="comma list of peers to compare with: hf,llamacpp (default) or none")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="load and measure one engine at a time (less memory) instead of "
                             "loading all and interleaving their runs")
    parser.add_argument("--skip-kvwise", action="store_true",
                        help="measure only the peers (no ratio lines)")
    parser.add_argument("--output-md", default="BENCHMARKS.md",
                        help="markdown file whose section for this bench is replaced; none: skip")
    parser.add_argument("--chart", default=None,
                        help="bar chart path (default docs/bench_<kind>.png); none: skip")
    add_engine_args(parser)


def _add_latency(kinds: Any) -> None:
    p = kinds.add_parser("latency", help="batch-1 decode tok/s and long-prompt prefill tok/s")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens generated (N)")
    p.add_argument("--decode-prompt-len", type=int, default=32, help="decode prompt tokens")
    p.add_argument("--prefill-len", type=int, default=1024, help="prefill prompt tokens")
    add_weight_dtypes_arg(p)
    add_common_bench_args(p)
    p.set_defaults(func=run_latency)


def _add_throughput(kinds: Any) -> None:
    p = kinds.add_parser("throughput", help="aggregate tok/s of many concurrent requests")
    p.add_argument("--num-requests", type=int, default=64, help="requests submitted together")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    add_weight_dtypes_arg(p)
    add_common_bench_args(p)
    p.set_defaults(func=run_throughput)


def _add_attention(kinds: Any) -> None:
    """`bench attention` as a stub: its flags are parsed by its own parser when it runs."""
    p = kinds.add_parser("attention", add_help=False,
                         help="decode attention kernel: two_phase vs paged vs reference with and "
                              "without a shared prefix")
    p.set_defaults(func=_run_attention, unparsed_args=[])


def _run_attention(args: argparse.Namespace) -> int:
    from kvwise.bench.attention import add_attention_bench_parser  # imports torch

    parser = argparse.ArgumentParser(prog="kvwise bench")
    add_attention_bench_parser(parser.add_subparsers(dest="bench_kind", required=True))
    real = parser.parse_args(["attention", *args.unparsed_args])
    for name, value in vars(args).items():  # e.g. command_line
        if not hasattr(real, name):
            setattr(real, name, value)
    return int(real.func(real))


# Each adds one `kvwise bench <kind>` sub-subcommand that sets func=; extend here (e.g. serve).
BENCH_KINDS: list[Callable[[Any], None]] = [_add_latency, _add_throughput, add_serving_bench_parser,
                                             _add_attention, add_prefix_bench_parser,
                                             add_kv_memory_bench_parser]


def add_bench_parser(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmark kvwise against its peers")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    for add in BENCH_KINDS:
        add(kinds)


def run_latency(args: argparse.Namespace) -> int:
    workload = LatencyWorkload(args.decode_prompt_len, args.decode_tokens, args.prefill_len)
    return _run("latency", args, workload, latency_call)


def run_throughput(args: argparse.Namespace) -> int:
    workload = ThroughputWorkload(args.num_requests, args.prompt_len, args.output_len)
    return _run("throughput", args, workload, throughput_call)


def _engine_kwargs(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    kwargs = engine_kwargs_from_args(args)
    kwargs["threads"] = threads
    EngineConfig.from_kwargs(**kwargs)  # validate now, before any model loads
    return kwargs


def _notes(bench: str, engines: list[str], dtype: str, wrapped: bool,
           one_at_a_time: bool) -> list[str]:
    notes = []
    if len(engines) > 1:
        notes.append("engines measured one at a time (--one-at-a-time)." if one_at_a_time else
                     "all engines loaded, then run i of each taken in turn (round-robin), so "
                     "drift of this shared machine slows every engine's run i alike.")
    if "llamacpp" in engines:
        notes.append(f"llamacpp computes on the GGUF's quantized weights; kvwise (activations "
                     f"{dtype}) and hf (float32) on weights dequantized from the same GGUF, "
                     "kvwise-int8/int4 on int8/int4 weights built from its Q4_1/Q8_0 blocks "
                     "(fp32 activations at <= 16 tokens per step, bf16 GEMMs above).")
    if any("-kv" in e for e in engines if e.startswith("kvwise")):
        notes.append("kvwise-...-kvf16 / -kvbf16 store the KV cache in that dtype "
                     "(--kv-cache-dtype), widened to fp32 as attention reads it; hf and the other "
                     "kvwise lines keep it in float32, llamacpp in its default f16.")
    if any(e.endswith("-a8") for e in engines):
        notes.append("kvwise-...-a8 (--activation-quant int8): steps of <= 16 tokens round each "
                     "int4 layer's input to int8 per 32 values and use integer dot products, as "
                     "llamacpp does with its Q8 activations; larger steps are unchanged.")
    if bench == "latency" and "hf" in engines:
        notes.append("hf prefill = one forward pass (use_cache, logits_to_keep=1) + argmax; "
                     "hf decode is timed per token with a streamer inside generate().")
    if bench == "throughput" and "hf" in engines:
        notes.append("hf: one generate() call on the whole batch "
                     "(equal prompt lengths: no padding).")
    if bench == "throughput" and "llamacpp" in engines:
        notes.append("llamacpp: requests run one after another (its Python API has no batched "
                     "generate), so its figure is the sequential rate.")
    if wrapped:
        notes.append("the prompt corpus wrapped around: some prompts repeat across runs.")
    return notes


def _run(bench: str, args: argparse.Namespace, workload: Workload,
         make_call: Callable[..., report.Call]) -> int:
    if args.runs < 1 or args.warmup < 0:
        print("error: --runs must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    threads = args.threads or len(os.sched_getaffinity(0))
    try:
        engine_kwargs = _engine_kwargs(args, threads)
        files = resolve_model(engine_kwargs.get("model", EngineConfig().model))
    except KvwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        configs = kvwise_configs(args, engine_kwargs)
    except KvwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engines = ([] if args.skip_kvwise else list(configs)) + list(args.peers)
    order = "one at a time" if args.one_at_a_time else "interleaved"
    report.log(f"{bench}: {workload.describe()}; threads={threads}; engines={','.join(engines)}; "
         f"runs {order}")
    corpus = build_corpus(load_encoder(files), workload.tokens_needed(args.warmup + args.runs))
    loader = functools.partial(_load, configs=configs, engine_kwargs=engine_kwargs, files=files,
                               threads=threads, workload=workload)
    measured = functools.partial(_measure, bench=bench, workload=workload, corpus=corpus,
                                 args=args, make_call=make_call)
    results: list[report.Result] = []
    if args.one_at_a_time:
        for name in engines:
            runner = loader(name)
            if runner is not None:
                results += measured([runner])
    else:
        runners = [r for r in map(loader, engines) if r is not None]
        results = measured(runners)
    for line in report.ratio_lines(results):
        print(line, flush=True)
    dtype = engine_kwargs.get("dtype", EngineConfig().dtype)
    notes = _notes(bench, engines, dtype, corpus.wrapped, args.one_at_a_time)
    _publish(bench, args, results, workload, threads, notes)
    return 0


def _load(name: str, configs: dict[str, dict[str, Any]], engine_kwargs: dict[str, Any],
          files: ModelFiles, threads: int, workload: Workload) -> Optional[Runner]:
    """-> the engine's runner, or None after printing its skip line."""
    report.log(f"loading {name}")
    # kvwise configurations (kvwise_configs) arrive with their own engine kwargs
    factory = RUNNERS["kvwise" if name.startswith("kvwise") else name]
    try:
        runner = factory(configs.get(name, engine_kwargs), files, threads, workload.max_context)
    except PeerUnavailable as e:
        print(report.skip_line(name, str(e)), flush=True)
        return None
    runner.name = name
    return runner


def _measure(runners: list[Runner], bench: str, workload: Workload, corpus: Any,
             args: argparse.Namespace, make_call: Callable[..., report.Call]
             ) -> list[report.Result]:
    """Measure these runners together (round-robin), print their result lines, close them."""
    count = args.warmup + args.runs
    names = ",".join(r.name for r in runners)
    # only throughput results carry the runner's note ("sequential")
    notes = {r.name: r.throughput_note if bench == "throughput" else None for r in runners}
    try:
        calls = {r.name: make_call(r, workload, corpus, count) for r in runners}

        def on_round(i: int) -> None:
            kind = "warm-up" if i < args.warmup else f"run {i - args.warmup + 1}/{args.runs}"
            report.log(f"measuring {names}: {kind}")

        values = report.measure_interleaved(calls, args.runs, args.warmup, on_round)
    finally:
        for runner in runners:
            runner.close()
        runners.clear()
        gc.collect()
    results = [report.Result(bench, name, metric, tuple(vals),
                             notes[name])
               for name, metrics in values.items() for metric, vals in metrics.items()]
    for r in results:
        print(r.line(), flush=True)
    return results


def _publish(bench: str, args: argparse.Namespace, results: list[report.Result],
             workload: Workload, threads: int, notes: list[str]) -> None:
    if not results:
        return
    for path in report.publish(bench, args, results, title=f"kvwise bench {bench}: "
                               f"{workload.short()}", workload=workload.describe(),
                               threads=threads, notes=notes):
        report.log(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvwise.bench.cli",
                                     description="benchmark kvwise against its peers")
    kinds = parser.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    for add in BENCH_KINDS:
        add(kinds)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_cli_args(build_parser(), argv)
    if argv is not None:
        args.command_line = shlex.join(["kvwise", "bench", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
