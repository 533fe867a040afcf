"""LLMEngine: owns the step loop schedule -> run -> sample -> update, request ids and abort.

Not thread-safe: one thread calls add_request / abort_request / step (the async front in
kvwise.engine.async_engine serializes calls onto its engine thread).

Invariants:
- A bad request raises InvalidRequestError in add_request and leaves the engine untouched.
- Every request that leaves the scheduler (finished, aborted) has its blocks freed at once.
- A user request with n > 1 becomes n sibling sequences "<id>#<i>" sharing one RequestMetrics.
- One request never fails another: if sampling or appending a token raises for one request,
  that request finishes with finish_reason "error" (the message in `stop_reason`), its siblings
  are aborted, and every other request in the step gets exactly the token it would have got
  (the step's random numbers are drawn once, before any row can fail). Only a failure outside
  the per-request part (the model forward) leaves `step()` as an exception.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from kvwise.attention import get_backend
from kvwise.cache.kv_manager import KVManager
from kvwise.cache.kv_store import KVStore, bytes_per_block
from kvwise.config import EngineConfig
from kvwise.engine.model_setup import build_model
from kvwise.engine.runner import ModelRunner
from kvwise.errors import ConfigError, InvalidRequestError
from kvwise.model.detokenizer import IncrementalDetokenizer, find_stop
from kvwise.model.sampler import SamplerOutput, draw_uniforms, make_generator, sample
from kvwise.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvwise.request import Request, RequestStatus
from kvwise.sampling_params import SamplingParams
from kvwise.scheduler.scheduler import Scheduler

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
logger = logging.getLogger(__name__)


@dataclass
class _Group:
    """One user request: its prompt and its n sibling sequences."""

    prompt: Optional[str]
    prompt_token_ids: list[int]
    children: list[Request]
    metrics: RequestMetrics


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but no CUDA device is available", "device")
        dtype = _DTYPES[config.dtype]
        self.model, self.tokenizer, self.model_config, self.model_source = build_model(
            config, dtype, self.device)
        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ConfigError(
                f"max_model_len: {self.max_model_len} exceeds the model's context length "
                f"{mc.max_position_embeddings}", "max_model_len")
        kv_dtype = _DTYPES[config.resolved_kv_cache_dtype]
        self.kv_bytes_per_block = bytes_per_block(mc, config.block_size, kv_dtype)
        num_blocks = config.num_blocks or config.kv_cache_bytes // self.kv_bytes_per_block
        if num_blocks < 1:
            raise ConfigError(
                f"kv_cache_memory: {config.kv_cache_memory} holds no block of "
                f"{self.kv_bytes_per_block} bytes", "kv_cache_memory")
        self.num_blocks = num_blocks
        self.kv_store = KVStore(mc, num_blocks, config.block_size, kv_dtype, self.device)
        self.kv_manager = KVManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.enable_chunked_prefill)
        try:
            backend = get_backend(config.attention_backend)
        except ValueError as e:
            raise ConfigError(str(e), "attention_backend") from None
        self.runner = ModelRunner(self.model, self.kv_store, backend, self.device)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self.groups: dict[str, _Group] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_steps = 0

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Union[str, list[int]],
                    params: SamplingParams, *, arrival_time: Optional[float] = None,
                    cache_salt: Optional[str] = None) -> None:
        if request_id in self.groups:
            raise InvalidRequestError(f"request_id: {request_id!r} is already in use",
                                      "request_id")
        params._validate()
        text, ids = self._tokenize_prompt(prompt)
        max_tokens = self._resolve_max_tokens(len(ids), params)
        metrics = RequestMetrics(arrival_time=arrival_time or time.monotonic())
        children = []
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(rid, request_id, i, ids, params, metrics, max_tokens,
                          generator=make_generator(params.seed, i, self.device),
                          cache_salt=cache_salt)
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, ids,
                                                     params.skip_special_tokens)
            children.append(req)
        self.groups[request_id] = _Group(text, ids, children, metrics)
        for req in children:
            self.scheduler.add(req)

    def _tokenize_prompt(self, prompt: Union[str, list[int]]) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt: must not be empty", "prompt")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt: must not be empty", "prompt")
        vocab = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise InvalidRequestError(
                    f"prompt: token id {t!r} is outside the vocabulary [0, {vocab})", "prompt")
        return None, ids

    def _resolve_max_tokens(self, num_prompt: int, params: SamplingParams) -> int:
        limit = self.max_model_len
        if num_prompt >= limit:
            raise InvalidRequestError(
                f"prompt: {num_prompt} tokens leave no room to generate; max_model_len is "
                f"{limit} tokens (prompt + max_tokens)", "prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - num_prompt
        if num_prompt + max_tokens > limit:
            raise InvalidRequestError(
                f"max_tokens: prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = "
                f"{num_prompt + max_tokens} exceeds max_model_len={limit}", "max_tokens")
        s = self.config.block_size
        need = (num_prompt + max_tokens + s - 1) // s
        if need > self.num_blocks:
            raise InvalidRequestError(
                f"max_tokens: prompt + max_tokens = {num_prompt + max_tokens} tokens need {need} "
                f"KV blocks but the pool has {self.num_blocks}; lower max_tokens or raise "
                f"--kv-cache-memory", "max_tokens")
        return max_tokens

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        now = time.monotonic()
        for rid in ids:
            group = self.groups.pop(rid, None)
            if group is None:
                continue
            for req in group.children:
                if not req.finished:
                    self.scheduler.remove(req)
                    req.status = RequestStatus.FINISHED
                    req.finish_reason = "abort"
            group.metrics.finished_time = now

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def num_unfinished_requests(self) -> int:
        return len(self.groups)

    # -- prefix cache -----------------------------------------------------------------------
    def pin_prefix(self, prompt: Union[str, list[int]], *, cache_salt: Optional[str] = None,
                   only_if_cached: bool = False) -> Optional[int]:
        """Pin the cached full chunks of `prompt` so they are never evicted; return the tokens
        pinned (whole blocks). Pins nest.

        With `only_if_cached`, pin nothing and return None unless every full chunk is cached:
        the caller then computes the prefix (e.g. a 1-token request) and calls again.
        """
        ids = self._prefix_ids(prompt)
        kv = self.kv_manager
        if only_if_cached:
            full = len(ids) // kv.block_size * kv.block_size
            if kv.cached_prefix_tokens(ids, cache_salt) < full:
                return None
        return kv.pin_prefix(ids, cache_salt)

    def unpin_prefix(self, prompt: Union[str, list[int]], *,
                     cache_salt: Optional[str] = None) -> int:
        """Undo one `pin_prefix` of `prompt`; return the tokens unpinned."""
        return self.kv_manager.unpin_prefix(self._prefix_ids(prompt), cache_salt)

    def _prefix_ids(self, prompt: Union[str, list[int]]) -> list[int]:
        if not self.config.enable_prefix_caching:
            raise InvalidRequestError(
                "prompt: prefix caching is off (--no-enable-prefix-caching); nothing to pin",
                "prompt")
        return self._tokenize_prompt(prompt)[1]

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._step()
        if not self.has_unfinished_requests():
            self.model.release_threads()  # idle: the caller gets torch's configured count back
        return outputs

    def _step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        now = time.monotonic()
        for sch in plan.scheduled:
            if sch.request.metrics.first_scheduled_time is None:
                sch.request.metrics.first_scheduled_time = now
        inputs = self.runner.prepare(plan)
        logits = self.runner.run(inputs)  # [R, V]
        for sch in plan.scheduled:
            req = sch.request
            req.num_computed_tokens += sch.num_new_tokens
            self.kv_manager.commit(req.request_id, req.all_token_ids, req.num_computed_tokens)
            if req.num_output_tokens == 0 and req.num_computed_tokens == req.num_tokens:
                self.prompt_tokens_total += req.num_prompt_tokens
        self.num_steps += 1
        if not inputs.sampling_rows:
            return []
        reqs = [plan.scheduled[i].request for i in inputs.sampling_rows]
        params, gens = [r.params for r in reqs], [r.generator for r in reqs]
        uniforms = draw_uniforms(params, gens, logits.device)  # once: a retry reuses them
        out: Optional[SamplerOutput] = None
        try:
            out = sample(logits, params, gens, uniforms)
        except Exception:  # some row cannot be sampled: sample row by row, fail only that one
            logger.warning("sampling %d rows failed; sampling them one by one", len(reqs),
                           exc_info=True)
        now = time.monotonic()
        touched: dict[str, _Group] = {}
        for j, req in enumerate(reqs):
            if req.finished:  # aborted in this loop because a sibling failed
                continue
            try:
                row = out if out is not None else _sample_row(logits, j, params, gens, uniforms)
                k = j if out is not None else 0
                self._append(req, row.token_ids[k], row.logprobs[k], row.sampled_logprob[k],
                             now)
            except Exception as e:
                self._fail_request(req, e)
            touched[req.parent_id] = self.groups[req.parent_id]
        return [self._output(pid, g, now) for pid, g in touched.items()]

    def _fail_request(self, req: Request, error: Exception) -> None:
        """Finish `req` with finish_reason "error" and abort its siblings (call from `except`)."""
        message = f"request {req.parent_id!r} failed in the engine step: {error!r}"
        logger.exception("%s; the other requests of the step go on", message)
        for child in self.groups[req.parent_id].children:
            if child.finished:
                continue
            self.scheduler.remove(child)
            child.status = RequestStatus.FINISHED
            child.finish_reason = "error" if child is req else "abort"
            child.stop_reason = message if child is req else None

    def _append(self, req: Request, token: int, logprobs: Any, token_logprob: Optional[float],
                now: float) -> None:
        req.append_token(token)
        self.generation_tokens_total += 1
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        if token_logprob is not None:  # the sampler scores only rows that asked for logprobs
            req.cumulative_logprob = (req.cumulative_logprob or 0.0) + token_logprob
        if req.logprobs is not None:
            req.logprobs.append(logprobs)
        delta = req.detokenizer.append(token)
        req.text = req.detokenizer.text
        p = req.params
        if token in self.eos_token_ids and not p.ignore_eos:
            req.finish_reason = "stop"
        elif token in p.stop_token_ids:
            req.finish_reason, req.stop_reason = "stop", token
        elif p.stop_list and (hit := find_stop(req.text, p.stop_list, len(delta),
                                               p.include_stop_str_in_output)):
            req.text = hit[0]
            req.finish_reason, req.stop_reason = "stop", p.stop_list[hit[1]]
        elif req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            req.finish_reason = "length"
        if req.finish_reason is not None:
            if req.stop_reason is None or isinstance(req.stop_reason, int):
                req.text += req.detokenizer.flush()  # text held back mid-character
            self.scheduler.remove(req)
            req.status = RequestStatus.FINISHED

    def _output(self, parent_id: str, group: _Group, now: float) -> RequestOutput:
        finished = all(c.finished for c in group.children)
        if finished:
            group.metrics.finished_time = now
            del self.groups[parent_id]
        outputs = [CompletionOutput(
            index=c.index, text=_visible_text(c), token_ids=list(c.output_token_ids),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            logprobs=list(c.logprobs) if c.logprobs is not None else None,
            cumulative_logprob=c.cumulative_logprob) for c in group.children]
        return RequestOutput(parent_id, group.prompt, group.prompt_token_ids, outputs,
                             finished, group.metrics)

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        kv = self.kv_manager.stats()
        return {
            **kv,
            "kv_bytes_per_block": self.kv_bytes_per_block,
            "kv_usage": kv["num_blocks_used"] / self.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "num_steps": self.num_steps,
        }

    def check_integrity(self) -> None:
        self.kv_manager.check_integrity()
        live = {r.request_id for r in self.scheduler.running}
        for req in self.scheduler.running:
            assert req.status == RequestStatus.RUNNING, req.request_id
            assert len(self.kv_manager.block_table(req.request_id)) * self.config.block_size \
                >= req.num_computed_tokens, req.request_id
        for req in self.scheduler.waiting:
            assert req.request_id not in live, req.request_id


def _sample_row(logits: torch.Tensor, j: int, params: list[SamplingParams],
                gens: list[Optional[torch.Generator]], uniforms: Optional[torch.Tensor]
                ) -> SamplerOutput:
    """Row j of the step sampled alone, with the step's own random number: the token is the one
    the batch would have given it (the sampler is row-wise), and no generator moves again."""
    u = None if uniforms is None else uniforms[j:j + 1]  # [1]
    return sample(logits[j:j + 1], [params[j]], [gens[j]], u)


def _visible_text(req: Request) -> str:
    """Text a stream may show: while a stop string could still complete, hold back its
    possible prefix so that cumulative text only ever grows."""
    if req.finished or not req.params.stop_list:
        return req.text
    hold = max(len(s) for s in req.params.stop_list) - 1
    return req.text[:len(req.text) - hold] if hold else req.text
