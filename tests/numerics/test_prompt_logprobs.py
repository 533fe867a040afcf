"""Prompt logprobs (SamplingParams.prompt_logprobs) against HF transformers on the same GGUF.

The engine (fp32 weights, 256-token steps) scores every prompt token after the first: the
log-softmax of the previous position's logits at that token, its rank, and the top-k
alternatives; HF's full forward is the reference (1e-3). One prompt is longer than a step, so
its positions come from two prefill chunks. Scoring must also leave a batch-mate's tokens alone
and must not take prefix hits (a hit would skip the cached positions' logits).
"""

from __future__ import annotations

import torch

from kvwise import SamplingParams
from tests.conftest import pydoc_text

TOL = 1e-3
TOP_K = 3


def _prompts(tok) -> list[list[int]]:
    long_ids = tok.encode(pydoc_text(), add_special_tokens=False)[:300]  # 256 + 44: two chunks
    return [tok.encode("The capital of France is Paris, and the capital of Italy is"),
            tok.encode("def fibonacci(n):\n    if n < 2:\n        return n"), long_ids]


def _hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()  # [P, V]
    return torch.log_softmax(logits.double(), dim=-1)  # [P, V]


def test_prompt_logprobs_match_hf(llm, hf_model):
    prompts = _prompts(llm.get_tokenizer())
    assert len(prompts[2]) > llm.engine.config.max_num_batched_tokens  # chunked prefill
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=TOP_K)
    outs = llm.generate(prompts, params, use_tqdm=False)
    worst = 0.0
    for ids, out in zip(prompts, outs):
        scored = out.prompt_logprobs
        assert scored is not None and len(scored) == len(ids) and scored[0] is None
        ref = _hf_logprobs(hf_model, ids)  # [P, V]
        targets = torch.tensor(ids[1:])
        ref_token = ref[:-1].gather(1, targets[:, None])[:, 0]  # [P-1]
        ref_top = ref[:-1].topk(TOP_K, dim=-1)  # [P-1, K]
        for i in range(1, len(ids)):
            entry = scored[i]
            assert entry is not None and ids[i] in entry, i
            worst = max(worst, abs(entry[ids[i]].logprob - float(ref_token[i - 1])))
            ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank <= TOP_K)
            assert [r for r, _, _ in ranked] == list(range(1, TOP_K + 1)), (i, entry)
            for k, (_, t, lp) in enumerate(ranked):
                worst = max(worst, abs(lp - float(ref_top.values[i - 1, k])))
                if k + 1 < TOP_K:  # the k-th alternative, unless it ties the next one in HF
                    gap = float(ref_top.values[i - 1, k] - ref_top.values[i - 1, k + 1])
                    assert t == int(ref_top.indices[i - 1, k]) or gap < 2 * TOL, (i, k)
            assert set(entry) <= {t for _, t, _ in ranked} | {ids[i]}, (i, entry)
            assert entry[ids[i]].decoded_token is not None
    print(f"max |prompt logprob - HF| over {sum(len(p) - 1 for p in prompts)} positions: "
          f"{worst:.2e}")
    assert worst <= TOL
    assert llm.stats()["num_blocks_used"] == 0


def test_prompt_logprobs_leave_a_batch_mate_alone_and_take_no_prefix_hit(llm):
    prompts = _prompts(llm.get_tokenizer())
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    scoring = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    # the plain runs cached every full chunk of the prompts: scoring them again takes no hit
    hits = llm.stats()["prefix_hit_tokens"]
    mixed = llm.generate(prompts, [plain, scoring, scoring], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone[0]  # the batch-mate's tokens are unchanged
    assert mixed[0].prompt_logprobs is None
    for i in (1, 2):  # and scoring changes nothing about the scorer's own tokens
        assert mixed[i].outputs[0].token_ids == alone[i], i
        assert mixed[i].prompt_logprobs is not None
        assert all(e is not None for e in mixed[i].prompt_logprobs[1:]), i
    s = llm.engine.config.block_size
    cached_hit = llm.stats()["prefix_hit_tokens"] - hits
    assert cached_hit == (len(prompts[0]) - 1) // s * s  # the plain request's hit only
    again = llm.generate(prompts[2:], scoring, use_tqdm=False)[0]
    assert llm.stats()["prefix_hit_tokens"] == hits + cached_hit
    assert again.prompt_logprobs is not None and mixed[2].prompt_logprobs is not None
    # alone its prompt is cut into other chunks than beside two others: rounding differs
    diff = 0.0
    for a, b in zip(again.prompt_logprobs[1:], mixed[2].prompt_logprobs[1:]):
        assert a is not None and b is not None and a.keys() == b.keys()
        diff = max(diff, *(abs(a[t].logprob - b[t].logprob) for t in a))
    print(f"max |prompt logprob alone - in a batch|: {diff:.2e}")
    assert diff <= TOL
    assert llm.stats()["num_blocks_used"] == 0
