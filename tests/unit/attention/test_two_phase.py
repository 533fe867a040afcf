"""Two-phase (ChunkAttention) backend against the float64 reference: shared prefixes ending at and
inside chunks, nested sharer groups, GQA 9/3, prefills mixed in, and the cached shared structure
across decode steps. Tolerance: max abs error <= 1e-5 in fp32."""

from __future__ import annotations

import random

import pytest
import torch

from kvwise.attention import get_backend, two_phase
from kvwise.attention.backend import AttentionMetadata, PrefillSpan
from kvwise.attention.reference import ReferenceBackend
from kvwise.attention.two_phase import (
    TwoPhaseBackend,
    attention_lse_math,
    merge_partials,
)
from tests.unit.attention.kv_views import layer_kv

K, H, D = 3, 9, 16
NUM_BLOCKS = 256
TOL = 1e-5


def _meta(rows: list[tuple[list[int], int, int]], s: int) -> tuple[AttentionMetadata, int]:
    """rows: (block table, context length, query tokens), decodes (1 query token) first."""
    ctx_lens, slots, prefills, tables = [], [], [], []
    num_decode = start = 0
    for table, ctx, nq in rows:
        assert len(table) == (ctx + s - 1) // s
        tables.append(table)
        ctx_lens.append(ctx)
        slots += [table[p // s] * s + p % s for p in range(ctx - nq, ctx)]
        if nq == 1 and not prefills:
            num_decode += 1
        else:
            blocks = torch.tensor(table) if ctx > nq else None
            prefills.append(PrefillSpan(start, nq, ctx, blocks))
        start += nq
    block_ids = mask = lens = None
    if num_decode:
        nb = max(len(t) for t in tables[:num_decode])
        block_ids = torch.tensor([b for t in tables[:num_decode] for b in t + [0] * (nb - len(t))])
        lens = torch.tensor(ctx_lens[:num_decode])
        mask = (torch.arange(nb * s)[None, :] < lens[:, None])[:, None, None, :]
    meta = AttentionMetadata(torch.tensor(slots), num_decode, block_ids, mask, lens, prefills, s,
                             tables, ctx_lens)
    return meta, start


def _shared_batch(rng: random.Random, s: int, num_decode: int) -> list[tuple[list[int], int, int]]:
    """Decode rows sharing a common prefix of whole chunks, then per-group prefixes (ending at a
    chunk end or inside a chunk, whose partial chunk is then private), then private tails."""
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    common = [free.pop() for _ in range(rng.choice([0, 1, 3]))]
    groups = []
    for _ in range(rng.randrange(1, 4)):
        prefix_len = rng.choice([0, 2, s, s + 1, 2 * s, 3 * s - 1, 4 * s])
        groups.append((prefix_len, [free.pop() for _ in range(prefix_len // s)]))
    rows = []
    for _ in range(num_decode):
        prefix_len, blocks = rng.choice(groups)
        shared = common + blocks
        ctx = len(common) * s + prefix_len + rng.choice([1, 2, s - 1, s, s + 3, 3 * s])
        table = shared + [free.pop() for _ in range((ctx + s - 1) // s - len(shared))]
        rows.append((table, ctx, 1))
    # prefill spans continuing the same prefixes (they go through the paged prefill path)
    for _ in range(rng.randrange(0, 3)):
        table0, _, _ = rng.choice(rows)
        nshared = rng.randrange(0, len(table0))
        nq = rng.randrange(2, 3 * s)
        ctx = nshared * s + nq
        table = table0[:nshared] + [free.pop() for _ in range((ctx + s - 1) // s - nshared)]
        rows.append((table, ctx, nq))
    return rows


def _check(backend, rows, s: int, seed: int, fmt: str = "float32") -> float:
    meta, t = _meta(rows, s)
    torch.manual_seed(seed)
    kv = layer_kv(torch.randn(NUM_BLOCKS * s, K, D), torch.randn(NUM_BLOCKS * s, K, D), s, fmt)
    q = torch.randn(t, H, D)
    meta.backend_data = backend.prepare(meta)
    ours = backend.forward(q, None, None, kv, meta, D ** -0.5)
    ref = ReferenceBackend().forward(q, None, None, kv, meta, D ** -0.5)
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("fmt", ["float32", "int8"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("s", [4, 16])
@pytest.mark.parametrize("seed", range(5))
def test_two_phase_matches_reference(seed, s, fused, fmt, monkeypatch):
    """int8: shared chunks are read once, as int8 codes dequantized, by all their sharers."""
    if not fused:
        monkeypatch.setattr(two_phase, "_FLASH_CPU", None)
    rng = random.Random(seed)
    rows = _shared_batch(rng, s, num_decode=rng.randrange(2, 12))
    err = _check(TwoPhaseBackend(), rows, s, seed, fmt)
    assert err <= TOL, err


def test_nested_sharer_groups_are_exact():
    """Rows 0-3 share blocks 10, 11; rows 0-1 also 12; rows 2-3 also 13 (a tree of prefixes);
    row 4 shares nothing; row 5 holds 10 only as its tail (tails are never shared)."""
    s = 4
    rows = [([10, 11, 12, 20], 15, 1), ([10, 11, 12, 21, 22], 17, 1), ([10, 11, 13, 23], 13, 1),
            ([10, 11, 13, 24], 16, 1), ([30, 31], 5, 1), ([10], 3, 1)]
    backend = TwoPhaseBackend()
    meta, _ = _meta(rows, s)
    plan = backend.prepare(meta)
    groups = {tuple(g.rows.tolist()) if g.rows is not None else "all": g.block_ids.tolist()
              for g in plan.groups}
    assert groups == {(0, 1, 2, 3): [10, 11], (0, 1): [12], (2, 3): [13]}
    private = plan.private_block_ids.view(6, -1).tolist()
    assert private == [[20, 0], [21, 22], [23, 0], [24, 0], [30, 31], [10, 0]]
    assert plan.private_mask[:, 0, 0].sum(-1).tolist() == [3, 5, 1, 4, 5, 3]
    assert _check(backend, rows, s, seed=0) <= TOL


def test_one_group_of_every_row_and_no_sharing():
    s = 16
    shared = list(range(8))
    rows = [(shared + [100 + i], 8 * s + 1 + i, 1) for i in range(4)]
    backend = TwoPhaseBackend()
    meta, _ = _meta(rows, s)
    plan = backend.prepare(meta)
    assert len(plan.groups) == 1 and plan.groups[0].rows is None
    assert _check(TwoPhaseBackend(), rows, s, seed=1) <= TOL
    distinct = [([10 * i + j for j in range(3)], 3 * s - i, 1) for i in range(4)]
    meta, _ = _meta(distinct, s)
    plan = backend.prepare(meta)
    assert plan.groups == [] and plan.private_block_ids is meta.decode_block_ids
    assert _check(TwoPhaseBackend(), distinct, s, seed=2) <= TOL


def test_structure_is_reused_across_decode_steps_and_rebuilt_on_batch_change():
    s = 4
    rng = random.Random(7)
    rows = _shared_batch(rng, s, num_decode=6)
    rows = [r for r in rows if r[2] == 1]
    used = {b for t, _, _ in rows for b in t}
    fresh = [b for b in range(NUM_BLOCKS) if b not in used]
    backend = TwoPhaseBackend()
    first = None
    for step in range(2 * s + 1):
        err = _check(backend, rows, s, seed=step)
        assert err <= TOL, (step, err)
        if first is None:
            first = backend._structure
        assert backend._structure is first, f"rebuilt at step {step} with only fresh blocks"
        grown = []
        for table, ctx, _ in rows:
            table = list(table)
            if ctx + 1 > len(table) * s:
                table.append(fresh.pop())
            grown.append((table, ctx + 1, 1))
        rows = grown
    _check(backend, rows[1:], s, seed=99)  # a request left: the batch changed
    assert backend._structure is not first


def test_merge_partials_equals_attention_over_the_union():
    torch.manual_seed(0)
    q = torch.randn(2, K, 3, D)
    k, v = torch.randn(2, K, 40, D), torch.randn(2, K, 40, D)
    whole, lse = attention_lse_math(q, k, v, None, 0.3)
    a = attention_lse_math(q, k[:, :, :13], v[:, :, :13], None, 0.3)
    b = attention_lse_math(q, k[:, :, 13:], v[:, :, 13:], None, 0.3)
    merged, merged_lse = merge_partials(*a, *b)
    assert (merged - whole).abs().max().item() <= TOL
    assert (merged_lse - lse).abs().max().item() <= TOL


def test_registered_by_name():
    assert isinstance(get_backend("two_phase"), TwoPhaseBackend)
