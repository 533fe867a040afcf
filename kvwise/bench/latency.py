"""`kvwise bench latency`: batch-1 decode rate and long-prompt prefill rate of one engine.

decode_tok_s  = (N - 1) / (t_last_token - t_first_token) for one request generating N tokens;
prefill_tok_s = prompt_len / time_to_first_token for one request with max_tokens = 1.

Invariants:
- Call i (warm-ups first) uses the i-th decode and prefill prompt of the workload, so every engine
  sees the same token ids in the same order and no call repeats a prompt.
"""

from __future__ import annotations

from kvwise.bench.peers import Runner
from kvwise.bench.report import Call
from kvwise.bench.workloads import LatencyWorkload, TokenCorpus


def latency_call(runner: Runner, workload: LatencyWorkload, corpus: TokenCorpus,
                 count: int) -> Call:
    """-> call(i): the i-th decode then the i-th prefill measurement, {metric: tok/s}."""
    decode_prompts, prefill_prompts = workload.prompts(corpus, count)
    n = workload.decode_tokens

    def call(i: int) -> dict[str, float]:
        decode = (n - 1) / runner.decode_seconds(decode_prompts[i], n)
        prefill = len(prefill_prompts[i]) / runner.prefill_seconds(prefill_prompts[i])
        return {"decode_tok_s": decode, "prefill_tok_s": prefill}

    return call
