"""The paged backend against the float64 reference over random block tables (GQA, chunks)."""

from __future__ import annotations

import random

import pytest
import torch

from kvwise.attention.backend import AttentionMetadata, PrefillSpan
from kvwise.attention.paged import PagedBackend
from kvwise.attention.reference import ReferenceBackend
from kvwise.cache.kv_store import available_formats, make_kv_store
from tests.unit.attention.kv_views import layer_kv

S, K, H, D = 4, 3, 9, 16


def _meta(spans: list[tuple[int, int]], num_blocks: int, rng: random.Random):
    """spans: (num_prior, num_query) per request, decodes (num_query == 1) first."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, ctx_lens, slots, prefills = [], [], [], []
    num_decode, start = 0, 0
    for prior, nq in spans:
        ctx = prior + nq
        table = [free.pop() for _ in range((ctx + S - 1) // S)]
        tables.append(table)
        ctx_lens.append(ctx)
        slots += [table[p // S] * S + p % S for p in range(prior, ctx)]
        if nq == 1 and not prefills:
            num_decode += 1
        else:
            blocks = torch.tensor(table) if prior else None
            prefills.append(PrefillSpan(start, nq, ctx, blocks))
        start += nq
    dec = tables[:num_decode]
    nb = max((len(t) for t in dec), default=0)
    block_ids = mask = lens = None
    if num_decode:
        block_ids = torch.tensor([b for t in dec for b in t + [0] * (nb - len(t))])
        lens = torch.tensor(ctx_lens[:num_decode])
        mask = (torch.arange(nb * S)[None, :] < lens[:, None])[:, None, None, :]
    return AttentionMetadata(torch.tensor(slots), num_decode, block_ids, mask, lens, prefills, S,
                             tables, ctx_lens), start


@pytest.mark.parametrize("fmt", ["float32", "float16", "int8"])
@pytest.mark.parametrize("seed", range(6))
def test_paged_matches_reference(seed, fmt):
    """Both read the same stored rows through the format (int8: dequantized), so the fp32
    tolerance holds for every format."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    decodes = [(rng.randrange(0, 40), 1) for _ in range(rng.randrange(0, 5))]
    prefills = [(rng.choice([0, 0, 3, 8, 13]), rng.randrange(2, 20))
                for _ in range(rng.randrange(0, 3))]
    if not decodes and not prefills:
        decodes = [(5, 1)]
    meta, t = _meta(decodes + prefills, num_blocks=64, rng=rng)
    kv = layer_kv(torch.randn(64 * S, K, D), torch.randn(64 * S, K, D), S, fmt)
    q = torch.randn(t, H, D)
    k_new, v_new = kv.gather_rows(meta.slot_mapping)  # the step's rows, as stored
    ours = PagedBackend().forward(q, k_new, v_new, kv, meta, D ** -0.5)
    ref = ReferenceBackend().forward(q, None, None, kv, meta, D ** -0.5)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5, err


def test_unwritten_slots_holding_nan_do_not_leak():
    """Masked (unwritten) rows of a gathered block must not reach the output; the engine keeps
    them finite (KVStore zero-fills) — here we check the backend masks finite garbage exactly."""
    rng = random.Random(0)
    meta, t = _meta([(5, 1), (0, 6), (9, 3)], num_blocks=16, rng=rng)
    kv = layer_kv(torch.randn(16 * S, K, D), torch.randn(16 * S, K, D), S)
    k_cache, v_cache = kv.store.k[0], kv.store.v[0]
    q = torch.randn(t, H, D)
    base = PagedBackend().forward(q, None, None, kv, meta, 0.25)
    written = set(meta.slot_mapping.tolist())
    for table, ctx in zip(meta.block_tables, meta.context_lens):
        written |= {b * S + p for b in table for p in range(S) if b * S + p < b * S + S
                    and table.index(b) * S + p < ctx}
    junk = torch.tensor([r for r in range(16 * S) if r not in written])
    k_cache[junk] = 1e4
    v_cache[junk] = 1e4
    again = PagedBackend().forward(q, None, None, kv, meta, 0.25)
    assert torch.equal(base, again)


@pytest.mark.parametrize("fmt", available_formats())
def test_kv_store_starts_finite(fmt):
    from kvwise.model.config import ModelConfig

    cfg = ModelConfig("llama", 32, 8, 16, 2, 2, 1, 4)
    store = make_kv_store(fmt, cfg, 3, 4, torch.float32, torch.device("cpu"))
    for t in store.tensors().values():
        assert torch.isfinite(t.float()).all()


def _kvquant_store(num_blocks: int):
    """A one-layer nuq3-1% store (K KV heads, head dim D) with a calibration fitted here."""
    from types import SimpleNamespace

    from kvwise.cache.kvquant.calibration import LayerActivations, fit_calibration
    from kvwise.kv_names import parse_format_name
    from kvwise.model.rope import rope_tables

    g = torch.Generator().manual_seed(0)
    acts = LayerActivations(torch.randn(2, 32, K, D, generator=g) * 2,
                            torch.randn(2, 32, K, D, generator=g),
                            torch.rand(2, 32, K, D, generator=g),
                            torch.rand(2, 32, K, D, generator=g))
    ident = {"model": "t", "num_layers": 1, "num_kv_heads": K, "head_dim": D}
    cal = fit_calibration([acts], [parse_format_name("nuq3-1%")], seed=0,
                          model_identity=ident, source={})
    rope = rope_tables(D, 10000.0, None, 512, torch.float32, torch.device("cpu"))
    shape = SimpleNamespace(num_layers=1, num_kv_heads=K, head_dim=D)
    return make_kv_store("nuq3-1%", shape, num_blocks, S, torch.float32, torch.device("cpu"),
                         calibration=cal, sink_tokens=1, rope=rope, max_num_seqs=4)


@pytest.mark.parametrize("window", [1, 3, 16])
@pytest.mark.parametrize("seed", range(4))
def test_paged_prefill_over_kvquant_matches_reference(seed, window, monkeypatch):
    """Prefill spans over a KVQuant store (open tail: a query reads its own block as stored,
    earlier blocks sealed), starting mid-block after an earlier chunk whose full blocks were
    sealed, in query windows of 1, 3 and 16 blocks: the paged backend's masked SDPA windows
    give the float64 reference's per-token answer."""
    import kvwise.attention.paged as paged

    monkeypatch.setattr(paged, "_WINDOW", window)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    spans = [(rng.choice([0, 3, 8, 13, 21]), rng.randrange(2, 30)) for _ in range(3)]
    meta, t = _meta(spans, num_blocks=64, rng=rng)
    store = _kvquant_store(64)
    for (prior, _), table in zip(spans, meta.block_tables):  # the earlier chunk, committed
        if prior:
            slots = torch.tensor([table[p // S] * S + p % S for p in range(prior)])
            store.write(0, slots, torch.randn(prior, K, D), torch.randn(prior, K, D),
                        torch.arange(prior))
            store.seal(table[:prior // S])
    positions = torch.cat([torch.arange(p, p + n) for p, n in spans])
    k_new, v_new = store.write(0, meta.slot_mapping, torch.randn(t, K, D),
                               torch.randn(t, K, D), positions)  # the step's rows as stored
    kv = store.layer(0)
    q = torch.randn(t, H, D)
    ours = PagedBackend().forward(q, k_new, v_new, kv, meta, D ** -0.5)
    ref = ReferenceBackend().forward(q, k_new, v_new, kv, meta, D ** -0.5)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5, err


def _head_meta(num_blocks: int, rng: random.Random):
    """A decode step of 3 requests over layer 0 of a one-layer store: a dense one (one table)
    and two many-group ones whose K heads read their own tables and lengths."""
    from kvwise.attention.backend import HeadTables

    free = list(range(num_blocks))
    rng.shuffle(free)

    def table(n):
        return [free.pop() for _ in range((n + S - 1) // S)]

    dense_len = rng.randrange(1, 30)
    dense = table(dense_len)
    per_head = [[rng.randrange(1, 40) for _ in range(K)] for _ in range(2)]
    head_tables = [[table(n) for n in lens] for lens in per_head]
    rows = [None] + head_tables
    lens = [None] + per_head
    tables = [dense, [], []]
    ctx = [dense_len, max(per_head[0]), max(per_head[1])]
    flat_tabs = [dense] * K + head_tables[0] + head_tables[1]
    flat_lens = [dense_len] * K + per_head[0] + per_head[1]
    nb = (max(flat_lens) + S - 1) // S
    ids = [b for t in flat_tabs for b in t + [0] * (nb - len(t))]
    slot = [t[(n - 1) // S] * S + (n - 1) % S for t, n in zip(flat_tabs, flat_lens)]
    heads = HeadTables(K, torch.tensor(slot).view(1, 3, K), torch.tensor([ids]),
                       torch.tensor([flat_lens]), rows, lens)
    meta = AttentionMetadata(torch.tensor([slot[0], -1, -1]), 3, None, None, None, [], S,
                             tables, ctx, heads=heads)
    return meta.for_layer(0), flat_tabs, flat_lens


@pytest.mark.parametrize("fmt", ["float32", "float16", "int8"])
@pytest.mark.parametrize("seed", range(4))
def test_per_head_tables_read_each_heads_own_blocks(seed, fmt):
    """Per-head (many-group) decode rows: the CPU kernel, the PyTorch fallback and the
    reference each give, per KV head, attention over exactly that head's table and length
    (a brute-force softmax here), and a dense row in the same step its one table."""
    from kvwise.attention import cpu_decode
    from kvwise.attention.paged import decode_attention_heads

    rng = random.Random(seed)
    torch.manual_seed(seed)
    meta, flat_tabs, flat_lens = _head_meta(64, rng)
    kv = layer_kv(torch.randn(64 * S, K, D), torch.randn(64 * S, K, D), S, fmt)
    q = torch.randn(3, H, D)
    scale = D ** -0.5
    group = H // K
    want = torch.empty(3, H, D)
    for b in range(3):
        for h in range(K):
            t, n = flat_tabs[b * K + h], flat_lens[b * K + h]
            rows = torch.tensor([t[p // S] * S + p % S for p in range(n)])
            k, v = kv.gather_rows(rows)
            qs = q[b, h * group:(h + 1) * group].double()
            p = torch.softmax(qs @ k[:, h].double().T * scale, dim=-1)
            want[b, h * group:(h + 1) * group] = (p @ v[:, h].double()).float()
    got = {"kernel": cpu_decode.decode_attention(q, kv.kernel, meta.decode_block_ids,
                                                 meta.decode_context_lens, S, scale),
           "torch": decode_attention_heads(q, kv, meta.decode_block_ids,
                                           meta.decode_context_lens, S, scale),
           "paged": PagedBackend().forward(q, None, None, kv, meta, scale),
           "reference": ReferenceBackend().forward(q, None, None, kv, meta, scale)}
    for name, out in got.items():
        err = (out - want).abs().max().item()
        assert err <= 1e-5, (name, err)
