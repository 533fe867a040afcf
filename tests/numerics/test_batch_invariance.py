"""Greedy outputs do not depend on what else runs: batched, chunked, preempted == alone."""

from __future__ import annotations

import random

import pytest

from kvwise import LLM, SamplingParams
from tests.conftest import pydoc_text

NUM_REQUESTS = 32
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def prompts(llm):
    ids = llm.get_tokenizer().encode(pydoc_text(), add_special_tokens=False)
    rng = random.Random(0)
    out = []
    for _ in range(NUM_REQUESTS):
        n = rng.choice([3, 7, 16, 17, 33, 64, 100, 150])
        start = rng.randrange(0, len(ids) - n)
        out.append(ids[start:start + n])
    return out


@pytest.fixture(scope="module")
def alone(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


def _together(engine_args, prompts, max_tokens=MAX_TOKENS):
    # fp32 weights, like the session `llm` that computes the "alone" outputs
    llm = LLM("smollm2-135m", threads=2, max_model_len=512, weight_dtype="fp32", **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.check_integrity()
    stats = llm.stats()
    assert stats["num_blocks_used"] == 0
    return [o.outputs[0].token_ids for o in outs], stats


def test_batched_with_chunked_prefill_equals_alone(prompts, alone):
    got, stats = _together(dict(max_num_batched_tokens=64, max_num_seqs=32,
                                enable_prefix_caching=False), prompts)
    assert got == alone


def test_preemption_by_recompute_equals_alone(prompts, alone):
    # 24 blocks of 16 = 384 slots for 32 requests of up to 162 tokens: preemption is forced
    got, stats = _together(dict(max_num_batched_tokens=128, num_blocks=24, max_num_seqs=32,
                                enable_prefix_caching=False), prompts)
    assert stats["num_preemptions"] > 0
    assert got == alone


def test_prefix_caching_on_equals_alone(prompts, alone):
    shared = prompts[:8] + [p[:20] + q for p, q in zip(prompts[:8], prompts[8:16])]
    got, stats = _together(dict(max_num_batched_tokens=96, num_blocks=40, max_num_seqs=16), shared)
    assert got[:8] == alone[:8]
    ref = LLM("smollm2-135m", threads=2, max_model_len=512, enable_prefix_caching=False,
              weight_dtype="fp32")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expect = [o.outputs[0].token_ids for o in ref.generate(shared, params, use_tqdm=False)]
    assert got == expect
    assert stats["prefix_hit_tokens"] > 0


def test_fp16_kv_cache_batched_preempted_equals_alone(llm, prompts):
    """--kv-cache-dtype float16: rows are rounded once, when written, and every path (prefill
    spans, the decode kernel, recompute after preemption) reads the same halves back, so batch
    invariance holds as with the fp32 cache; a block takes half the bytes."""
    sub = prompts[:12]
    ref = LLM("smollm2-135m", threads=2, max_model_len=512, kv_cache_dtype="float16",
              weight_dtype="fp32")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    alone16 = [ref.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in sub]
    # 13 blocks of 16 for 12 requests of up to 162 tokens: admission fills the pool with whole
    # prompts (and their next token), their outputs outgrow it: preemption is forced
    got, stats = _together(dict(kv_cache_dtype="float16", max_num_batched_tokens=64,
                                num_blocks=13, max_num_seqs=12, enable_prefix_caching=False),
                           sub)
    assert stats["num_preemptions"] > 0
    assert got == alone16
    assert 2 * stats["kv_bytes_per_block"] == llm.stats()["kv_bytes_per_block"]
