"""LLMEngine: owns the step loop schedule -> run -> sample -> update, request ids and abort.

Not thread-safe: one thread calls add_request / abort_request / step (the async front in
kvwise.engine.async_engine serializes calls onto its engine thread).

Invariants:
- A bad request raises InvalidRequestError in add_request and leaves the engine untouched.
- Every request that leaves the scheduler (finished, aborted) has its blocks freed at once.
- A user request with n > 1 becomes n sibling sequences "<id>#<i>" sharing one RequestMetrics.
- Requests leave and enter between steps (`export_request` / `import_request`, plain data from
  kvwise.engine.transfer): an export removes the request and frees its blocks; a refused import
  raises TransferError and changes nothing; a HELD request is aborted, its blocks freed, at the
  first step (or export) after its lease deadline on `self.clock`.
- No process-wide RNG state: unseeded sampling draws from the engine's own generator (seeded
  from `config.seed`), so two engines in one process do not disturb each other.
- One request never fails another: if sampling or appending a token raises for one request,
  that request finishes with finish_reason "error" (the message in `stop_reason`), its siblings
  are aborted, and every other request in the step gets exactly the token it would have got
  (the step's random numbers are drawn once, before any row can fail). Only a failure outside
  the per-request part (the model forward) leaves `step()` as an exception.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from kvwise.attention import get_backend
from kvwise.cache.compress import CompressionPolicy, make_policy
from kvwise.cache.compress.fastgen import TokenClasses, token_classes
from kvwise.cache.kv_groups import plane_of_group
from kvwise.cache.kv_manager import KVManager
from kvwise.config import EngineConfig
from kvwise.engine import transfer
from kvwise.engine.fastgen import FastGenPolicy
from kvwise.engine.kv_setup import build_kv_store
from kvwise.engine.model_setup import build_model
from kvwise.engine.runner import ModelRunner, PromptSpan
from kvwise.engine.transfer import RequestExport
from kvwise.errors import ConfigError, InvalidRequestError, TransferError
from kvwise.model.detokenizer import IncrementalDetokenizer, find_stop
from kvwise.model.sampler import (
    SamplerOutput,
    draw_uniforms,
    make_generator,
    sample,
    score_tokens,
)
from kvwise.outputs import CompletionOutput, PromptLogprobs, RequestMetrics, RequestOutput
from kvwise.request import Request, RequestStatus
from kvwise.sampling_params import SamplingParams
from kvwise.scheduler.plan import ScheduledRequest
from kvwise.scheduler.scheduler import Scheduler

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_LEASE_S = 30.0  # how long a request held for send waits for its export
logger = logging.getLogger(__name__)


@dataclass
class _Group:
    """One user request: its prompt and its n sibling sequences."""

    prompt: Optional[str]
    prompt_token_ids: list[int]
    children: list[Request]
    metrics: RequestMetrics
    # SamplingParams.prompt_logprobs: one entry per prompt token, filled as its chunks run
    prompt_logprobs: Optional[PromptLogprobs] = None


class LLMEngine:
    def __init__(self, config: EngineConfig, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` times the leases of held requests (tests inject a fake one)."""
        self.config = config
        self.clock = clock
        # torch's thread count is process-wide: this engine keeps its own and the model applies
        # it to every step it runs (so a second engine in the process does not change it)
        self.num_threads = config.threads or torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but no CUDA device is available", "device")
        # Unseeded requests draw from this, not from torch's global RNG (which another engine
        # in the process, or the caller, would move); seeded ones have their own generator.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        dtype = _DTYPES[config.dtype]
        self.model, self.tokenizer, self.model_config, self.model_source = build_model(
            config, dtype, self.device)
        self.model.set_num_threads(self.num_threads)
        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ConfigError(
                f"max_model_len: {self.max_model_len} exceeds the model's context length "
                f"{mc.max_position_embeddings}", "max_model_len")
        self.kv_store, self.num_blocks, self.kv_bytes_per_block = build_kv_store(
            config, mc, self.model, dtype, self.device)
        store_planes = self.kv_store.num_layers * self.kv_store.num_kv_heads  # (layer, KV head)
        self.kv_manager = KVManager(self.num_blocks, config.block_size,
                                    config.enable_prefix_caching, on_seal=self.kv_store.seal,
                                    on_free=self.kv_store.release,
                                    num_planes=store_planes)
        self.scheduler = Scheduler(self.kv_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.enable_chunked_prefill)
        try:
            backend = get_backend(config.attention_backend)
        except ValueError as e:
            raise ConfigError(str(e), "attention_backend") from None
        self.model.set_batch_invariant(config.batch_invariant)
        self.runner = ModelRunner(self.model, self.kv_store, backend, self.device)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self.groups: dict[str, _Group] = {}
        self._classes: Optional[TokenClasses] = None  # FastGen's token classes, made on use
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_steps = 0
        self.num_expired_leases = 0

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Union[str, list[int]],
                    params: SamplingParams, *, arrival_time: Optional[float] = None,
                    cache_salt: Optional[str] = None, hold_after_prefill: bool = False,
                    lease_s: float = DEFAULT_LEASE_S) -> None:
        """Queue a request. With `hold_after_prefill` ("held for send", e.g. a prefill worker
        of disaggregated serving) it stops after its first sampled token and keeps its blocks
        until `export_request` takes it or `lease_s` seconds pass (then it is aborted); one that
        finishes with its first token (max_tokens=1, EOS) just finishes. This is
        an argument here, not a SamplingParams field: it says where the request decodes, not
        how its tokens are sampled, and the params travel with the export to the engine that
        decodes it, which must not hold it again."""
        if request_id in self.groups:
            raise InvalidRequestError(f"request_id: {request_id!r} is already in use",
                                      "request_id")
        params._validate()
        if hold_after_prefill:
            if params.n != 1:
                raise InvalidRequestError(
                    f"n: a request held for send has one sequence, got n={params.n}", "n")
            if not (isinstance(lease_s, (int, float)) and 0 < lease_s < float("inf")):
                raise InvalidRequestError(
                    f"lease_s: must be a positive number of seconds, got {lease_s!r}", "lease_s")
        policy = self._kv_policy(params)
        text, ids = self._tokenize_prompt(prompt)
        max_tokens = self._resolve_max_tokens(len(ids), params, policy)
        metrics = RequestMetrics(arrival_time=arrival_time or time.monotonic())
        children = []
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            gen = make_generator(params.seed, i, self.device)
            req = Request(rid, request_id, i, ids, params, metrics, max_tokens,
                          generator=self.generator if gen is None else gen,
                          cache_salt=cache_salt, hold_after_prefill=hold_after_prefill,
                          lease_s=lease_s if hold_after_prefill else None,
                          kv_policy=policy if i == 0 else self._kv_policy(params))  # own state
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, ids,
                                                     params.skip_special_tokens)
            children.append(req)
        scored = [None] * len(ids) if params.prompt_logprobs is not None else None
        self.groups[request_id] = _Group(text, ids, children, metrics, scored)
        for req in children:
            self.scheduler.add(req)

    def _kv_policy(self, params: SamplingParams) -> Optional[CompressionPolicy]:
        """The request's KV compression: its own settings, the engine's where it gives none."""
        cfg = self.config
        name = params.kv_compression or cfg.kv_compression
        sink = cfg.sink_tokens if params.sink_tokens is None else params.sink_tokens
        window = cfg.window_tokens if params.window_tokens is None else params.window_tokens
        if name == "streaming" and window is None:
            raise InvalidRequestError("window_tokens: is required with kv_compression="
                                      "streaming (per request or --window-tokens)",
                                      "window_tokens")
        if name != "none" and cfg.kvquant:
            raise InvalidRequestError(f"kv_compression: {name} cannot run with kv_cache_dtype="
                                      f"{cfg.kv_cache_dtype} yet (evicting rows of quantized "
                                      "blocks is not supported)", "kv_compression")
        if name == "fastgen":
            if cfg.batch_invariant:
                raise InvalidRequestError("kv_compression: fastgen cannot run with "
                                          "batch_invariant (per-head KV groups read through "
                                          "per-head tables)", "kv_compression")

            def pick(own: Optional[float], default: float) -> float:
                return default if own is None else own

            shape = self.kv_store
            return FastGenPolicy(
                pick(params.recovery_threshold, cfg.recovery_threshold),
                pick(params.fastgen_local_ratio, cfg.fastgen_local_ratio),
                pick(params.fastgen_frequent_ratio, cfg.fastgen_frequent_ratio),
                self._token_classes(), shape.num_layers, shape.num_kv_heads)
        return make_policy(name, sink, window, cfg.block_size)

    def _token_classes(self) -> TokenClasses:
        """FastGen's special and punctuation token ids, from the loaded tokenizer (once)."""
        if self._classes is None:
            tok = self.tokenizer
            self._classes = token_classes(tok.convert_ids_to_tokens(range(tok.vocab_size)),
                                          tok.all_special_ids)
        return self._classes

    def _compress(self, plan_requests: list[Request]) -> None:
        """Apply each compressed request's policy to the KV it kept after this step: evict,
        compact, and copy the kept rows in the store (kvwise.cache.compress). A compaction the
        pool cannot serve right now (kept rows to copy out of shared chunks) waits for a later
        step; until then the evicted rows stay attended to."""
        kv = self.kv_manager
        for req in plan_requests:
            policy = req.kv_policy
            if policy is None or req.finished:
                continue
            rid = req.request_id
            for g in range(kv.num_groups(rid)):
                kept = kv.num_kept_tokens(rid, g)
                slots = (policy.evict_group_slots(g, kept) if policy.per_head
                         else policy.evict_slots(kept))
                if slots is not None:
                    kv.evict(rid, g, slots)
                if kv.evicted_slots(rid, g) and kv.can_compact(rid, g):
                    copy = kv.compact(rid, g)
                    plane = None if copy.plane is None else plane_of_group(
                        copy.plane, self.kv_store.num_kv_heads)
                    self.kv_store.copy_rows(copy.src_rows, copy.dst_rows, plane)
                    compacted = getattr(policy, "on_compacted", None)
                    if compacted is not None:
                        compacted(g)

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

    def _resolve_max_tokens(self, num_prompt: int, params: SamplingParams,
                            policy: Optional[CompressionPolicy] = None) -> int:
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
        if policy is not None:  # it never holds more than its prompt and the policy's bound
            need = min(need, (num_prompt + s - 1) // s + policy.max_blocks())
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

    # -- requests leave and enter (kvwise.engine.transfer) ----------------------------------
    def export_request(self, request_id: str) -> RequestExport:
        """The request as plain data (tokens, counters, sampler and detokenizer state, the bytes
        of the KV blocks covering its computed tokens); it leaves this engine and its blocks are
        freed (shared prefix chunks stay cached). Any unfinished request of one sequence can
        leave between steps: held for send (the usual case), running, or waiting (then without
        KV). Raises TransferError, changing nothing, for an unknown or finished request or one
        with n > 1; a held request past its lease is aborted first, as a step would have."""
        req = self._exportable(request_id)
        num_blocks = -(-req.num_computed_tokens // self.config.block_size)
        table = self.kv_manager.block_table(request_id)[:num_blocks] if num_blocks else []
        export = transfer.snapshot_request(
            req, self.groups[request_id].prompt, kv_format=self._kv_format_name(),
            block_size=self.config.block_size, model=self._model_identity(),
            kv_blocks=self.kv_store.export_blocks(table) if table else {})
        del self.groups[request_id]
        self.scheduler.remove(req)
        req.status = RequestStatus.FINISHED
        return export

    def import_request(self, data: Union[RequestExport, bytes]) -> None:
        """Continue a request another engine exported (a RequestExport, or its
        `transfer.to_bytes`): its KV is written into fresh blocks (full ones join the prefix
        tree) and the next `step()` decodes it, producing the tokens it would have produced
        where it came from. Raises TransferError naming the field, changing nothing, when the
        data is malformed, comes from an engine with another KV format, block size or model,
        its id is in use, or it does not fit (max_model_len, free blocks, max_num_seqs)."""
        if isinstance(data, RequestExport):
            transfer.validate(data)
            export = data
        else:
            export = transfer.from_bytes(data)
        if self.config.kvquant:
            raise TransferError(f"kv_cache_dtype: importing into a {self.config.kv_cache_dtype} "
                                "KV cache is not supported yet", "kv_cache_dtype")
        transfer.check_compatible(export, kv_format=self._kv_format_name(),
                                  block_size=self.config.block_size,
                                  model=self._model_identity())
        self._check_import_fits(export)
        num_computed = export.num_computed_tokens
        if num_computed:
            transfer.check_block_tensors(export.kv_blocks,
                                         self._expected_block_tensors(export.num_blocks))
        req = transfer.restore_request(export, self.tokenizer, self.device, self.generator,
                                       RequestMetrics(arrival_time=time.monotonic()))
        rid = req.request_id
        if num_computed:
            if not self.scheduler.can_admit_imported():
                raise TransferError(f"max_num_seqs: {self.config.max_num_seqs} requests are "
                                    "running; import again later", "max_num_seqs")
            if not self.kv_manager.can_import(num_computed):
                raise TransferError(
                    f"num_blocks: {export.num_blocks} blocks needed, "
                    f"{self.kv_manager.num_available_blocks()} free or evictable; import "
                    "again later", "num_blocks")
            block_ids = self.kv_manager.import_request(rid, num_computed, req.cache_salt)
            try:
                self.kv_store.import_blocks(block_ids, export.kv_blocks)
            except ValueError as e:
                self.kv_manager.free(rid)
                raise TransferError(f"kv_blocks: {e}", "kv_blocks") from None
            self.kv_manager.commit(rid, req.all_token_ids, num_computed)
        self.groups[rid] = _Group(export.prompt, list(req.prompt_token_ids), [req], req.metrics)
        if num_computed:
            self.scheduler.admit_imported(req)
        else:
            self.scheduler.add(req)

    def _exportable(self, request_id: str) -> Request:
        group = self.groups.get(request_id)
        if group is None:
            raise TransferError(f"request_id: no unfinished request {request_id!r} here",
                                "request_id")
        if len(group.children) != 1:
            raise TransferError(f"request_id: {request_id!r} has {len(group.children)} "
                                "sequences; only a request with n == 1 can be exported",
                                "request_id")
        req = group.children[0]
        if req.params.prompt_logprobs is not None:
            raise TransferError(f"prompt_logprobs: {request_id!r} scores its prompt; its prompt "
                                "logprobs stay with this engine, so it cannot be exported",
                                "prompt_logprobs")
        if self.config.kvquant:
            raise TransferError(f"kv_cache_dtype: exporting a request stored as "
                                f"{self.config.kv_cache_dtype} is not supported yet",
                                "kv_cache_dtype")
        if req.kv_policy is not None:
            raise TransferError(f"kv_compression: {request_id!r} compresses its KV "
                                f"({req.kv_policy.name}); exporting a compressed request is "
                                "not supported yet", "kv_compression")
        if req.status == RequestStatus.HELD and req.lease_deadline is not None \
                and req.lease_deadline <= self.clock():
            self._expire(req)
            raise TransferError(f"lease: request {request_id!r} was held past its lease and "
                                "has been aborted", "lease")
        return req

    def _check_import_fits(self, export: RequestExport) -> None:
        rid = export.request_id
        if rid in self.groups:
            raise TransferError(f"request_id: {rid!r} is already in use", "request_id")
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in export.prompt_token_ids + export.output_token_ids):
            raise TransferError(f"token ids: outside the vocabulary [0, {vocab})", "token_ids")
        total = len(export.prompt_token_ids) + export.max_tokens
        if total > self.max_model_len:
            raise TransferError(f"max_model_len: prompt + max_tokens = {total} tokens, this "
                                f"engine's max_model_len is {self.max_model_len}",
                                "max_model_len")
        need = -(-total // self.config.block_size)
        if need > self.num_blocks:
            raise TransferError(f"num_blocks: the request may need {need} blocks, the pool has "
                                f"{self.num_blocks}", "num_blocks")

    def _expected_block_tensors(self, num_blocks: int
                                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Names, shapes and dtypes of what this store's `export_blocks` gives for `num_blocks`
        blocks, whatever the format: read off its export of one block and of two (block 0; its
        bytes do not matter), each dimension extrapolated linearly in the block count."""
        one = self.kv_store.export_blocks([0])
        two = self.kv_store.export_blocks([0, 0])
        return {name: (tuple(a + (num_blocks - 1) * (b - a)
                             for a, b in zip(t.shape, two[name].shape)), t.dtype)
                for name, t in one.items()}

    def _kv_format_name(self) -> str:
        """The KV format's name as exports carry it (the format registry's name)."""
        return self.kv_store.name

    def _model_identity(self) -> dict[str, Any]:
        return transfer.model_identity(self.model_source, self.model_config, self.config,
                                       self.model.weight_formats)

    def _tend_held(self) -> None:
        """Before each step: park requests held for send that have sampled their first token
        (their lease starts now) and abort held requests whose lease has passed."""
        sch = self.scheduler
        if not sch.held and not any(r.hold_after_prefill for r in sch.running):
            return
        now = self.clock()
        for req in [r for r in sch.running if r.hold_after_prefill and r.num_output_tokens]:
            sch.hold(req)
            assert req.lease_s is not None
            req.lease_deadline = now + req.lease_s
        for req in [r for r in sch.held.values() if r.lease_deadline <= now]:
            self._expire(req)

    def _expire(self, req: Request) -> None:
        self.abort_request(req.parent_id)
        self.num_expired_leases += 1

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
        self._tend_held()
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
        self._compress([sch.request for sch in plan.scheduled])
        self.num_steps += 1
        touched: dict[str, _Group] = {}
        if inputs.prompt_spans:
            num_sampling = len(inputs.sampling_rows)
            self._score_prompts(plan.scheduled, inputs.prompt_spans, logits[num_sampling:],
                                touched)
            logits = logits[:num_sampling]  # [R, V]
        if not inputs.sampling_rows:
            return [self._output(pid, g, time.monotonic()) for pid, g in touched.items()]
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

    def _score_prompts(self, scheduled: list[ScheduledRequest], spans: list[PromptSpan],
                       logits: torch.Tensor, touched: dict[str, _Group]) -> None:
        """Prompt logprobs from the spans' logits [Q, V] (span by span): position p's logits
        score prompt token p + 1. A request whose scoring raises fails alone (into `touched`)."""
        first_row = 0
        for span in spans:
            rows = logits[first_row:first_row + span.num_positions]  # [n, V]
            first_row += span.num_positions
            req = scheduled[span.row].request
            group = self.groups.get(req.parent_id)
            if req.finished or group is None or group.prompt_logprobs is None:
                continue
            p, n = span.first_position, span.num_positions
            try:
                entries = score_tokens(rows, req.prompt_token_ids[p + 1:p + 1 + n],
                                       req.params.prompt_logprobs or 0)
                for entry in entries:
                    for tid, lp in entry.items():
                        lp.decoded_token = self.tokenizer.decode([tid],
                                                                 skip_special_tokens=False)
                group.prompt_logprobs[p + 1:p + 1 + n] = entries  # a recompute overwrites
            except Exception as e:
                self._fail_request(req, e)
                touched[req.parent_id] = group

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
        scored = list(group.prompt_logprobs) if group.prompt_logprobs is not None else None
        return RequestOutput(parent_id, group.prompt, group.prompt_token_ids, outputs,
                             finished, group.metrics, scored)

    # -- introspection ----------------------------------------------------------------------
    def _kv_entries(self) -> tuple[int, int]:
        """(kept, full): (token, layer, KV head) KV entries the running requests hold, and what
        they would hold uncompressed."""
        kv = self.kv_manager
        planes = kv.num_planes
        kept = full = 0
        for req in self.scheduler.running:  # every step in the server: uncompressed ones cheap
            entries = req.num_computed_tokens * planes
            full += entries
            if req.kv_policy is None:
                kept += entries
                continue
            rid = req.request_id
            n = kv.num_groups(rid)
            kept += sum(kv.num_kept_tokens(rid, g) for g in range(n)) * (planes // n)
        return kept, full

    def stats(self) -> dict[str, Any]:
        kv = self.kv_manager.stats()
        kept, full = self._kv_entries()
        return {
            **kv,
            # KV entries of the running requests, kept vs uncompressed (compression's ratio)
            "kv_entries_kept": kept,
            "kv_entries_full": full,
            "kv_kept_ratio": kept / full if full else 1.0,
            "kv_bytes_per_block": self.kv_bytes_per_block,
            # bytes of KV held now: used blocks plus the format's side storage (KVQuant's fp16
            # open tails and sinks)
            "kv_bytes_used": kv["num_blocks_used"] * self.kv_bytes_per_block
            + self.kv_store.side_bytes,
            "kv_side_bytes": self.kv_store.side_bytes,
            "kv_usage": kv["num_blocks_used"] / self.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_held": len(self.scheduler.held),
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "num_steps": self.num_steps,
            # the formats the weights were built in (weight_dtype "auto" resolved at load time)
            "weight_dtype_resolved": self.model.weight_formats.projections,
            "lm_head_dtype_resolved": self.model.weight_formats.lm_head,
            "num_expired_leases": self.num_expired_leases,
        }

    def check_integrity(self) -> None:
        self.kv_manager.check_integrity()
        live = {r.request_id for r in self.scheduler.running}
        kv = self.kv_manager
        for req in self.scheduler.running:
            rid = req.request_id
            assert req.status == RequestStatus.RUNNING, rid
            for g, table in enumerate(kv.block_tables(rid)):
                assert len(table) * self.config.block_size >= kv.num_slots(rid, g), (rid, g)
        for req in self.scheduler.waiting:
            assert req.request_id not in live, req.request_id
        for rid, req in self.scheduler.held.items():
            assert req.request_id == rid and rid not in live, rid
            assert req.status == RequestStatus.HELD and req.lease_deadline is not None, rid
            assert req.num_output_tokens > 0 and rid in self.groups, rid
            assert len(self.kv_manager.block_table(rid)) * self.config.block_size \
                >= req.num_computed_tokens, rid


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
