"""`batch_invariant=True`: a seeded sampled request gets the same tokens and the same logprobs,
bit for bit, whether its prompt is computed whole, in chunks, after prefix-cache hits of
different lengths, or beside other requests (issue 13 item 5; RELIABILITY: batch invariance).

The default engine is invariant only among steps of one size class (quantized projections
switch kernels above SMALL_BATCH_MAX tokens, sgemm picks its blocking from the shape), which a
seeded sample at temperature 0.9 can turn into a different text; these tests pin the mode that
removes every such dependence, for each weight format and a quantized KV cache.
"""

from __future__ import annotations

import pytest

from kvwise import LLM, SamplingParams
from kvwise.errors import ConfigError
from tests.conftest import pydoc_text

BLOCK = 16
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=12, ignore_eos=True,
                        logprobs=2)


def _prompt(llm: LLM, start: int, n: int) -> list[int]:
    ids = llm.get_tokenizer().encode(pydoc_text(), add_special_tokens=False)
    return ids[start:start + n]


def _run(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list]]:
    outs = llm.generate(prompts, SEEDED, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append((list(c.token_ids),
                    [sorted((t, lp.logprob) for t, lp in d.items()) for d in c.logprobs]))
    return res


def _reset(llm: LLM) -> None:
    assert llm.engine.kv_manager.reset_prefix_cache(), "blocks still in use"


@pytest.mark.parametrize("weights,kv", [("fp32", "auto"), ("int8", "auto"), ("int4", "auto"),
                                        ("int4", "int8")])
def test_seeded_sample_same_cached_uncached_chunked_batched(weights: str, kv: str) -> None:
    # a 32-token step budget: the 90-token prompt is prefilled in chunks of 32, its tail after a
    # hit in one step of a few tokens, and decode steps have 1 or 2 rows
    llm = LLM("smollm2-135m", threads=2, max_model_len=256, num_blocks=48, block_size=BLOCK,
              max_num_batched_tokens=32, weight_dtype=weights, kv_cache_dtype=kv,
              batch_invariant=True)
    prompt = _prompt(llm, 1000, 90)
    other = _prompt(llm, 5000, 41)
    _reset(llm)
    ref = _run(llm, [prompt])[0]  # uncached, chunked
    hits = llm.stats()["prefix_hit_tokens"]
    assert _run(llm, [prompt])[0] == ref  # whole prompt cached but its last block
    assert llm.stats()["prefix_hit_tokens"] - hits == 80
    for hit in (BLOCK, 3 * BLOCK):  # a hit of one block, then of three
        _reset(llm)
        _run(llm, [prompt[:hit]])  # caches exactly the first hit tokens' blocks
        hits = llm.stats()["prefix_hit_tokens"]
        assert _run(llm, [prompt])[0] == ref, hit
        assert llm.stats()["prefix_hit_tokens"] - hits == hit
    _reset(llm)
    together = _run(llm, [other, prompt])  # prefilled and decoded beside another request
    assert together[1] == ref
    _reset(llm)
    assert _run(llm, [other])[0] == together[0]
    llm.engine.check_integrity()
    assert llm.stats()["num_blocks_used"] == 0


def test_seeded_samples_survive_preemption_by_recompute() -> None:
    """Recompute after preemption runs a request's generated tokens as prompt rows; in the mode
    they get the bits their decode steps gave them, so the samples after it do too."""
    kw = dict(threads=2, max_model_len=256, block_size=BLOCK, max_num_batched_tokens=48,
              batch_invariant=True, enable_prefix_caching=False)
    roomy = LLM("smollm2-135m", num_blocks=64, **kw)
    prompts = [_prompt(roomy, 2000 + 300 * i, 30 + 7 * i) for i in range(6)]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=40, ignore_eos=True)
    alone = [list(roomy.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids)
             for p in prompts]
    tight = LLM("smollm2-135m", num_blocks=14, **kw)  # 224 slots for 6 x (up to 95) tokens
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.stats()["num_preemptions"] > 0
    assert [list(o.outputs[0].token_ids) for o in outs] == alone


@pytest.mark.parametrize("kwargs,field", [
    (dict(attention_backend="two_phase"), "batch_invariant"),
    (dict(kv_cache_dtype="bfloat16"), "batch_invariant"),
    (dict(dtype="bfloat16"), "batch_invariant"),
])
def test_batch_invariant_refuses_what_it_cannot_keep(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match="batch_invariant: needs") as e:
        LLM("smollm2-135m", batch_invariant=True, **kwargs)
    assert e.value.param == field
