"""`kvwise bench attention` and `kvwise bench prefix` at tiny sizes: they run, their result lines
parse and the markdown section and chart appear. Nothing here checks speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvwise.bench import report
from kvwise.bench.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[dict[str, str]]:
    assert main(argv) == 0
    return [report.parse_line(x) for x in capsys.readouterr().out.splitlines() if x.strip()]


def _files(tmp_path: Path, kind: str) -> tuple[Path, Path, list[str]]:
    md, png = tmp_path / "BENCHMARKS.md", tmp_path / f"bench_{kind}.png"
    return md, png, ["--output-md", str(md), "--chart", str(png)]


def test_attention_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md, png, out = _files(tmp_path, "attention")
    lines = _run(capsys, ["attention", "--num-requests", "4", "--shared-lens", "32",
                          "--private-len", "8", "--runs", "1", "--warmup", "0",
                          "--kv-cache-dtypes", "float32,int8", "--threads", "1", *out])
    results = {(x["engine"], x["metric"]) for x in lines if x["kind"] == "attention"}
    assert results == {(e + kv, m) for e in ("two_phase", "paged", "reference")
                       for kv in ("", "-kvint8") for m in ("shared_32_us", "distinct_32_us")}
    ratio = next(x for x in lines if x["kind"] == "ratio")
    assert ratio["pair"] == "two_phase/paged" and float(ratio["shared_32"]) > 0
    assert "<!-- kvwise-bench:attention -->" in md.read_text()
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_prefix_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md, png, out = _files(tmp_path, "prefix")
    lines = _run(capsys, ["prefix", "--num-requests", "4", "--prefix-len", "32",
                          "--question-len", "8", "--output-len", "4", "--runs", "1",
                          "--threads", "1", *out])
    peaks = {x["engine"]: float(x["median"]) for x in lines
             if x["kind"] == "prefix" and x["metric"] == "peak_kv_mib"}
    assert set(peaks) == {"sharing_off", "sharing_paged", "sharing_two_phase"}
    # 4 x 3 blocks unshared; shared: 2 prefix blocks + 4 x 1 private
    assert peaks["sharing_paged"] == peaks["sharing_two_phase"] == peaks["sharing_off"] / 2
    assert "<!-- kvwise-bench:prefix -->" in md.read_text()
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_kv_memory_bench_counts_what_the_budget_holds(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A budget of 11 fp16 blocks (16 tokens x 30 layers x 3 KV heads x 64 x K,V x 2 bytes) holds
    two requests of 64 + 4 tokens (5 blocks each); nuq3-1% blocks are ~4x smaller, so all five
    requests run at once."""
    md = tmp_path / "BENCHMARKS.md"
    fp16_block = 16 * 30 * 3 * 64 * 2 * 2
    lines = _run(capsys, ["kv-memory", "--kv-cache-dtypes", "float16,nuq3-1%",
                          "--kv-cache-memory", str(11 * fp16_block), "--num-requests", "5",
                          "--prompt-len", "64", "--output-len", "4", "--threads", "1",
                          "--output-md", str(md)])
    got = {(x["engine"], x["metric"]): float(x["median"]) for x in lines
           if x["kind"] == "kv-memory"}
    assert got[("float16", "bytes_per_token")] == fp16_block / 16
    assert got[("float16", "max_concurrent")] == 2
    assert got[("nuq3-1%", "max_concurrent")] == 5
    assert got[("nuq3-1%", "side_bytes_per_request")] == 17 * 30 * 3 * 64 * 2 * 2  # tail + sink
    assert got[("nuq3-1%", "bytes_per_token")] < got[("float16", "bytes_per_token")] / 4
    ratio = next(x for x in lines if x["kind"] == "ratio")
    assert ratio["pair"] == "nuq3-1%/float16" and float(ratio["max_concurrent"]) == 2.5
    assert "<!-- kvwise-bench:kv-memory -->" in md.read_text()


def test_kv_memory_bench_needs_a_fixed_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-memory", "--kv-cache-dtypes", "float16", "--num-requests", "2"]) == 2
    assert "kv_cache_memory" in capsys.readouterr().err
