"""`kvwise bench latency`: batch-1 decode rate and long-prompt prefill rate of one engine.

decode_tok_s  = (N - 1) / (t_last_token - t_first_token) for one request generating N tokens;
prefill_tok_s = prompt_len / time_to_first_token for one request with max_tokens = 1.

Invariants:
- Call i (warm-ups first) uses the i-th decode and prefill prompt of the workload, so every engine
  sees the same token ids in the same order and no call repeats a prompt.
"""

from __future__ import annotations

from kvwise.bench.peers import Runner
from kvwise.bench.report import Result, measure
from kvwise.bench.workloads import LatencyWorkload, TokenCorpus

BENCH = "latency"


def measure_latency(runner: Runner, workload: LatencyWorkload, corpus: TokenCorpus, runs: int,
                    warmup: int) -> list[Result]:
    decode_prompts, prefill_prompts = workload.prompts(corpus, warmup + runs)
    n = workload.decode_tokens

    def decode_rate(i: int) -> float:
        return (n - 1) / runner.decode_seconds(decode_prompts[i], n)

    def prefill_rate(i: int) -> float:
        return len(prefill_prompts[i]) / runner.prefill_seconds(prefill_prompts[i])

    return [
        Result(BENCH, runner.name, "decode_tok_s", tuple(measure(decode_rate, runs, warmup))),
        Result(BENCH, runner.name, "prefill_tok_s", tuple(measure(prefill_rate, runs, warmup))),
    ]
