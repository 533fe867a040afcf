"""`kvwise bench serve` bookkeeping: workload dealing, summaries, max sustainable rate, ratios."""

from __future__ import annotations

import math

import pytest

from kvwise.bench.serve_load import RateSummary, RequestResult, Slo, summarize
from kvwise.bench.serve_report import MaxRate, max_sustainable_rate, ratio, ratio_lines
from kvwise.bench.serve_workload import PromptSet, ServeWorkload
from kvwise.errors import ConfigError

PROMPTS = PromptSet(tuple(f"p{i}" for i in range(10)), "test")


def _summary(engine: str, rate: float, attainment: float) -> RateSummary:
    return RateSummary(engine, rate, 10, 0, 1.0, {}, attainment, 1.0, 4.0)


def test_workload_deals_distinct_prompts_per_rate_and_scales_arrivals() -> None:
    w = ServeWorkload(PROMPTS, (1.0, 2.0), num_prompts=5, max_tokens=4, seed=3)
    first, second = w.prompts_for(0), w.prompts_for(1)
    assert sorted(first + second) == sorted(PROMPTS.texts) and not w.wrapped
    assert first == ServeWorkload(PROMPTS, (1.0, 2.0), 5, 4, 3).prompts_for(0)  # seeded
    slow, fast = w.arrival_offsets(1.0), w.arrival_offsets(2.0)
    assert slow[0] == 0.0 and all(b > a for a, b in zip(slow, slow[1:]))
    assert fast == pytest.approx([t / 2 for t in slow])
    assert ServeWorkload(PROMPTS, (1.0, 2.0, 4.0), 4, 4).wrapped


@pytest.mark.parametrize("field,kwargs", [
    ("request_rates", {"rates": (2.0, 1.0)}), ("request_rates", {"rates": (0.0,)}),
    ("request_rates", {"rates": (math.inf,)}), ("num_prompts", {"num_prompts": 0}),
    ("max_tokens", {"max_tokens": 1})])
def test_workload_validation_names_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ConfigError) as e:
        ServeWorkload(**{"prompts": PROMPTS, "rates": (1.0,), **kwargs})
    assert e.value.param == field


def test_summary_attainment_counts_failures_and_tpot() -> None:
    slo = Slo(ttft_s=1.0, tpot_s=0.1)
    results = [RequestResult(True, None, 0.5, 0.5 + 0.05 * 9, 10),   # meets both
               RequestResult(True, None, 1.5, 1.5 + 0.05 * 9, 10),   # TTFT too long
               RequestResult(True, None, 0.5, 0.5 + 0.2 * 9, 10),    # TPOT too long
               RequestResult(error="HTTP 503")]                      # failed
    s = summarize("kvwise", 2.0, results, duration=3.0, slo=slo)
    assert (s.attainment, s.num_failed, s.mean_output_tokens) == (0.25, 1, 10.0)
    assert s.output_tok_s == pytest.approx(10.0)
    assert s.latency_s["tpot_p50"] == pytest.approx(0.05)
    assert s.latency_s["ttft_p99"] == pytest.approx(1.5)
    assert "attainment=0.250" in s.line() and "tpot_p50_ms=50.000" in s.line()


def test_max_sustainable_rate_interpolates_at_the_first_drop() -> None:
    summaries = [_summary("kvwise", r, a) for r, a in ((1, 1.0), (2, 0.95), (4, 0.75), (8, 0.95))]
    m = max_sustainable_rate("kvwise", summaries, 0.9)
    assert m.bound == "exact" and m.rate == pytest.approx(2.5)  # 2 + (0.95-0.9)/(0.95-0.75) * 2
    low = [_summary("x", 1, 0.5), _summary("x", 2, 0.1)]
    assert max_sustainable_rate("x", low, 0.9) == MaxRate("x", 1, "upper")
    high = [_summary("y", 1, 1.0), _summary("y", 2, 0.9)]
    assert max_sustainable_rate("y", high, 0.9) == MaxRate("y", 2, "lower")


def test_ratio_bounds() -> None:
    exact, lower, upper = (MaxRate("kvwise", 3.0, b) for b in ("exact", "lower", "upper"))
    peer = MaxRate("llamacpp", 1.0, "exact")
    assert ratio(exact, peer) == (3.0, "exact")
    assert ratio(lower, peer) == (3.0, "lower")
    assert ratio(upper, peer) == (3.0, "upper")
    assert ratio(lower, MaxRate("llamacpp", 1.0, "lower"))[1] == "unknown"
    assert ratio(exact, MaxRate("llamacpp", 0.5, "upper")) == (6.0, "lower")
    assert ratio_lines([exact, peer]) == ["ratio kvwise/llamacpp max_rate=3.00 bound=exact"]
