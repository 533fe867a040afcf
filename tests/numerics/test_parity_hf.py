"""Our fp32 model against HF transformers on the same GGUF: logits, greedy tokens, perplexity."""

from __future__ import annotations

import math

import torch

from kvwise import SamplingParams
from kvwise.eval.perplexity import prompt_logits, token_chunks
from tests.conftest import pydoc_text

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Explain what a transformer neural network is.",
    "1, 2, 3, 5, 8, 13,",
    "The quick brown fox",
    "In Python, a list comprehension",
    "Water boils at",
]


def test_logits_match_hf_over_512_tokens(llm, hf_model):
    ids = llm.get_tokenizer().encode(pydoc_text(), add_special_tokens=False)[:512]
    ours = prompt_logits(llm.engine, ids)  # [512, V], prefilled in 256-token chunks
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0].float()  # [512, V]
    diff = (ours - ref).abs().max().item()
    print(f"max abs logit diff over 512 tokens: {diff:.2e}")
    assert diff <= 1e-3


def hf_greedy(model, ids: list[int], num_tokens: int) -> list[int]:
    """Plain greedy loop on the HF model with its own KV cache; EOS neither stops nor is masked."""
    out: list[int] = []
    with torch.inference_mode():
        res = model(torch.tensor([ids]), use_cache=True)
        for _ in range(num_tokens):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = model(torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def test_greedy_64_tokens_match_hf(llm, hf_model):
    tok = llm.get_tokenizer()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, tok.encode(prompt), 64), prompt


def test_perplexity_matches_hf(llm, hf_model):
    ids = llm.get_tokenizer().encode(pydoc_text(), add_special_tokens=False)
    chunks = token_chunks(ids, 512, 2)
    ours, ref = [], []
    for i, chunk in enumerate(chunks):
        logits = prompt_logits(llm.engine, chunk, f"ppl-{i}")
        with torch.inference_mode():
            hf = hf_model(torch.tensor([chunk])).logits[0]
        tgt = torch.tensor(chunk[1:])
        for store, lg in ((ours, logits), (ref, hf)):
            lp = torch.log_softmax(lg[:-1].double(), -1)
            store.append(-lp.gather(1, tgt[:, None]).mean().item())
    ppl_ours = math.exp(sum(ours) / len(ours))
    ppl_ref = math.exp(sum(ref) / len(ref))
    print(f"ppl ours={ppl_ours:.4f} hf={ppl_ref:.4f}")
    assert abs(ppl_ours / ppl_ref - 1) < 1e-3
    assert llm.stats()["num_blocks_used"] == 0
