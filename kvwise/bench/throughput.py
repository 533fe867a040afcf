"""`kvwise bench throughput`: aggregate rate of many concurrent requests of one engine.

output_tok_s = num_requests * output_len / wall time of the whole batch;
total_tok_s  = num_requests * (prompt_len + output_len) / the same wall time.

Invariants:
- Call i (warm-ups first) uses the i-th batch of prompts of the workload, identical across engines;
  no prompt appears in two calls, so prefix caching cannot shortcut a later run.
- An engine that cannot batch runs the requests one after another and its results carry the
  runner's `throughput_note` ("sequential").
"""

from __future__ import annotations

from kvwise.bench.peers import Runner
from kvwise.bench.report import Call
from kvwise.bench.workloads import ThroughputWorkload, TokenCorpus


def throughput_call(runner: Runner, workload: ThroughputWorkload, corpus: TokenCorpus,
                    count: int) -> Call:
    """-> call(i): one batch of the i-th prompts, {metric: tok/s}."""
    batches = workload.prompts(corpus, count)

    def call(i: int) -> dict[str, float]:
        seconds = runner.batch_seconds(batches[i], workload.output_len)
        return {"output_tok_s": workload.num_output_tokens / seconds,
                "total_tok_s": workload.num_total_tokens / seconds}

    return call
