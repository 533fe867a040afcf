"""How `kvwise bench serve` results are told: max sustainable rate, ratio lines, markdown, chart.

Line grammar (stdout, next to the per-rate `serve engine=..` lines of `RateSummary.line`):
    maxrate engine=<name> max_rate=<req/s> bound=<exact|lower|upper>
    ratio kvwise/<peer> max_rate=<x> bound=<exact|lower|upper|unknown>

Max sustainable rate: the swept rates are taken in ascending order; the rate is the point where
attainment first falls below `Slo.min_attainment`, linearly interpolated between the last swept
rate that met it and the first that did not. Bounds: `lower` when every swept rate met it (the
true rate is at least the highest one swept), `upper` when even the lowest did not (it is below
the lowest one); a ratio is a bound when either side is.

Invariants:
- The markdown section goes between `<!-- kvwise-bench:serve -->` markers via
  `report.update_markdown`, leaving the other benches' sections untouched.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from itertools import pairwise
from typing import Optional

from kvwise.bench import report
from kvwise.bench.serve_load import RateSummary, Slo

BASELINE = report.BASELINE


@dataclass(frozen=True)
class MaxRate:
    engine: str
    rate: float  # requests/s
    bound: str  # "exact" (interpolated) | "lower" (true rate >= this) | "upper" (true rate < this)

    def line(self) -> str:
        return f"maxrate engine={self.engine} max_rate={self.rate:.3f} bound={self.bound}"


def max_sustainable_rate(engine: str, summaries: list[RateSummary],
                         min_attainment: float) -> MaxRate:
    points = sorted((s.rate, s.attainment) for s in summaries if s.engine == engine)
    if not points:
        raise ValueError(f"no results for {engine}")
    if points[0][1] < min_attainment:
        return MaxRate(engine, points[0][0], "upper")
    for (r0, a0), (r1, a1) in pairwise(points):
        if a1 < min_attainment:  # a0 >= min_attainment > a1
            return MaxRate(engine, r0 + (a0 - min_attainment) / (a0 - a1) * (r1 - r0), "exact")
    return MaxRate(engine, points[-1][0], "lower")


def ratio(base: MaxRate, peer: MaxRate) -> tuple[float, str]:
    """(base / peer max rate, bound of that ratio)."""
    at_least = base.bound == "lower" or peer.bound == "upper"
    at_most = base.bound == "upper" or peer.bound == "lower"
    bound = "unknown" if at_least and at_most else (
        "lower" if at_least else "upper" if at_most else "exact")
    return base.rate / peer.rate, bound


def ratio_lines(max_rates: list[MaxRate]) -> list[str]:
    base = next((m for m in max_rates if m.engine == BASELINE), None)
    if base is None:
        return []
    lines = []
    for peer in max_rates:
        if peer.engine != BASELINE:
            value, bound = ratio(base, peer)
            lines.append(f"ratio {BASELINE}/{peer.engine} max_rate={value:.2f} bound={bound}")
    return lines


def _fmt_pair(a: float, b: float, scale: float = 1.0, digits: int = 2) -> str:
    if math.isnan(a):
        return "-"
    return f"{a * scale:.{digits}f} / {b * scale:.{digits}f}"


def _bound_text(m: MaxRate) -> str:
    return {"exact": f"{m.rate:.2f}", "lower": f">= {m.rate:.2f}",
            "upper": f"< {m.rate:.2f}"}[m.bound]


def markdown_section(summaries: list[RateSummary], max_rates: list[MaxRate], *, command: str,
                     workload: str, threads: int, slo: Slo, chart_ref: Optional[str],
                     notes: list[str]) -> str:
    today = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = ["<!-- kvwise-bench:serve -->", "## `kvwise bench serve`", "",
             f"- date: {today}", f"- machine: {report.machine_summary(threads)}",
             f"- command: `{command}`", f"- workload: {workload}",
             f"- SLO: TTFT <= {slo.ttft_s:g} s and TPOT <= {slo.tpot_s * 1e3:g} ms; a rate is "
             f"sustained when >= {slo.min_attainment:.0%} of requests meet both", "",
             "| engine | rate (req/s) | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) "
             "| e2e p50 / p99 (s) | SLO attainment | output tok/s | mean output tokens "
             "| failed |", "|" + " --- |" * 9]
    for s in summaries:
        lat = s.latency_s
        engine = f"**{s.engine}**" if s.engine == BASELINE else s.engine
        lines.append(
            f"| {engine} | {s.rate:g} | {_fmt_pair(lat['ttft_p50'], lat['ttft_p99'])} "
            f"| {_fmt_pair(lat['tpot_p50'], lat['tpot_p99'], 1e3, 1)} "
            f"| {_fmt_pair(lat['e2e_p50'], lat['e2e_p99'])} | {s.attainment:.0%} "
            f"| {s.output_tok_s:.1f} | {s.mean_output_tokens:.1f} "
            f"| {s.num_failed}/{s.num_requests} |")
    lines += ["", "| engine | max sustainable rate (req/s) |", "| --- | --- |"]
    lines += [f"| {m.engine} | {_bound_text(m)} |" for m in max_rates]
    ratios = ratio_lines(max_rates)
    if ratios:
        lines += ["", "| ratio | max sustainable rate | bound |", "| --- | --- | --- |"]
        for text in ratios:
            fields = report.parse_line(text)
            lines.append(f"| {fields['pair']} | {fields['max_rate']} | {fields['bound']} |")
    lines += [""] + [f"- {n}" for n in notes]
    if chart_ref:
        lines += ["", f"![SLO attainment vs request rate]({chart_ref})"]
    lines += ["<!-- /kvwise-bench:serve -->"]
    return "\n".join(lines) + "\n"


def write_chart(path: str, summaries: list[RateSummary], max_rates: list[MaxRate], slo: Slo,
                title: str) -> None:
    """SLO attainment (%) vs offered request rate, one line per engine."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rates = sorted({s.rate for s in summaries})
    for engine in dict.fromkeys(s.engine for s in summaries):
        points = sorted((s.rate, s.attainment * 100) for s in summaries if s.engine == engine)
        m = next((x for x in max_rates if x.engine == engine), None)
        label = engine if m is None else f"{engine} (max {_bound_text(m)} req/s)"
        (handle,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                            label=label)
        if m is not None and m.bound == "exact":
            ax.axvline(m.rate, color=handle.get_color(), linestyle=":", linewidth=1)
    ax.axhline(slo.min_attainment * 100, color="gray", linestyle="--", linewidth=1)
    if len(rates) > 1 and rates[-1] / rates[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set_ylim(-3, 103)
    ax.set_xlabel("request rate (req/s, Poisson arrivals)")
    ax.set_ylabel(f"SLO attainment (%): TTFT <= {slo.ttft_s:g} s, TPOT <= "
                  f"{slo.tpot_s * 1e3:g} ms", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
