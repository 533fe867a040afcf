"""`kvwise eval kv` as a user runs it: one JSON object per setting, one text line per setting,
errors as one `error:` line."""

from __future__ import annotations

import json
import math

from kvwise.eval.kv_eval import RESULT_KEYS, eval_windows, score_rows
from kvwise.eval.perplexity import prompt_logits
from tests.conftest import pydoc_text
from tests.e2e.test_cli import ENGINE, kvwise

SIZES = ["--context-len", "32", "--continuation-len", "16", "--num-windows", "2"]


def _text_file(tmp_path) -> str:
    f = tmp_path / "text.txt"
    f.write_text(pydoc_text()[:20000])
    return str(f)


def test_eval_kv_json_one_object_per_setting(llm, tmp_path):
    path = _text_file(tmp_path)
    proc = kvwise("eval", "kv", "--text-file", path, *SIZES, "--kv-cache-dtypes", "float16",
                  "--kv-compressions", "none,streaming:4:16", "--json", "--weight-dtype", "fp32",
                  *ENGINE)  # weights as the `llm` fixture's
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["setting"] for r in rows] == ["kvwise/kv=float32", "kvwise/kv=float16",
                                            "kvwise/kv=float16/comp=streaming:4:16"]
    assert all(list(r) == list(RESULT_KEYS) for r in rows)
    base, f16, streaming = rows
    assert (base["greedy_agreement"], base["kept_fraction"], base["kv_bytes_ratio"]) == \
        (1.0, 1.0, 1.0)
    assert f16["kv_bytes_ratio"] == 0.5 and f16["kept_fraction"] == 1.0
    # 32 context tokens stay under sink + window + S (36): the evictions come while decoding
    assert streaming["kept_fraction"] == 1.0 > streaming["final_kept_fraction"]
    assert streaming["mean_kept_fraction"] < 1.0
    assert all(r["seconds"] > 0 for r in rows)
    # the baseline ppl, independently: a full forward of each window through the fixture
    with open(path, encoding="utf-8") as f:
        ids = llm.get_tokenizer().encode(f.read(), add_special_tokens=False)
    nlls = []
    for ctx, cont in eval_windows(ids, 32, 16, 2):
        nlls.append(score_rows(prompt_logits(llm.engine, ctx + cont)[31:-1], cont)[0])
    ref = math.exp(sum(n.sum().item() for n in nlls) / 32)
    assert abs(base["ppl"] / ref - 1) < 1e-4, (base["ppl"], ref)


def test_eval_kv_text_lines(tmp_path):
    proc = kvwise("eval", "kv", "--text-file", _text_file(tmp_path), *SIZES,
                  "--kv-cache-dtypes", "int8", *ENGINE)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["kvwise/kv=float32", "kvwise/kv=int8"]
    for line in lines:
        assert "vs kvwise/kv=float32)" in line
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item
                      and not item.startswith("kvwise/"))
        assert set(fields) == {"ppl", "greedy_agreement", "kept_fraction",
                               "final_kept_fraction", "kv_bytes_ratio", "seconds"}
    assert "+0.000%" in lines[0]


def test_eval_kv_errors_are_one_line():
    for flags, needle in [(["--kv-compressions", "streaming:4"], "kv_compressions"),
                          (["--peers", "vllm"], "unknown peer"),
                          (["--kv-cache-dtypes", "fp8"], "kv_cache_dtype")]:
        proc = kvwise("eval", "kv", "--dataset", "pydoc-topics", *flags, *ENGINE)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error:") and needle in proc.stderr, proc.stderr
    proc = kvwise("eval", "kv", *ENGINE)
    assert proc.returncode == 2 and "--text-file" in proc.stderr
