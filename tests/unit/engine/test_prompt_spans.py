"""Runner bookkeeping of prompt logprobs: which positions get logits, in which order, per step.

A request with `prompt_logprobs` adds its chunk's prompt positions (all but the last prompt
position, which samples) after the step's sampling rows; any other request adds nothing.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvwise.engine.runner import ModelRunner, PromptSpan
from kvwise.errors import InvalidRequestError
from kvwise.model.sampler import score_tokens
from kvwise.outputs import RequestMetrics
from kvwise.request import Request
from kvwise.sampling_params import SamplingParams
from kvwise.scheduler.plan import ScheduledRequest, StepPlan
from kvwise.scheduler.scheduler import scores_prompt


def _runner() -> ModelRunner:
    kv = SimpleNamespace(block_size=4)
    model = SimpleNamespace(batch_invariant=False)
    return ModelRunner(model, kv, SimpleNamespace(), torch.device("cpu"))  # type: ignore[arg-type]


def _req(rid: str, num_prompt: int, computed: int, prompt_logprobs=None, index: int = 0):
    params = SamplingParams(max_tokens=4, prompt_logprobs=prompt_logprobs)
    req = Request(rid, rid, index, list(range(1, num_prompt + 1)), params,
                  RequestMetrics(arrival_time=0.0), 4)
    req.num_computed_tokens = computed
    return req


def _sch(req: Request, n: int) -> ScheduledRequest:
    return ScheduledRequest(req, n, list(range(8)))


def test_spans_follow_the_sampling_rows_chunk_by_chunk():
    runner = _runner()
    decode = _req("d", 5, 5)
    decode.append_token(9)  # computed 5 of 6 tokens: a decode row
    first = _req("p", 10, 0, prompt_logprobs=2)  # chunk 1 of 2: positions 0..5, no sampling
    inputs = runner.prepare(StepPlan([_sch(decode, 1), _sch(first, 6)]))
    assert inputs.sampling_rows == [0]
    assert inputs.prompt_spans == [PromptSpan(1, 0, 6)]
    assert inputs.logits_indices.tolist() == [0, 1, 2, 3, 4, 5, 6]
    last = _req("p", 10, 6, prompt_logprobs=2)  # chunk 2: positions 6..9, 9 samples
    plain = _req("q", 3, 0)  # a whole prompt without prompt logprobs: only its last token
    inputs = runner.prepare(StepPlan([_sch(last, 4), _sch(plain, 3)]))
    assert inputs.sampling_rows == [0, 1]
    assert inputs.prompt_spans == [PromptSpan(0, 6, 3)]
    assert inputs.logits_indices.tolist() == [3, 6, 0, 1, 2]


def test_only_the_first_sibling_scores_and_only_before_it_samples():
    assert scores_prompt(_req("a", 4, 0, prompt_logprobs=0))
    assert not scores_prompt(_req("a#1", 4, 0, prompt_logprobs=0, index=1))
    assert not scores_prompt(_req("b", 4, 0))
    done = _req("c", 4, 4, prompt_logprobs=0)
    done.append_token(7)  # preempted after sampling: a recompute needs no prompt logits
    assert not scores_prompt(done)
    runner = _runner()
    assert runner.prepare(StepPlan([_sch(done, 5)])).prompt_spans == []


def test_score_tokens_is_log_softmax_with_ranks_and_top_k():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 3.0, 0.0, 1.0]])  # [2, 4]
    entries = score_tokens(logits, [3, 1], 1)
    ref = torch.log_softmax(logits, dim=-1)
    assert set(entries[0]) == {1, 3} and entries[0][3].rank == 4 and entries[0][1].rank == 1
    assert abs(entries[0][3].logprob - float(ref[0, 3])) < 1e-6
    assert set(entries[1]) == {0, 1} and entries[1][1].rank == 2  # tie: the lower id ranks 1
    assert set(score_tokens(logits, [2, 2], 0)[0]) == {2}  # 0: the token only


@pytest.mark.parametrize("bad", [-1, 21, True, 1.0])
def test_prompt_logprobs_is_validated(bad):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(prompt_logprobs=bad)
    assert e.value.param == "prompt_logprobs"
