"""Benchmark results and how they are told: result lines, ratio lines, BENCHMARKS.md, a bar chart.

Result line grammar (one per engine and metric, on stdout; parse with `parse_line`):
    <bench> engine=<name> metric=<metric> median=<x> min=<x> max=<x> runs=<n> [note=<word>]
    ratio kvwise/<peer> <short metric>=<x> ...
    skip engine=<name> reason="<why>"

Invariants:
- A `Result` holds every measured value; the median is what is compared and charted.
- BENCHMARKS.md holds one section per bench kind between `<!-- kvwise-bench:<kind> -->` markers;
  a re-run replaces its own section and leaves the others untouched.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

BASELINE = "kvwise"


@dataclass(frozen=True)
class Result:
    bench: str  # "latency" | "throughput"
    engine: str
    metric: str  # e.g. "decode_tok_s"
    values: tuple[float, ...]
    note: Optional[str] = None  # one word, e.g. "sequential"

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def short_metric(self) -> str:
        return self.metric.removesuffix("_tok_s")

    def line(self) -> str:
        text = (f"{self.bench} engine={self.engine} metric={self.metric} median={self.median:.1f} "
                f"min={min(self.values):.1f} max={max(self.values):.1f} runs={len(self.values)}")
        return text if self.note is None else f"{text} note={self.note}"


# One measurement of one engine: call(i) -> {metric: value}; i picks the workload's i-th prompts.
Call = Callable[[int], dict[str, float]]


def log(message: str) -> None:
    """A progress line of a bench, on stderr (stdout carries the one-line results)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def measure_interleaved(calls: dict[str, Call], runs: int, warmup: int,
                        on_round: Optional[Callable[[int], None]] = None
                        ) -> dict[str, dict[str, list[float]]]:
    """Round i calls every engine's `call(i)` in turn (warm-up rounds first, discarded).

    -> {engine: {metric: the `runs` measured values}}. Interleaving makes a drifting machine
    (other tenants, clock changes) slow every engine's run i alike instead of whichever engine
    happened to be measured during the slow minutes; ratios of medians are then comparable."""
    values: dict[str, dict[str, list[float]]] = {name: {} for name in calls}
    for i in range(warmup + runs):
        if on_round is not None:
            on_round(i)
        for name, call in calls.items():
            got = call(i)
            if i >= warmup:
                for metric, value in got.items():
                    values[name].setdefault(metric, []).append(value)
    return values


def skip_line(engine: str, reason: str) -> str:
    return f'skip engine={engine} reason="{reason}"'


def parse_line(line: str) -> dict[str, str]:
    """`latency engine=hf metric=m median=1.0 ...` -> {"kind": "latency", "engine": "hf", ...}."""
    head, *rest = shlex.split(line)
    fields = {"kind": head}
    for item in rest:
        key, sep, value = item.partition("=")
        if sep:
            fields[key] = value
        else:
            fields["pair"] = item  # ratio lines: "kvwise/hf"
    return fields


def is_kvwise(engine: str) -> bool:
    """"kvwise" or a labelled kvwise configuration such as "kvwise-int8"."""
    return engine == BASELINE or engine.startswith(BASELINE + "-")


def ratios(results: list[Result]) -> dict[str, dict[str, float]]:
    """"<kvwise config>/<peer>" -> short metric -> kvwise median / peer median (> 1: kvwise is
    faster), for every kvwise configuration against every peer."""
    out: dict[str, dict[str, float]] = {}
    configs = list(dict.fromkeys(r.engine for r in results if is_kvwise(r.engine)))
    for config in configs:
        base = {r.metric: r.median for r in results if r.engine == config}
        for r in results:
            if not is_kvwise(r.engine) and r.metric in base and r.median > 0:
                out.setdefault(f"{config}/{r.engine}", {})[r.short_metric] = (
                    base[r.metric] / r.median)
    return out


def ratio_lines(results: list[Result]) -> list[str]:
    return [f"ratio {pair} " + " ".join(f"{k}={v:.2f}" for k, v in by.items())
            for pair, by in ratios(results).items()]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def machine_summary(threads: int) -> str:
    versions = [f"{name} {v}" for name in ("torch", "transformers", "llama-cpp-python")
                if (v := _version(name)) is not None]
    return (f"nproc {os.cpu_count()}, CPU {cpu_model()}, threads {threads}, "
            f"Python {platform.python_version()}, " + ", ".join(versions))


def command_line() -> str:
    """How this process was started, in a form a reader can paste."""
    prog = os.path.basename(sys.argv[0])
    if prog == "kvwise":
        return shlex.join(["kvwise", *sys.argv[1:]])
    if sys.argv[0].endswith(os.path.join("kvwise", "__main__.py")):
        return shlex.join(["python", "-m", "kvwise", *sys.argv[1:]])
    if sys.argv[0].endswith(os.path.join("kvwise", "cli.py")):
        return shlex.join(["python", "-m", "kvwise.cli", *sys.argv[1:]])
    if sys.argv[0].endswith(os.path.join("bench", "cli.py")):
        return shlex.join(["python", "-m", "kvwise.bench.cli", *sys.argv[1:]])
    return shlex.join([prog, *sys.argv[1:]])


def _table(results: list[Result]) -> list[str]:
    metrics = list(dict.fromkeys(r.metric for r in results))
    engines = list(dict.fromkeys(r.engine for r in results))
    by = {(r.engine, r.metric): r for r in results}
    header = ["engine"] + [f"{m} median (min-max)" for m in metrics] + ["runs", "note"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for e in engines:
        cells = [f"**{e}**" if is_kvwise(e) else e]
        for m in metrics:
            r = by.get((e, m))
            cells.append("-" if r is None else
                         f"{r.median:.1f} ({min(r.values):.1f}-{max(r.values):.1f})")
        any_r = next(r for r in results if r.engine == e)
        cells += [str(len(any_r.values)), any_r.note or ""]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def markdown_section(bench: str, results: list[Result], *, command: str, workload: str,
                     threads: int, chart_ref: Optional[str], notes: list[str]) -> str:
    today = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"<!-- kvwise-bench:{bench} -->", f"## `kvwise bench {bench}`", "",
             f"- date: {today}", f"- machine: {machine_summary(threads)}",
             f"- command: `{command}`", f"- workload: {workload}", ""]
    lines += _table(results)
    rat = ratios(results)
    if rat:
        lines += ["", "| ratio (kvwise / peer, median) | "
                  + " | ".join(next(iter(rat.values())).keys()) + " |",
                  "|" + " --- |" * (1 + len(next(iter(rat.values()))))]
        lines += [f"| {pair} | " + " | ".join(f"{v:.2f}" for v in by.values()) + " |"
                  for pair, by in rat.items()]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    if chart_ref:
        lines += ["", f"![{bench} medians]({chart_ref})"]
    lines += [f"<!-- /kvwise-bench:{bench} -->"]
    return "\n".join(lines) + "\n"


def update_markdown(path: str, bench: str, section: str) -> None:
    """Replace this bench kind's section in `path`, or append it (creating the file)."""
    text = "# kvwise benchmarks\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    pattern = re.compile(rf"<!-- kvwise-bench:{bench} -->.*?<!-- /kvwise-bench:{bench} -->\n?",
                         re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def write_chart(path: str, bench: str, results: list[Result], title: str,
                ylabel: str = "tokens / second (median)", log_scale: bool = False) -> None:
    """Grouped bars: one group per metric, one bar per engine (median, whiskers min-max)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(dict.fromkeys(r.metric for r in results))
    engines = list(dict.fromkeys(r.engine for r in results))
    by = {(r.engine, r.metric): r for r in results}
    fig = Figure(figsize=(2.2 + 2.2 * len(metrics), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(engines))
    for j, engine in enumerate(engines):
        xs, meds, lo, hi = [], [], [], []
        for i, m in enumerate(metrics):
            r = by.get((engine, m))
            if r is None:
                continue
            xs.append(i + (j - (len(engines) - 1) / 2) * width)
            meds.append(r.median)
            lo.append(r.median - min(r.values))
            hi.append(max(r.values) - r.median)
        label = engine + (f" ({by[(engine, metrics[0])].note})"
                          if (engine, metrics[0]) in by and by[(engine, metrics[0])].note else "")
        bars = ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(range(len(metrics)), [m.replace("_tok_s", " tok/s") for m in metrics])
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def publish(bench: str, args: Any, results: list[Result], *, title: str, workload: str,
            threads: int, notes: list[str], **chart_kwargs: Any) -> list[str]:
    """Write the chart (`args.chart`, default docs/bench_<bench>.png; "none" skips) and replace
    this bench's section of `args.output_md` ("none" skips). -> the paths written. `title` is
    the chart's first line; threads, CPU and run count are appended."""
    written = []
    chart: Optional[str] = args.chart or os.path.join("docs", f"bench_{bench}.png")
    if chart.lower() == "none":
        chart = None
    if chart is not None:
        full_title = (f"{title}\n{threads} threads, {cpu_model()}, "
                      f"median of {args.runs} runs")
        write_chart(chart, bench, results, full_title, **chart_kwargs)
        written.append(chart)
    md = args.output_md
    if md and md.lower() != "none":
        chart_ref = None
        if chart is not None:
            chart_ref = os.path.relpath(os.path.abspath(chart),
                                        os.path.dirname(os.path.abspath(md)))
        command = getattr(args, "command_line", None) or command_line()
        section = markdown_section(bench, results, command=command, workload=workload,
                                   threads=threads, chart_ref=chart_ref, notes=notes)
        update_markdown(md, bench, section)
        written.append(md)
    return written
