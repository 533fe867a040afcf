"""Turns a StepPlan into flat tensors, runs the model and returns logits of sampling rows
(and of the prompt positions of requests that score their prompt).

Invariants:
- Token layout follows plan order (decode rows first); `logits_indices` picks each sampling
  request's last token, in plan order, then the prompt positions of `prompt_spans`, in plan
  order: logits rows [0, R) sample, rows [R, R + Q) are the spans' positions, span by span.
- A request without prompt logprobs adds nothing to a step (no per-token work on the hot path).
- All per-step index tensors (slot rows, decode gather rows and mask) are built here once and
  shared by every layer; a backend with a `prepare(meta)` hook adds its own, once per step.
- A backend's optional `warm(store)` hook runs here, once, at engine start: kernels that depend
  on the store's format compile before the first step, never inside one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvwise.attention.backend import AttentionBackend, AttentionMetadata, HeadTables, PrefillSpan
from kvwise.cache.kv_store import KVStore
from kvwise.engine.fastgen import step_observer
from kvwise.model.llama import LlamaModel
from kvwise.scheduler.plan import StepPlan
from kvwise.scheduler.scheduler import scores_prompt


@dataclass
class PromptSpan:
    """Prompt positions [first_position, first_position + num_positions) of the request at plan
    position `row` whose logits this step returns: position p's logits score prompt token p + 1
    (the last prompt position samples instead, so it is never in a span)."""

    row: int
    first_position: int
    num_positions: int


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [R + Q] long
    sampling_rows: list[int]  # plan positions of the R sampling requests
    prompt_spans: list[PromptSpan]  # the Q prompt-logprob rows after them; usually empty


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVStore, backend: AttentionBackend,
                 device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.backend = backend
        self.device = device
        self.block_size = kv.block_size
        # optional per-step hook of backends that need more metadata (two-phase); None for paged
        self._prepare_backend = getattr(backend, "prepare", None)
        warm = getattr(backend, "warm", None)  # optional: compile the store's kernels now
        if warm is not None:
            warm(kv)

    def prepare(self, plan: StepPlan) -> StepInputs:
        s = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logits_idx: list[int] = []
        sampling_rows: list[int] = []
        prefills: list[PrefillSpan] = []
        spans: list[PromptSpan] = []
        span_starts: list[int] = []  # flat index of each span's first position
        tables: list[list[int]] = []
        ctx_lens: list[int] = []
        num_decode = 0
        row_lens: list[int] = []  # batch-invariant mode: each token's context length
        row_plan: list[int] = []  # and the plan row whose table it reads
        row_starts: list[int] = []  # flat index of each plan row's first token
        for row, sch in enumerate(plan.scheduled):
            req, n, table = sch.request, sch.num_new_tokens, sch.block_table
            start_pos = req.num_computed_tokens
            start = len(ids)
            row_starts.append(start)
            ids.extend(req.all_token_ids[start_pos:start_pos + n])
            pos.extend(range(start_pos, start_pos + n))  # true positions (RoPE)
            if sch.group_tables is not None:  # per-head tables: a decode row (HeadTables)
                assert n == 1 and not prefills and not self.model.batch_invariant, sch
                slots.append(-1)  # no one row for all heads: layers read meta.for_layer(i)
                tables.append([])
                ctx_lens.append(start_pos + 1)
                num_decode += 1
                if sch.samples:
                    logits_idx.append(len(ids) - 1)
                    sampling_rows.append(row)
                continue
            # table slots: positions shifted past what compression evicted (slot_offset)
            first = start_pos - sch.slot_offset
            ctx = first + n  # tokens the request attends to after this step
            slots.extend(table[j // s] * s + j % s for j in range(first, ctx))
            tables.append(table)
            ctx_lens.append(ctx)
            if self.model.batch_invariant:  # prefill rows as decode queries (row_* metadata)
                row_lens.extend(range(first + 1, ctx + 1))
                row_plan.extend([row] * n)
            if n == 1 and not prefills:
                num_decode += 1
            else:
                context_blocks = None
                if first > 0:
                    nb = (ctx + s - 1) // s
                    context_blocks = torch.tensor(table[:nb], dtype=torch.long, device=self.device)
                prefills.append(PrefillSpan(start, n, ctx, context_blocks))
            if sch.samples:
                logits_idx.append(len(ids) - 1)
                sampling_rows.append(row)
            if req.params.prompt_logprobs is not None and scores_prompt(req):  # rare: one test
                stop = min(start_pos + n, req.num_prompt_tokens - 1)  # P - 1 samples instead
                if stop > start_pos:
                    spans.append(PromptSpan(row, start_pos, stop - start_pos))
                    span_starts.append(start)
        for span, flat in zip(spans, span_starts):
            logits_idx.extend(range(flat, flat + span.num_positions))
        if spans and num_decode == len(ids) == len(logits_idx):
            # The fused decode step (every token a decode row, every token in logits_indices)
            # returns logits in token order: only right if that is logits_indices' order. It is:
            # plans put sampling single-token rows first, so they are flat [0, R) and the spans'
            # 1-token chunks follow in plan order.
            assert logits_idx == list(range(len(ids))), logits_idx
        dev = self.device
        decode_blocks = decode_mask = decode_lens = None
        if num_decode:
            lens = ctx_lens[:num_decode]
            nb = (max(lens) + s - 1) // s
            decode_blocks = torch.tensor(_padded(tables[:num_decode], nb), dtype=torch.long,
                                         device=dev)  # [Bd * nb]
            decode_lens = torch.tensor(lens, dtype=torch.long, device=dev)  # [Bd]
            decode_mask = torch.arange(nb * s, device=dev)[None, :] < decode_lens[:, None]
            decode_mask = decode_mask[:, None, None, :]  # [Bd, 1, 1, nb * S]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode_tokens=num_decode, decode_block_ids=decode_blocks, decode_mask=decode_mask,
            decode_context_lens=decode_lens, prefills=prefills, block_size=s,
            block_tables=tables, context_lens=ctx_lens)
        if row_plan and prefills:
            nb = (max(row_lens) + s - 1) // s
            meta.row_block_ids = torch.tensor(_padded([tables[r] for r in row_plan], nb),
                                              dtype=torch.long, device=dev)  # [T * nb]
            meta.row_context_lens = torch.tensor(row_lens, dtype=torch.long, device=dev)  # [T]
        if any(sch.group_tables is not None for sch in plan.scheduled):
            meta.heads = self._head_tables(plan, meta, num_decode)
        meta.observer = step_observer(plan, num_decode, row_starts)  # FastGen rows, else None
        if self._prepare_backend is not None:
            meta.backend_data = self._prepare_backend(meta)
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            meta=meta,
            logits_indices=torch.tensor(logits_idx, dtype=torch.long, device=dev),
            sampling_rows=sampling_rows, prompt_spans=spans)

    def _head_tables(self, plan: StepPlan, meta: AttentionMetadata, num_decode: int
                     ) -> HeadTables:
        """Per-(layer, KV head) rows and decode tables of a step with many-group rows (see
        kvwise.attention.backend): a dense row's slot and table repeated in every plane."""
        s, nl, kh = self.block_size, self.kv.num_layers, self.kv.num_kv_heads
        t = meta.slot_mapping.shape[0]
        slots = meta.slot_mapping[None, :, None].repeat(nl, 1, kh)  # [L, T, K]
        row_tables: list[Optional[list[list[int]]]] = []
        row_lens: list[Optional[list[int]]] = []
        for row, sch in enumerate(plan.scheduled):
            if sch.group_tables is None:
                row_tables.append(None)
                row_lens.append(None)
                continue
            p = sch.request.num_computed_tokens  # the row's one new token
            assert sch.group_offsets is not None and len(sch.group_tables) == nl * kh
            js = [p - off for off in sch.group_offsets]  # its slot in each group
            row_tables.append(sch.group_tables)
            row_lens.append([j + 1 for j in js])
            flat = [tb[j // s] * s + j % s for tb, j in zip(sch.group_tables, js)]
            slots[:, row, :] = torch.tensor(flat, dtype=torch.long).view(nl, kh)
        assert slots.shape[1] == t
        dec_ids = torch.zeros((nl, 0), dtype=torch.long)
        dec_lens = torch.zeros((nl, 0), dtype=torch.long)
        if num_decode:
            per_layer_tables, per_layer_lens = [], []
            for layer in range(nl):
                tabs, lens = [], []
                for row in range(num_decode):
                    for h in range(kh):
                        if row_tables[row] is None:
                            tabs.append(meta.block_tables[row])
                            lens.append(meta.context_lens[row])
                        else:
                            g = layer * kh + h
                            tabs.append(row_tables[row][g])
                            lens.append(row_lens[row][g])
                per_layer_tables.append(tabs)
                per_layer_lens.append(lens)
            nb = (max(max(x) for x in per_layer_lens) + s - 1) // s
            dec_ids = torch.tensor([_padded(tabs, nb) for tabs in per_layer_tables],
                                   dtype=torch.long)  # [L, Bd*K*nb]
            dec_lens = torch.tensor(per_layer_lens, dtype=torch.long)  # [L, Bd*K]
        dev = self.device
        return HeadTables(kh, slots.to(dev), dec_ids.to(dev), dec_lens.to(dev), row_tables,
                          row_lens)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """-> logits [R + Q, V] fp32: the sampling rows, then the prompt spans' positions."""
        return self.model(inputs.input_ids, inputs.positions, self.kv, inputs.meta,
                          self.backend, inputs.logits_indices)



def _padded(tables: list[list[int]], nb: int) -> list[int]:
    """The tables' first nb block ids each, padded with block 0 (masked out), concatenated."""
    return [b for t in tables for b in t[:nb] + [0] * (nb - len(t[:nb]))]
