"""The fused decode step (kvwise/model/fused_decode.py) against LlamaModel.forward's per-op path.

Both run the same kernels in the same order, so the claim is exact: identical greedy tokens and
bit-identical logits at every step, alone and in a batch of decode rows. (Logits, not logprobs:
the sampler's log-softmax reduction follows torch's thread count, which the fused path sets.)
"""

from __future__ import annotations

import pytest
import torch

from kvwise import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
           "Photosynthesis converts"]


@pytest.fixture(scope="module", params=[("int4", "auto", "none"), ("int8", "auto", "none"),
                                        ("int4", "float16", "none"), ("int4", "auto", "int8"),
                                        ("int4", "int8", "none")],
                ids=lambda p: "-".join(p))
def llm(request):
    weight_dtype, kv_cache_dtype, activation_quant = request.param
    return LLM("smollm2-135m", weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype,
               activation_quant=activation_quant,
               lm_head_dtype="int4" if activation_quant == "int8" else None,  # an int4 a8 head
               max_model_len=256, kv_cache_memory="64MiB", threads=2,
               # every step in the small-step kernels, prefill included: a prompt prefilled
               # alone (<= 16 tokens) and in the batch (> 16 together) must take the same path
               # for the batch-invariance check below (bf16 GEMMs above 16 tokens round
               # differently, int8 activations apply to small steps only)
               max_num_batched_tokens=16)


def _run(llm: LLM, prompts: list[str]) -> tuple[list[list[int]], list[torch.Tensor]]:
    runner = llm.engine.runner
    logits: list[torch.Tensor] = []
    orig = runner.run

    def recording(inputs):
        out = orig(inputs)
        logits.append(out.clone())
        return out

    runner.run = recording
    try:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        del runner.run
    return [o.outputs[0].token_ids for o in outs], logits


def test_fused_step_equals_per_op_path(llm):
    model = llm.engine.model
    fused = model._fused
    assert fused is not None, "an int4/int8 CPU model must take the fused decode path"
    before = fused.num_steps
    tokens, logits = _run(llm, PROMPTS)
    tokens_alone, logits_alone = _run(llm, PROMPTS[:1])
    # every decode-only step: 11 alone, 10 in the batch (its prefill spans two steps)
    assert fused.num_steps - before >= 11 + 10
    model._fused = None
    try:
        ref_tokens, ref_logits = _run(llm, PROMPTS)
        ref_tokens_alone, ref_logits_alone = _run(llm, PROMPTS[:1])
    finally:
        model._fused = fused
    assert tokens == ref_tokens and tokens_alone == ref_tokens_alone
    assert tokens_alone[0] == tokens[0]
    assert len(logits) == len(ref_logits)
    for got, ref in zip(logits + logits_alone, ref_logits + ref_logits_alone):
        assert torch.equal(got, ref)


def test_torch_threads_restored_when_engine_goes_idle(llm):
    """Fused steps run torch on one thread; once nothing is left to run, the engine's count is
    back for the caller's own torch code."""
    _run(llm, PROMPTS[:2])
    assert torch.get_num_threads() == llm.engine.model.num_threads == 2


def test_two_engines_keep_their_own_thread_counts(llm):
    """torch's thread count is process-wide; each engine applies its own to its steps, so a
    second engine (one thread, fp32: no fused step) does not change the first one's."""
    other = LLM("smollm2-135m", threads=1, max_model_len=128, kv_cache_memory="16MiB")
    seen: list[tuple[str, int]] = []
    for name, engine in (("a", llm.engine), ("b", other.engine)):
        model = engine.model
        orig = model.head_step

        def recording(state, idx, _orig=orig, _name=name):
            seen.append((_name, torch.get_num_threads()))
            return _orig(state, idx)

        model.head_step = recording
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    try:
        for _ in range(2):
            other.generate(PROMPTS[:1], params, use_tqdm=False)
            llm.generate(PROMPTS[:1], params, use_tqdm=False)
    finally:
        del llm.engine.model.head_step
        del other.engine.model.head_step
    assert {n for n, t in seen if n == "b" and t != 1} == set()
    # engine a's per-op steps (its prompts' prefill) run on its own 2 threads
    assert [t for n, t in seen if n == "a"] and all(t == 2 for n, t in seen if n == "a")
