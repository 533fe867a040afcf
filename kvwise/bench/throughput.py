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
from kvwise.bench.report import Result, measure
from kvwise.bench.workloads import ThroughputWorkload, TokenCorpus

BENCH = "throughput"


def measure_throughput(runner: Runner, workload: ThroughputWorkload, corpus: TokenCorpus,
                       runs: int, warmup: int) -> list[Result]:
    batches = workload.prompts(corpus, warmup + runs)
    seconds = measure(lambda i: runner.batch_seconds(batches[i], workload.output_len), runs, warmup)
    note = runner.throughput_note
    return [
        Result(BENCH, runner.name, "output_tok_s",
               tuple(workload.num_output_tokens / s for s in seconds), note),
        Result(BENCH, runner.name, "total_tok_s",
               tuple(workload.num_total_tokens / s for s in seconds), note),
    ]
