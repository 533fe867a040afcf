"""Perplexity of a text through the engine's own cache path (paged KV, chunked prefill).

Each chunk of `context_len` tokens runs as one pseudo-request: its blocks come from the engine's
KV manager, its prompt is fed in pieces of `max_num_batched_tokens` exactly as the scheduler would
chunk it (later pieces attend to earlier ones through the paged cache), and the logits of every
position are kept. NLL is averaged over the chunk's `context_len - 1` next-token predictions.

Invariants:
- The pseudo-request's blocks are returned to the pool (and never inserted into the prefix cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvwise.errors import InvalidRequestError
from kvwise.outputs import RequestMetrics
from kvwise.request import Request
from kvwise.sampling_params import SamplingParams
from kvwise.scheduler.plan import ScheduledRequest, StepPlan


@dataclass
class PerplexityResult:
    chunk_nlls: list[float]  # mean NLL per chunk (nats/token)
    num_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(sum(self.chunk_nlls) / len(self.chunk_nlls))


def token_chunks(ids: list[int], context_len: int, num_chunks: int) -> list[list[int]]:
    need = context_len * num_chunks
    if context_len < 2 or num_chunks < 1:
        raise InvalidRequestError("context_len must be >= 2 and num_chunks >= 1", "context_len")
    if len(ids) < need:
        raise InvalidRequestError(
            f"text has {len(ids)} tokens; {num_chunks} chunks of {context_len} need {need}",
            "num_chunks")
    return [ids[i * context_len:(i + 1) * context_len] for i in range(num_chunks)]


def perplexity(engine, text: str, context_len: int, num_chunks: int) -> PerplexityResult:
    if context_len > engine.max_model_len:
        raise InvalidRequestError(
            f"context_len {context_len} exceeds max_model_len={engine.max_model_len}",
            "context_len")
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    nlls = [chunk_nll(engine, chunk, f"ppl-{i}")
            for i, chunk in enumerate(token_chunks(ids, context_len, num_chunks))]
    return PerplexityResult(nlls, context_len * num_chunks)


def chunk_nll(engine, chunk: list[int], request_id: str) -> float:
    """Mean next-token NLL of `chunk`, computed through the engine's runner and KV pool."""
    logits = prompt_logits(engine, chunk, request_id)  # [C, V]
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)  # [C-1, V]
    targets = torch.tensor(chunk[1:], dtype=torch.long)  # [C-1]
    return -logp.gather(1, targets[:, None]).mean().item()


def prompt_logits(engine, token_ids: list[int], request_id: str = "prompt-logits"
                  ) -> torch.Tensor:
    """Logits [T, V] (fp32, CPU) of every position of `token_ids`, prefilled in pieces of
    max_num_batched_tokens through the engine's runner and KV pool."""
    kv, runner = engine.kv_manager, engine.runner
    budget = engine.config.max_num_batched_tokens
    req = Request(request_id, request_id, 0, list(token_ids), SamplingParams(max_tokens=1),
                  RequestMetrics(arrival_time=0.0), max_tokens=1)
    pieces = []
    # no prefix matching (every position computed) and nothing shared (commit_limit=0); the
    # commits seal full blocks, as the engine's steps do (a KVQuant format quantizes them then)
    kv.start_request(request_id, [], commit_limit=0)
    try:
        while req.num_computed_tokens < req.num_tokens:
            n = min(budget, req.num_tokens - req.num_computed_tokens)
            kv.allocate(request_id, req.num_computed_tokens + n)
            plan = StepPlan([ScheduledRequest(req, n, kv.block_table(request_id))])
            inputs = runner.prepare(plan)
            inputs.logits_indices = torch.arange(n, device=engine.device)
            pieces.append(runner.run(inputs).cpu())  # [n, V]
            req.num_computed_tokens += n
            kv.commit(request_id, req.all_token_ids, req.num_computed_tokens)
    finally:
        kv.free(request_id)
    return torch.cat(pieces)
