"""`--kv-cache-dtype int8` through the engine: cache-state independence and its bytes.

A token's stored KV is the same int8 codes whichever path wrote them (tests/unit/cache), and a
step attends to its own rows as stored, so an int8 request gives the same greedy tokens whether
its prefix came from the prefix cache, from an earlier chunk or from recompute after
preemption (RELIABILITY.md #7: quantized KV x prefix cache x a full pool).

That holds exactly only if the K/V rows themselves do not depend on the step they were computed
in. The int8 weight kernels of steps <= 16 tokens compute each row independently of the others;
fp32 / bf16 GEMMs of larger steps do not (a row's rounding depends on how many rows the step
has, ~1e-6 relative), and int8 rounding turns such a difference into a whole quantization step
now and then (measured: first-step logits of a 17-token prompt batched vs alone differ by
6e-5 with the fp32 cache, 2e-3 fp16, 0.1 int8). Hence the engine here: int8 weights and
16-token steps.
"""

from __future__ import annotations

import random

import pytest

from kvwise import LLM, SamplingParams
from tests.conftest import pydoc_text

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def shared_prompts(llm):
    ids = llm.get_tokenizer().encode(pydoc_text(), add_special_tokens=False)
    rng = random.Random(1)
    base = []
    for _ in range(8):
        n = rng.choice([17, 33, 64, 100])
        start = rng.randrange(0, len(ids) - n)
        base.append(ids[start:start + n])
    # every other prompt continues another's first 40 tokens: prefix hits of 2 blocks
    return base + [p[:40] + q[:30] for p, q in zip(base, reversed(base))]


def _generate(prompts, **engine_args):
    llm = LLM("smollm2-135m", threads=2, max_model_len=512, kv_cache_dtype="int8",
              weight_dtype="int8", max_num_batched_tokens=16, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.check_integrity()
    return [o.outputs[0].token_ids for o in outs], llm.stats()


@pytest.fixture(scope="module")
def expect(shared_prompts):
    return _generate(shared_prompts, enable_prefix_caching=False)[0]


@pytest.mark.parametrize("num_blocks", [10, 48])
def test_int8_prefix_caching_full_pool_equals_no_caching(shared_prompts, expect, num_blocks):
    """10 blocks for 16 requests of up to 112 tokens: the pool runs full, requests are
    preempted and recomputed; 48: prefix hits read int8 chunks another request wrote."""
    got, stats = _generate(shared_prompts, num_blocks=num_blocks, max_num_seqs=16)
    assert got == expect
    assert stats["num_blocks_used"] == 0
    if num_blocks == 10:
        assert stats["num_preemptions"] > 0
        assert stats["peak_blocks_used"] == stats["num_blocks_total"]
    else:
        assert stats["prefix_hit_tokens"] > 0


def test_int8_block_bytes(llm):
    """64 codes + one fp16 scale per token, head, K or V: (64 + 2) / (4 * 64) of float32."""
    _, stats = _generate(["hello"], num_blocks=4)
    fp32 = llm.stats()["kv_bytes_per_block"]
    assert stats["kv_bytes_per_block"] * 256 == fp32 * 66
