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
