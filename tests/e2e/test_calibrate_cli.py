"""`kvwise calibrate` as a user runs it: input errors answer with one `error:` line and exit 2;
a tiny run writes a calibration file the KVQuant format loads."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = ["--threads", "2"]


def kvwise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvwise.cli", "calibrate", *args],
                          capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a refused run (no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import pydoc_text

    path = tmp_path_factory.mktemp("calibrate") / "text.txt"
    path.write_text(pydoc_text()[:20000], encoding="utf-8")
    return path


@pytest.mark.parametrize("flags, words", [
    (["--kv-cache-dtype", "nuq4", "--text-file", "/no/such/file.txt"], ["text_file", "file.txt"]),
    (["--kv-cache-dtype", "int8"], ["kv_cache_dtype", "'int8' is not a KVQuant format"]),
    (["--kv-cache-dtype", "nuq4,fp8"], ["kv_cache_dtype", "'fp8'"]),
    (["--kv-cache-dtype", "nuq3-20%"], ["kv_cache_dtype", "outlier fraction"]),
    (["--kv-cache-dtype", "nuq4", "--num-samples", "0"], ["num_samples", ">= 1"]),
    (["--kv-cache-dtype", "nuq4", "--context-len", "1"], ["context_len", ">= 2"]),
    (["--kv-cache-dtype", "nuq4", "--output", "/no/such/dir/c.json"], ["output", "/no/such/dir"]),
])
def test_bad_input_before_the_model_loads(text_file, tmp_path, flags, words):
    if "--text-file" not in flags:
        flags = [*flags, "--text-file", str(text_file)]
    if "--output" not in flags:
        flags = [*flags, "--output", str(tmp_path / "c.json")]
    proc = kvwise(*flags, *ENGINE)
    line = error_line(proc)
    for word in words:
        assert word in line, line
    assert not (tmp_path / "c.json").exists()


def test_text_shorter_than_a_sample_and_window_over_the_context(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.", encoding="utf-8")
    proc = kvwise("--kv-cache-dtype", "nuq4", "--text-file", str(short), "--context-len", "64",
                  "--output", str(tmp_path / "c.json"), *ENGINE)
    line = error_line(proc)
    assert "text_file" in line and "fewer than one sample of context_len=64" in line, line
    proc = kvwise("--kv-cache-dtype", "nuq4", "--text-file", str(short), "--context-len",
                  "100000", "--output", str(tmp_path / "c.json"), *ENGINE)
    line = error_line(proc)
    assert "context_len" in line and "exceeds the model's context length" in line, line


def test_tiny_run_writes_a_loadable_calibration(text_file, tmp_path):
    calibration = pytest.importorskip("kvwise.cache.kvquant.calibration")
    if not hasattr(calibration, "fit_calibration"):
        pytest.skip("kvwise.cache.kvquant.calibration.fit_calibration is not written yet")
    out = tmp_path / "calib.json"
    proc = kvwise("--kv-cache-dtype", "nuq4,nuq3-1%,int2", "--text-file", str(text_file),
                  "--num-samples", "2", "--context-len", "32", "--seed", "1", "--no-progress",
                  "--output", str(out), *ENGINE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[1] for line in lines[:3]] == [
        "kv_cache_dtype=nuq4", "kv_cache_dtype=nuq3-1%", "kv_cache_dtype=int2"]
    assert lines[-1] == f"wrote {out}"
    doc = json.loads(out.read_text())
    assert doc["model"] == {"model": "smollm2-135m", "num_layers": 30, "num_kv_heads": 3,
                            "head_dim": 64, "rope_theta": 100000.0}
    assert {k: doc["source"][k] for k in ("text_file", "num_samples", "context_len", "seed")} \
        == {"text_file": "text.txt", "num_samples": 2, "context_len": 32, "seed": 1}
    assert doc["source"]["text_sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    cal = calibration.Calibration.load(str(out))
    cal.check_model(30, 3, 64)
    assert sorted(cal.formats) == ["int2", "nuq3-1%", "nuq4"]
