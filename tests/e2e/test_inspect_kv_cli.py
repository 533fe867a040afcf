"""`kvwise inspect kv`: FastGen's choice per (layer, KV head) for one prompt, as lines, JSON and
a PNG policy map; bad use is one `error:` line."""

from __future__ import annotations

import json
from pathlib import Path

from kvwise.cache.compress.fastgen import CANDIDATES
from kvwise.eval.inspect_kv import RESULT_KEYS
from tests.e2e.test_cli import ENGINE, kvwise

PROMPT = ("The history of the printing press begins in the fifteenth century, when movable "
          "type made books cheap enough for ordinary readers. ") * 4


def test_inspect_kv_json_and_policy_map(tmp_path: Path):
    png = tmp_path / "policies.png"
    proc = kvwise("inspect", "kv", "--prompt", PROMPT, "--kv-compression", "fastgen",
                  "--recovery-threshold", "0.9", "--json", "--output", str(png), *ENGINE)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["layer"], r["kv_head"]) for r in rows] == [(i, h) for i in range(30)
                                                          for h in range(3)]
    for r in rows:
        assert list(r) == list(RESULT_KEYS) and r["policy"] in CANDIDATES
        # the chosen policy met the threshold, or it is full (the last resort)
        assert r["recovery"] >= 0.9 - 1e-9 or r["policy"] == "full", r
        assert 0.0 < r["kept_fraction"] <= 1.0
        assert (r["kept_fraction"] == 1.0) >= (r["policy"] == "full")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_kv_errors_are_one_line():
    for flags, needle in [([], "--prompt"), (["--prompt", "x", "--output", "a.jpg"], ".png"),
                          (["--prompt", "hello"], "fastgen")]:
        proc = kvwise("inspect", "kv", *flags, *ENGINE)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error:") and needle in proc.stderr, proc.stderr
