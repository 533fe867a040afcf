"""Soak: a thousand short requests through the engine leave no leak (RELIABILITY #11)."""

from __future__ import annotations

import resource

from kvwise import LLM, SamplingParams


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_thousand_short_requests_flat_memory_and_no_stuck_request():
    llm = LLM("smollm2-135m", threads=2, max_model_len=128, kv_cache_memory="64MiB",
              max_num_seqs=64, max_num_batched_tokens=512)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=2, seed=1)
    rss = []
    for round_ in range(5):
        prompts = [[(7 * i + round_) % 49152 + 1] * (1 + i % 9) for i in range(200)]
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert all(o.finished and len(o.outputs[0].token_ids) >= 1 for o in outs)
        stats = llm.stats()
        assert stats["num_blocks_used"] == 0 and stats["num_running"] == 0
        assert stats["num_waiting"] == 0 and not llm.engine.groups
        llm.engine.check_integrity()
        rss.append(_rss_mb())
    # after the first round warms allocator pools, memory stays flat (tolerance: 64 MiB)
    assert max(rss[1:]) - rss[1] < 64, rss
