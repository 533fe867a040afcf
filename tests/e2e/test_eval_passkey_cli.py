"""`kvwise eval passkey` as a user runs it: one JSON object per (format, length), errors as one
`error:` line before any model loads."""

from __future__ import annotations

import json

from kvwise.eval.passkey import RESULT_KEYS
from tests.e2e.test_cli import ENGINE, kvwise


def test_eval_passkey_json_one_object_per_setting():
    proc = kvwise("eval", "passkey", "--context-lens", "128,256", "--trials", "2",
                  "--kv-cache-dtypes", "float32", "--json", *ENGINE)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["setting"], r["context_len"]) for r in rows] == [
        ("kvwise/kv=float32", 128), ("kvwise/kv=float32", 256)]
    for r in rows:
        assert list(r) == list(RESULT_KEYS)
        assert r["trials"] == 2 and r["accuracy"] == r["passed"] / 2
        assert len(r["failed"]) == 2 - r["passed"]
        assert r["seconds"] > 0
    # a 135M model finds a key in 256 tokens of filler: the pipeline end to end, not a benchmark
    assert rows[-1]["passed"] == 2, rows


def test_eval_passkey_errors_are_one_line():
    for flags, needle in [(["--context-lens", "2048,4k"], "context_lens"),
                          (["--kv-cache-dtypes", "fp8"], "kv_cache_dtype"),
                          (["--trials", "0"], "trials")]:
        proc = kvwise("eval", "passkey", *flags, *ENGINE)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error:") and needle in proc.stderr, proc.stderr
