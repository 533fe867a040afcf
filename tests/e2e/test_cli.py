"""The CLI as a user runs it: generate --json, chat over stdin, eval ppl."""

from __future__ import annotations

import json
import subprocess
import sys

from kvwise import SamplingParams

ENGINE = ["--threads", "2", "--max-model-len", "512", "--kv-cache-memory", "128MiB"]


def kvwise(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvwise.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_generate_json_equals_offline_api(llm, tmp_path):
    prompts = ["The capital of France is", "def add(a, b):", "Water boils at"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts[1:]) + "\n")
    proc = kvwise("generate", "--prompt", prompts[0], "--prompts-file", str(f), "--json",
                  "--max-tokens", "12", "--weight-dtype", "fp32", *ENGINE)  # as the `llm` fixture
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt_index"] for r in rows] == [0, 1, 2]
    ref = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    for row, out in zip(rows, ref):
        assert row["token_ids"] == out.outputs[0].token_ids
        assert row["text"] == out.outputs[0].text
        assert row["finish_reason"] == out.outputs[0].finish_reason
    assert "tok/s" in proc.stderr


def test_chat_reads_turns_from_stdin():
    proc = kvwise("chat", "--max-tokens", "8", *ENGINE, stdin="Hello!\nWhat is 2+2?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2
    assert proc.stderr.count("tok/s decode") == 2


def test_eval_ppl_last_line(tmp_path):
    from tests.conftest import pydoc_text

    f = tmp_path / "text.txt"
    f.write_text(pydoc_text()[:20000])
    proc = kvwise("eval", "ppl", "--text-file", str(f), "--context-len", "128",
                  "--num-chunks", "2", *ENGINE)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("ppl=") and 1.0 < float(last[4:]) < 100.0


def test_eval_quant_reports_each_dtype_against_fp32():
    proc = kvwise("eval", "quant", "--weight-dtypes", "int8", "--kv-cache-dtypes",
                  "auto,float16", "--context-len", "128", "--num-chunks", "1", "--num-prompts",
                  "2", "--prompt-len", "16", "--max-tokens", "8", *ENGINE)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.strip().splitlines()
             if line.startswith("quant ")]
    assert [line[1] for line in lines] == ["weight_dtype=fp32", "weight_dtype=int8",
                                           "weight_dtype=int8"]
    assert lines[2][2] == "kv_cache_dtype=float16"
    for line in lines[1:]:
        fields = dict(item.split("=", 1) for item in line[1:])
        assert abs(float(fields["rel_ppl"].rstrip("%"))) < 5  # percent; int8 is within ~0.5%
        assert 0.0 <= float(fields["greedy_agreement"]) <= 1.0


def test_eval_quant_rejects_unknown_dtype():
    proc = kvwise("eval", "quant", "--weight-dtypes", "int3", *ENGINE)
    assert proc.returncode != 0 and "weight_dtype" in proc.stderr
    proc = kvwise("eval", "quant", "--kv-cache-dtypes", "fp8", *ENGINE)
    assert proc.returncode != 0 and "kv_cache_dtype" in proc.stderr


_NO_HEAVY_IMPORTS = """
import sys
import kvwise.cli as cli
from kvwise.config import parse_cli_args
for argv in (["--help"], ["generate", "--help"], ["bench", "--help"], ["bench", "latency", "-h"],
             ["serve", "--help"], ["generate", "--bogus"], ["bench", "latency", "--runs", "x"],
             ["eval", "passkey", "--help"]):
    try:
        parse_cli_args(cli.build_parser(), argv)
    except SystemExit:
        pass
assert cli.main(["generate", "--prompt", "hi", "--weight-dtype", "bogus"]) == 2
assert cli.main(["serve", "--kv-cache-memory", "lots"]) == 2
assert cli.main(["eval", "passkey", "--context-lens", "4k"]) == 2
print("HEAVY", sorted(m for m in ("torch", "numba", "transformers", "fastapi", "uvicorn")
                      if m in sys.modules))
"""


def test_help_and_argument_errors_import_no_heavy_module():
    """`kvwise --help` and bad flags must answer at once: building the parser, --help of every
    command and a bad engine flag load no torch / numba / transformers / fastapi (a property,
    not a timing)."""
    proc = subprocess.run([sys.executable, "-c", _NO_HEAVY_IMPORTS], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []", proc.stdout[-2000:]
    assert "weight_dtype" in proc.stderr and "unrecognized arguments: --bogus" in proc.stderr


def test_bench_attention_flags_are_parsed_by_its_own_parser():
    """`bench attention` is declared as a stub (its flags live beside its torch code); its real
    parser answers --help and rejects a bad flag."""
    ok = kvwise("bench", "attention", "--help")
    assert ok.returncode == 0 and "--shared-lens" in ok.stdout, ok.stderr
    bad = kvwise("bench", "attention", "--no-such-flag")
    assert bad.returncode == 2 and "--no-such-flag" in bad.stderr
