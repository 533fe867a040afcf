"""Quality of quantized weights (and of a narrower KV cache) against fp32 from the same
checkpoint: perplexity and greedy agreement (`kvwise eval quant`).

Perplexity runs each configuration through the engine's own cache path (eval/perplexity.py);
greedy agreement decodes the same prompts with fp32 and the quantized configuration and counts,
per prompt, the tokens produced before the first difference (a divergence makes the rest of a
continuation incomparable, so later coincidences are not counted).

Invariants:
- Prompts are disjoint slices of the dataset's tokens, taken from evenly spaced offsets, so the
  figures repeat for a given dataset, tokenizer and sizes.
- Every configuration sees identical token ids (no re-tokenization between engines).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvwise.errors import InvalidRequestError
from kvwise.eval.perplexity import perplexity
from kvwise.sampling_params import SamplingParams


@dataclass(frozen=True)
class QuantQuality:
    weight_dtype: str
    kv_cache_dtype: str  # "auto": the base's
    activation_quant: str  # "none" | "int8" (int4 weights only)
    ppl: float
    rel_ppl: float  # ppl / fp32 ppl - 1
    agreement: float  # tokens before the first divergence / all tokens


def agreement_prompts(ids: list[int], num_prompts: int, prompt_len: int) -> list[list[int]]:
    step = len(ids) // (num_prompts + 1)
    if step < prompt_len:
        raise InvalidRequestError(
            f"text too short for {num_prompts} prompts of {prompt_len} tokens", "num_prompts")
    return [ids[(i + 1) * step:(i + 1) * step + prompt_len] for i in range(num_prompts)]


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = 0
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if u != v:
                break
            same += 1
    return same / max(1, sum(len(x) for x in a))


def greedy(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def measure(make_llm: Any, text: str, weight_dtypes: list[str], context_len: int,
            num_chunks: int, num_prompts: int, prompt_len: int, max_tokens: int,
            kv_cache_dtypes: tuple[str, ...] = ("auto",),
            activation_quants: tuple[str, ...] = ("none",)) -> tuple[float, list[QuantQuality]]:
    """-> fp32 perplexity, one QuantQuality per (weight dtype, KV cache dtype, activation
    quant), the last crossed with int4 only. `make_llm(weight_dtype, kv_cache_dtype,
    activation_quant)` builds an LLM; the base is ("fp32", "auto", "none").

    Perplexity scores prompts, so it measures the kernels of prompt-sized steps; int8
    activations apply to steps of <= SMALL_BATCH_MAX tokens, which the caller reaches with
    max_num_batched_tokens <= 16 (the CLI says so)."""
    base = make_llm("fp32", "auto", "none")
    ids = base.get_tokenizer().encode(text, add_special_tokens=False)
    prompts = agreement_prompts(ids, num_prompts, prompt_len)
    base_ppl = perplexity(base.engine, text, context_len, num_chunks).ppl
    base_out = greedy(base, prompts, max_tokens)
    del base
    out = []
    for wd in weight_dtypes:
        for kv in kv_cache_dtypes:
            for aq in activation_quants:
                if aq != "none" and wd != "int4":
                    continue
                llm = make_llm(wd, kv, aq)
                ppl = perplexity(llm.engine, text, context_len, num_chunks).ppl
                agree = prefix_agreement(greedy(llm, prompts, max_tokens), base_out)
                out.append(QuantQuality(wd, kv, aq, ppl, ppl / base_ppl - 1, agree))
                del llm
    return base_ppl, out
