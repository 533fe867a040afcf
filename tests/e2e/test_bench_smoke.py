"""`kvwise bench latency|throughput` run end to end at tiny sizes: result lines parse, files appear.

A benchmark is not a test: nothing here checks speed, only that the benchmarks run and report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvwise.bench import report
from kvwise.bench.cli import main

TINY_LATENCY = ["latency", "--decode-tokens", "8", "--decode-prompt-len", "16",
                "--prefill-len", "64", "--runs", "1", "--warmup", "1", "--threads", "2"]
TINY_THROUGHPUT = ["throughput", "--num-requests", "4", "--prompt-len", "16",
                   "--output-len", "16", "--runs", "1", "--warmup", "1", "--threads", "2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def engine() -> None:
    try:
        from kvwise import LLM  # noqa: F401
    except ImportError as e:
        pytest.skip(f"kvwise.LLM is not importable yet: {e}")


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[dict[str, str]]:
    assert main(argv) == 0
    out = capsys.readouterr().out
    return [report.parse_line(line) for line in out.splitlines() if line.strip()]


def _outputs(tmp_path: Path, kind: str) -> tuple[Path, Path, list[str]]:
    md, png = tmp_path / "BENCHMARKS.md", tmp_path / f"bench_{kind}.png"
    return md, png, ["--output-md", str(md), "--chart", str(png)]


def _check_results(lines: list[dict[str, str]], kind: str, engine: str,
                   metrics: set[str]) -> None:
    results = [x for x in lines if x["kind"] == kind]
    assert {x["metric"] for x in results if x["engine"] == engine} == metrics
    for x in results:
        assert float(x["min"]) <= float(x["median"]) <= float(x["max"])
        assert float(x["median"]) > 0
        assert x["runs"] == "1"


def _check_files(md: Path, png: Path, kind: str, engine: str) -> None:
    text = md.read_text()
    assert text.count(f"<!-- kvwise-bench:{kind} -->") == 1
    assert f"| {engine} |" in text or f"| **{engine}** |" in text
    assert png.name in text
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_latency_smoke(engine: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md, png, out_args = _outputs(tmp_path, "latency")
    lines = _run(capsys, [*TINY_LATENCY, "--peers", "none", "--one-at-a-time", *out_args])
    _check_results(lines, "latency", "kvwise", {"decode_tok_s", "prefill_tok_s"})
    _check_files(md, png, "latency", "kvwise")


def test_throughput_smoke(engine: None, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """Two configurations: --kv-cache-dtypes crosses the kvwise runs (fp32 and fp16 KV cache)."""
    md, png, out_args = _outputs(tmp_path, "throughput")
    lines = _run(capsys, [*TINY_THROUGHPUT, "--peers", "none", "--weight-dtypes", "int4",
                          "--kv-cache-dtypes", "auto,float16", *out_args])
    for engine_name in ("kvwise-int4", "kvwise-int4-kvf16"):
        _check_results(lines, "throughput", engine_name, {"output_tok_s", "total_tok_s"})
        _check_files(md, png, "throughput", engine_name)
    assert "round-robin" in md.read_text()  # both loaded, runs interleaved (the default)


def test_measure_interleaved_takes_run_i_of_every_engine_in_turn() -> None:
    calls: list[tuple[str, int]] = []
    rounds: list[int] = []

    def engine(name: str) -> report.Call:
        def call(i: int) -> dict[str, float]:
            calls.append((name, i))
            return {"a_tok_s": 10.0 * i, "b_tok_s": 10.0 * i + 1}
        return call

    values = report.measure_interleaved({"x": engine("x"), "y": engine("y")}, runs=2, warmup=1,
                                        on_round=rounds.append)
    assert calls == [("x", 0), ("y", 0), ("x", 1), ("y", 1), ("x", 2), ("y", 2)]
    assert rounds == [0, 1, 2]
    assert values == {"x": {"a_tok_s": [10.0, 20.0], "b_tok_s": [11.0, 21.0]},
                      "y": {"a_tok_s": [10.0, 20.0], "b_tok_s": [11.0, 21.0]}}


def test_kvwise_configs_cross_weight_and_kv_dtypes() -> None:
    import argparse

    from kvwise.bench.cli import kvwise_configs
    from kvwise.errors import ConfigError

    args = argparse.Namespace(weight_dtypes="int8,int4", kv_cache_dtypes="auto,float16")
    configs = kvwise_configs(args, {"threads": 2})
    assert list(configs) == ["kvwise-int8", "kvwise-int8-kvf16", "kvwise-int4",
                             "kvwise-int4-kvf16"]
    assert configs["kvwise-int4-kvf16"] == {"threads": 2, "weight_dtype": "int4",
                                            "kv_cache_dtype": "float16"}
    assert list(kvwise_configs(argparse.Namespace(), {})) == ["kvwise"]
    args = argparse.Namespace(weight_dtypes="int8,int4", kv_cache_dtypes="float16",
                              activation_quants="none,int8")
    configs = kvwise_configs(args, {})
    assert list(configs) == ["kvwise-int8-kvf16", "kvwise-int4-kvf16", "kvwise-int4-kvf16-a8"]
    assert configs["kvwise-int4-kvf16-a8"]["activation_quant"] == "int8"
    with pytest.raises(ConfigError, match="activation_quant"):
        kvwise_configs(argparse.Namespace(weight_dtypes="int4", activation_quants="int2"), {})
    args = argparse.Namespace(weight_dtypes="auto,fp32", batch_invariant_modes="off,on")
    configs = kvwise_configs(args, {})
    assert list(configs) == ["kvwise-auto", "kvwise-auto-inv", "kvwise-fp32", "kvwise-fp32-inv"]
    assert configs["kvwise-fp32-inv"] == {"weight_dtype": "fp32", "batch_invariant": True}
    assert configs["kvwise-auto"]["batch_invariant"] is False
    with pytest.raises(ConfigError, match="off or on"):
        kvwise_configs(argparse.Namespace(batch_invariant_modes="yes"), {})
    with pytest.raises(ConfigError, match="batch_invariant: needs"):  # refused before any load
        kvwise_configs(argparse.Namespace(batch_invariant_modes="on"),
                       {"attention_backend": "two_phase"})
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        kvwise_configs(argparse.Namespace(weight_dtypes=None, kv_cache_dtypes="fp8"), {})


@pytest.mark.slow
@pytest.mark.parametrize("peer,module", [("hf", "transformers"), ("llamacpp", "llama_cpp")])
def test_peer_smoke(peer: str, module: str, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip(module)
    md, png, out_args = _outputs(tmp_path, "latency")
    lines = _run(capsys, [*TINY_LATENCY, "--skip-kvwise", "--peers", peer, *out_args])
    _check_results(lines, "latency", peer, {"decode_tok_s", "prefill_tok_s"})
    _check_files(md, png, "latency", peer)


def test_report_lines_and_section_replacement(tmp_path: Path) -> None:
    results = [
        report.Result("throughput", "kvwise", "output_tok_s", (10.0, 30.0, 20.0)),
        report.Result("throughput", "llamacpp", "output_tok_s", (5.0,), "sequential"),
    ]
    line = report.parse_line(results[0].line())
    assert line == {"kind": "throughput", "engine": "kvwise", "metric": "output_tok_s",
                    "median": "20.0", "min": "10.0", "max": "30.0", "runs": "3"}
    assert report.parse_line(results[1].line())["note"] == "sequential"
    (ratio,) = report.ratio_lines(results)
    assert report.parse_line(ratio) == {"kind": "ratio", "pair": "kvwise/llamacpp",
                                        "output": "4.00"}

    md = tmp_path / "B.md"
    md.write_text("# kvwise benchmarks\n\nhand-written intro\n")
    for median in ("1.0", "2.0"):  # the second write replaces the first section
        section = report.markdown_section(
            "throughput", [report.Result("throughput", "kvwise", "output_tok_s",
                                         (float(median),))],
            command="kvwise bench throughput", workload="w", threads=2, chart_ref=None, notes=[])
        report.update_markdown(str(md), "throughput", section)
        report.update_markdown(str(md), "latency", section.replace("throughput", "latency"))
    text = md.read_text()
    assert "hand-written intro" in text
    assert text.count("<!-- kvwise-bench:throughput -->") == 1
    assert text.count("<!-- kvwise-bench:latency -->") == 1
    assert "| **kvwise** | 2.0 (2.0-2.0) |" in text and "1.0 (1.0-1.0)" not in text


TINY_SERVE = ["serve", "--dataset", "pydoc", "--num-prompts", "3", "--request-rates", "4",
              "--max-tokens", "4", "--threads", "2"]


def _check_serve(lines: list[dict[str, str]], md: Path, png: Path, engine: str) -> None:
    (rate_line,) = [x for x in lines if x["kind"] == "serve"]
    assert rate_line["engine"] == engine and rate_line["rate"] == "4"
    assert rate_line["requests"] == "3" and rate_line["failed"] == "0"
    assert float(rate_line["out_tokens_mean"]) == 4.0
    assert 0.0 <= float(rate_line["attainment"]) <= 1.0
    assert float(rate_line["ttft_p50_s"]) <= float(rate_line["ttft_p99_s"])
    (max_rate,) = [x for x in lines if x["kind"] == "maxrate"]
    assert max_rate["engine"] == engine and max_rate["bound"] in ("lower", "upper")
    text = md.read_text()
    assert text.count("<!-- kvwise-bench:serve -->") == 1 and f"| {engine} |" in text
    assert png.name in text and png.read_bytes()[:8] == PNG_MAGIC


def test_serve_smoke(engine: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kvwise bench serve` starts its own `kvwise serve`, loads it at one rate, reports."""
    md, png, out_args = _outputs(tmp_path, "serve")
    lines = _run(capsys, [*TINY_SERVE, "--engines", "kvwise", *out_args])
    _check_serve(lines, md, png, "kvwise")


@pytest.mark.slow
def test_serve_llamacpp_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The llama.cpp peer: `python -m llama_cpp.server` on the same GGUF (skips if it can't run)."""
    pytest.importorskip("llama_cpp")
    md, png, out_args = _outputs(tmp_path, "serve")
    status = main([*TINY_SERVE, "--engines", "llamacpp", *out_args])
    lines = [report.parse_line(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    skips = [x for x in lines if x["kind"] == "skip"]
    if skips:
        pytest.skip(f"llama_cpp.server cannot start: {skips[0]['reason']}")
    assert status == 0
    _check_serve(lines, md, png, "llamacpp")
