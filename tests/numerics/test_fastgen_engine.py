"""`--kv-compression fastgen` through the engine: per-(layer, KV head) policies profiled on the
prompt inside the batched step, per-head eviction while decoding, memory given back.

- Neutral setting: recovery_threshold=1.0 makes every head full and gives exactly the tokens
  of no compression (per request on the same engine, with prefix caching, and with preemption).
- Profiling sees the prompt's last queries whatever the chunking: a chunked prompt chooses the
  policies of the whole prompt, except heads whose recovery is within 1e-3 of the threshold.
- A compressing setting keeps fewer KV entries than the full cache (`llm.stats()`), keeps the
  KV manager consistent at every step, and returns every block when the requests end.
"""

from __future__ import annotations

import pytest

from kvwise import LLM, SamplingParams
from kvwise.errors import InvalidRequestError

PROMPTS = ["The history of the printing press begins in the fifteenth century, when movable "
           "type made books cheap enough for ordinary readers. Its first effect was",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]


def _llm(**kw) -> LLM:
    args = dict(threads=2, max_model_len=1024, kv_cache_memory="48MiB", weight_dtype="int8")
    return LLM("smollm2-135m", **{**args, **kw})


def _greedy(llm: LLM, max_tokens: int = 32, prompts=PROMPTS, **params) -> list[list[int]]:
    p = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **params)
    outs = llm.generate(prompts, p, use_tqdm=False)
    llm.engine.check_integrity()
    assert llm.stats()["num_blocks_used"] == 0
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def plain() -> LLM:
    return _llm()


def test_neutral_threshold_gives_the_tokens_of_no_compression(plain):
    want = _greedy(plain)
    neutral = dict(kv_compression="fastgen", recovery_threshold=1.0)
    assert _greedy(plain, **neutral) == want  # per request, prefix chunks cached by `want`
    assert _greedy(plain, **neutral) == want  # and again, hitting them
    small = _llm(num_blocks=6, enable_prefix_caching=False)  # 8 blocks needed: preempts
    assert _greedy(small, **neutral) == want
    assert small.stats()["num_preemptions"] > 0


def _policies(llm: LLM, prompt: list[int], **params):
    """The FastGen policy of the request right after its prompt was profiled."""
    eng = llm.engine
    eng.add_request("probe", prompt, SamplingParams(temperature=0.0, max_tokens=2, **params))
    req = eng.scheduler.find("probe")
    while req.kv_policy.groups is None:
        eng.step()
        eng.check_integrity()
    pol = req.kv_policy
    while eng.has_unfinished_requests():
        eng.step()
    return pol


def test_chunked_prompt_profiles_like_a_whole_one(plain):
    ids = plain.get_tokenizer().encode(" ".join(PROMPTS) * 6)[:300]
    whole = _policies(plain, ids, kv_compression="fastgen", recovery_threshold=0.9)
    chunked = _policies(_llm(max_num_batched_tokens=64), ids, kv_compression="fastgen",
                        recovery_threshold=0.9)
    differ = [g for g, (a, b) in enumerate(zip(whole.policies, chunked.policies)) if a != b]
    rec = whole.recoveries.flatten(0, 1)  # [L*K, P]
    for g in differ:  # only a head on the threshold may tip over
        near = (rec[g] - 0.9).abs().min().item()
        assert near < 1e-3, (g, whole.policies[g], chunked.policies[g], rec[g])
    assert len(set(whole.policies)) > 1  # the profile chose more than one kind of policy


def test_compressing_frees_kv_and_stays_consistent(plain):
    ids = plain.get_tokenizer().encode(" ".join(PROMPTS) * 8)[:400]
    eng = plain.engine
    eng.add_request("fg", ids, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                              kv_compression="fastgen",
                                              recovery_threshold=0.9))
    kept = []
    while eng.has_unfinished_requests():
        eng.step()
        eng.check_integrity()
        s = plain.stats()
        if s["kv_entries_full"]:
            kept.append(s["kv_entries_kept"] / s["kv_entries_full"])
    assert kept and max(kept[1:]) < 0.95, kept  # after the prompt step's evictions
    assert plain.stats()["num_blocks_used"] == 0


def test_bad_fastgen_settings_are_refused():
    for field, value in (("recovery_threshold", 1.5), ("fastgen_local_ratio", 0.0),
                         ("fastgen_frequent_ratio", float("nan"))):
        with pytest.raises(InvalidRequestError, match=field):
            SamplingParams(kv_compression="fastgen", **{field: value})


def test_fastgen_refusals_name_the_field():
    from kvwise.config import EngineConfig
    from kvwise.errors import ConfigError

    with pytest.raises(ConfigError, match="kv_compression"):
        EngineConfig.from_kwargs(kv_compression="fastgen", batch_invariant=True)
    with pytest.raises(ConfigError, match="kv_compression"):
        EngineConfig.from_kwargs(kv_compression="fastgen", kv_cache_dtype="nuq3-1%")


def test_fastgen_composes_with_the_int8_cache():
    """Per-head writes of int8 codes and scales (write_heads): the neutral setting gives the
    int8 cache's own tokens, a compressing one runs consistently and returns every block."""
    # no prefix caching: a hit would compute the tail in a smaller step, whose ~1e-7 GEMM
    # differences move int8 codes (a property of the int8 cache, tested in test_int8_kv.py)
    llm = _llm(kv_cache_dtype="int8", enable_prefix_caching=False)
    want = _greedy(llm)
    assert _greedy(llm, kv_compression="fastgen", recovery_threshold=1.0) == want
    ids = llm.get_tokenizer().encode(" ".join(PROMPTS) * 8)[:400]
    got = _greedy(llm, 24, [ids], kv_compression="fastgen", recovery_threshold=0.9)
    assert len(got[0]) == 24
