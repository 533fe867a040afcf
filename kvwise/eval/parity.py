"""Independent reference numbers from Hugging Face transformers on the same weights.

Used by `kvwise eval ppl --compare-hf` and the numerics tests. transformers is an optional
dependency (installed with the test extras), imported only here.

Invariants:
- The reference sees exactly the token ids kvwise saw; only the model computation differs.
"""

from __future__ import annotations

import math
import os

import torch

from kvwise.errors import KvwiseError


def load_hf_reference(source: str):
    """HF model for a GGUF file or HF directory (fp32), or raise with an install hint."""
    try:
        import transformers
    except ImportError as e:
        raise KvwiseError("--compare-hf needs transformers (pip install transformers "
                          "accelerate)") from e
    if source.endswith(".gguf"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(source), gguf_file=os.path.basename(source), dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_chunk_nll(model, chunk: list[int]) -> float:
    logits = model(torch.tensor([chunk])).logits[0, :-1].double()  # [C-1, V]
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(1, torch.tensor(chunk[1:])[:, None]).mean().item()


def hf_perplexity(model, chunks: list[list[int]]) -> tuple[float, list[float]]:
    nlls = [hf_chunk_nll(model, c) for c in chunks]
    return math.exp(sum(nlls) / len(nlls)), nlls
