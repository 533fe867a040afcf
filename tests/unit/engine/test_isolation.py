"""One request never fails another (RELIABILITY: the server keeps serving; issue 13 item 5).

Whatever sampling parameters one request carries, either `SamplingParams`/`add_request` rejects
them with InvalidRequestError, or the request runs; a request beside it in the same engine steps
gets exactly the tokens it gets alone (the engine runs batch-invariant: a fuzzed `n` changes the
step's size, which without the mode changes quantized kernels and so a seeded sample's bits).
A request whose sampling raises inside a step (parameters corrupted after validation) finishes
alone with finish_reason "error"; the async front hands that request an EngineStepError and
nothing else.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvwise import LLM, SamplingParams
from kvwise.engine.async_engine import AsyncEngine, EngineStepError, NewRequest
from kvwise.errors import InvalidRequestError

PROMPT_A = "The quick brown fox"
PROMPT_B = "Once upon a time"
MAX_MODEL_LEN = 32


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2-135m", threads=2, max_model_len=MAX_MODEL_LEN, num_blocks=32,
               block_size=16, max_num_batched_tokens=64, batch_invariant=True)


def _greedy_b() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def _seeded_b() -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=4, ignore_eos=True)


def _run(llm: LLM) -> dict[str, Any]:
    """Step until idle; the last output of every request."""
    last: dict[str, Any] = {}
    for _ in range(200):
        if not llm.engine.has_unfinished_requests():
            break
        for out in llm.engine.step():
            last[out.request_id] = out
    assert not llm.engine.has_unfinished_requests(), "engine did not drain"
    llm.engine.check_integrity()
    assert llm.stats()["num_blocks_used"] == 0
    return last


def _alone(llm: LLM, params: SamplingParams) -> list[int]:
    llm.engine.add_request("alone", PROMPT_B, params)
    return list(_run(llm)["alone"].outputs[0].token_ids)


@pytest.fixture(scope="module")
def reference(llm: LLM) -> dict[str, list[int]]:
    return {"greedy": _alone(llm, _greedy_b()), "seeded": _alone(llm, _seeded_b())}


_special_floats = st.sampled_from([
    0.0, -0.0, 5e-324, 1e-320, 1e-300, 1e-45, 1e-40, 1.1754942e-38, 2.0**-126, 1e-30, 1e-5,
    0.5, 0.9999999, 1.0, 1.0000001, 2.0, 3.4028234e38, 3.5e38, 1e300, math.inf, -math.inf,
    math.nan, -1.0])
_floats = st.one_of(_special_floats, st.floats(), st.floats(0.0, 1.0), st.integers(-3, 3))
_special_ints = st.sampled_from([
    0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1,
    10**30, -(10**30)])
_ints = st.one_of(_special_ints, st.integers(-(2**70), 2**70), st.integers(-3, 5))
# Each example pushes 1-3 fields to extremes and keeps the others ordinary, so every check is
# reached (not only the first one `_validate` makes).
_ORDINARY = {
    "temperature": st.floats(0.0, 2.0), "top_p": st.floats(0.05, 1.0),
    "min_p": st.floats(0.0, 0.5), "top_k": st.none() | st.integers(-1, 100),
    "seed": st.none() | st.integers(0, 2**32), "n": st.integers(1, 2),
    "max_tokens": st.integers(1, 4), "logprobs": st.none() | st.integers(0, 5),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=2), "ignore_eos": st.booleans(),
}
_EXTREME = {
    "temperature": _floats, "top_p": _floats, "min_p": _floats, "top_k": _ints, "seed": _ints,
    "n": _ints, "max_tokens": st.none() | _ints, "logprobs": st.integers(-2, 25) | _ints,
    "stop_token_ids": st.lists(_ints, min_size=1, max_size=2),
}


@st.composite
def _params(draw: st.DrawFn) -> dict[str, Any]:
    extreme = draw(st.sets(st.sampled_from(sorted(_EXTREME)), min_size=1, max_size=3))
    return {k: draw(_EXTREME[k] if k in extreme else v) for k, v in _ORDINARY.items()}


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=_params(), b_seeded=st.booleans())
def test_fuzzed_params_never_disturb_the_request_beside_them(
        llm: LLM, reference: dict[str, list[int]], kwargs: dict[str, Any],
        b_seeded: bool) -> None:
    try:
        params = SamplingParams(**kwargs)
        llm.engine.add_request("a", PROMPT_A, params)
    except InvalidRequestError as e:
        event(f"rejected: {e.param}")
        assert e.param is not None and e.param in str(e)
        assert not llm.engine.has_unfinished_requests()
        return
    event("ran")
    llm.engine.add_request("b", PROMPT_B, _seeded_b() if b_seeded else _greedy_b())
    outs = _run(llm)
    assert list(outs["b"].outputs[0].token_ids) == reference["seeded" if b_seeded else "greedy"]
    assert outs["b"].outputs[0].finish_reason == "length"
    for c in outs["a"].outputs:
        assert c.finish_reason in ("stop", "length"), (kwargs, c)
        assert all(0 <= t < llm.engine.model_config.vocab_size for t in c.token_ids)


def test_a_request_whose_sampling_raises_fails_alone(
        llm: LLM, reference: dict[str, list[int]]) -> None:
    """Sampling corrupted after validation (a top_k no sampler accepts): that request ends
    with "error", its sibling is aborted, and the greedy and seeded requests beside it in the
    same steps get exactly their own tokens."""
    bad = SamplingParams(temperature=0.8, n=2, max_tokens=6, ignore_eos=True)
    llm.engine.add_request("bad", PROMPT_A, bad)
    llm.engine.add_request("greedy", PROMPT_B, _greedy_b())
    llm.engine.add_request("seeded", PROMPT_B, _seeded_b())
    bad.top_k = "boom"  # type: ignore[assignment]
    outs = _run(llm)
    assert list(outs["greedy"].outputs[0].token_ids) == reference["greedy"]
    assert list(outs["seeded"].outputs[0].token_ids) == reference["seeded"]
    reasons = sorted(c.finish_reason for c in outs["bad"].outputs)
    assert reasons == ["abort", "error"] and outs["bad"].finished
    error = next(c for c in outs["bad"].outputs if c.finish_reason == "error")
    assert "'bad'" in str(error.stop_reason) and "TypeError" in str(error.stop_reason)
    assert _alone(llm, _greedy_b()) == reference["greedy"]  # the engine keeps serving


def test_async_engine_fails_only_the_request_the_engine_failed(
        llm: LLM, reference: dict[str, list[int]]) -> None:
    async def main() -> tuple[list[int], BaseException]:
        front = AsyncEngine(llm.engine, max_num_seqs=8)
        front.start()
        bad = SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True)
        s_bad, s_good = await front.add_requests([NewRequest("bad", PROMPT_A, bad),
                                                  NewRequest("good", PROMPT_B, _greedy_b())])
        await front.call(lambda _engine: setattr(bad, "top_k", "boom"))
        with pytest.raises(EngineStepError) as e:
            async for _ in s_bad:
                pass
        last = None
        async for out in s_good:
            last = out
        assert front.num_step_failures == 0 and front.is_alive()
        await front.shutdown()
        assert last is not None and last.finished
        return list(last.outputs[0].token_ids), e.value

    tokens, error = asyncio.run(main())
    assert tokens == reference["greedy"]
    assert "'bad'" in str(error) and "TypeError" in str(error)
