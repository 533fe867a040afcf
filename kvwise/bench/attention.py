"""`kvwise bench attention`: decode attention kernel time per step, after ChunkAttention's Table 3.

One layer's decode attention for `--num-requests` requests (SmolLM2-135M shapes: 9 query heads,
3 KV heads, head dim 64, block 16, fp32) in two cases per length n:
- shared_<n>: all requests share an n-token prefix (whole chunks) + `--private-len` own tokens;
- distinct_<n>: the same context lengths with nothing shared.
Each backend (two_phase, paged, reference) runs on the same caches, block tables and queries,
for each KV format of `--kv-cache-dtypes` (the same rows stored as that format);
the metric is microseconds per call (one layer; a model step calls it once per layer).

Invariants:
- Every backend gets identical metadata, built as the runner builds it; a backend's `prepare`
  hook (two-phase's shared-chunk plan) runs once per configuration, outside the timed call,
  as the runner runs it once per step for all layers; its cost is reported in a note.
- Before timing, every backend's output is checked against the reference (max abs error noted).
- Blocks come from a shuffled pool (as after a server's churn), fixed by the seed.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

import torch

from kvwise.attention import AttentionMetadata, available_backends, get_backend
from kvwise.bench import report
from kvwise.cache.kv_store import LayerKV, available_formats, format_class, make_kv_store
from kvwise.cache.kvquant.calibration import Calibration
from kvwise.engine.kv_setup import shipped_calibration
from kvwise.kv_names import parse_format_name
from kvwise.model.rope import rope_tables

BENCH = "attention"
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16  # SmolLM2-135M
ROPE_THETA = 100000.0  # SmolLM2-135M's rope_theta (KVQuant stores rotate keys on read)
CALIBRATION_MODEL = "smollm2-135m"  # whose shipped KVQuant calibration the bench reads


@dataclass(frozen=True)
class Case:
    name: str  # e.g. "shared_2048"
    tables: list[list[int]]
    ctx_lens: list[int]


def _ints(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of integers, got {value!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {value!r}")
    return out


def _backends(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in available_backends()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {unknown}; choose from {', '.join(available_backends())}")
    return names


def _formats(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = []
    for n in names:
        try:
            format_class(n)
        except ValueError:
            unknown.append(n)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown KV format(s) {unknown}; choose from {', '.join(available_formats())} or a "
            "KVQuant name (nuq4|nuq3|nuq2|int4|int3|int2, optional -X% outliers)")
    return names


def layer_store(fmt: str, k_rows: torch.Tensor, v_rows: torch.Tensor,
                calibration: Optional[Calibration] = None,
                positions: Optional[torch.Tensor] = None) -> LayerKV:
    """Layer 0 of a one-layer `fmt` store holding these [N*S, K, D] rows (as the engine would
    have written them: rounded or quantized by the format). KVQuant formats take `calibration`
    (one layer, `kvquant_calibration`) and the rows' `positions` [N*S] (`row_positions`), and
    store keys before RoPE: the rows become pre-RoPE keys inside the calibrated channel ranges
    (see `kvquant_keys`)."""
    shape = SimpleNamespace(num_layers=1, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM)
    rows = torch.arange(k_rows.shape[0], device=k_rows.device)
    if parse_format_name(fmt) is None:
        store = make_kv_store(fmt, shape, k_rows.shape[0] // BLOCK_SIZE, BLOCK_SIZE,
                              torch.float32, k_rows.device)
        store.write(0, rows, k_rows, v_rows)
        return store.layer(0)
    if calibration is None or positions is None:
        raise ValueError(f"KV format {fmt!r} needs a calibration and the rows' positions")
    cos, sin = rope_tables(HEAD_DIM, ROPE_THETA, None, int(positions.max()) + 1, torch.float32,
                           k_rows.device)
    store = make_kv_store(fmt, shape, k_rows.shape[0] // BLOCK_SIZE, BLOCK_SIZE, torch.float32,
                          k_rows.device, calibration=calibration,
                          sink_tokens=calibration.sink_tokens, rope=(cos, sin))
    keys = kvquant_keys(k_rows, calibration, fmt)
    step = 256 * BLOCK_SIZE  # whole blocks per write, sealed (quantized) as the engine would
    for i in range(0, k_rows.shape[0], step):
        part = rows[i:i + step]
        store.write(0, part, keys[part], v_rows[part], positions[part])
        store.seal(torch.unique(part // BLOCK_SIZE).tolist())
    return store.layer(0)


def row_positions(cases: list[Case], num_blocks: int) -> torch.Tensor:
    """[N*S] long: each row's position in the first case whose tables hold its block (a block
    at table index j holds positions j*S ..), 0 for rows of no table. KVQuant keys are rotated
    at these positions on read, from RoPE table rows the requests share, as in the engine."""
    block_pos = [-1] * num_blocks
    for case in cases:
        for table in case.tables:
            for j, b in enumerate(table):
                if block_pos[b] < 0:
                    block_pos[b] = j * BLOCK_SIZE
    first = torch.tensor([max(p, 0) for p in block_pos], dtype=torch.long)
    return (first[:, None] + torch.arange(BLOCK_SIZE)).reshape(-1)


def kvquant_keys(k_rows: torch.Tensor, calibration: Calibration, fmt: str) -> torch.Tensor:
    """k_rows [N*S, K, D] ~ N(0, 1) -> pre-RoPE keys zero + scale * k / 2.5 per (KV head,
    channel) of the calibration's key ranges: about 1.2% of the elements fall outside a range
    (|k| > 2.5), near the outlier fraction of the -1% formats, as real keys do."""
    spec = parse_format_name(fmt)
    assert spec is not None, fmt
    t = calibration.layer_tables(spec)[0]
    return t.k_zero.float() + t.k_scale.float() * k_rows / 2.5


def kvquant_calibration(path: Optional[str], layer: Optional[int] = None) -> Calibration:
    """One layer (default: the middle one) of a KVQuant calibration file, as a one-layer
    calibration for the bench's one-layer stores; `path` None: the file shipped for the
    bundled model (SmolLM2-135M, whose shapes the bench uses)."""
    path = path or shipped_calibration(CALIBRATION_MODEL)
    if path is None:
        raise ValueError(f"no KVQuant calibration shipped for {CALIBRATION_MODEL}; pass "
                         "--kv-quant-calibration (make one with `kvwise calibrate`)")
    cal = Calibration.load(path)
    n = cal.model["num_layers"]
    i = n // 2 if layer is None else layer
    ranges = {pct: {name: [r[name][i]] for name in ("zero", "scale")}
              for pct, r in cal.key_ranges.items()}
    formats = {name: {key: [f[key][i]] for key in f} for name, f in cal.formats.items()}
    return Calibration(dict(cal.model, num_layers=1), cal.source, cal.sink_tokens, ranges,
                       formats, cal.path)


def add_attention_bench_parser(kinds: Any) -> None:
    p = kinds.add_parser("attention", help="decode attention kernel: two_phase vs paged vs "
                                           "reference with and without a shared prefix")
    p.add_argument("--num-requests", type=int, default=32, help="decode requests per step")
    p.add_argument("--shared-lens", type=_ints, default=[1024, 2048, 4096],
                   help="shared prefix lengths in tokens (comma list; multiples of 16)")
    p.add_argument("--private-len", type=int, default=64, help="own tokens per request")
    p.add_argument("--no-distinct", dest="distinct", action="store_false",
                   help="skip the no-sharing cases")
    p.add_argument("--backends", type=_backends, default=["two_phase", "paged", "reference"],
                   help="comma list of attention backends")
    p.add_argument("--runs", type=int, default=7, help="measured calls per configuration")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured calls before them")
    p.add_argument("--kv-cache-dtypes", type=_formats, default=["float32"],
                   help="comma list of KV formats the caches are stored in (each backend runs "
                        "on each; lines of a non-float32 format carry a -kv<format> suffix)")
    p.add_argument("--kv-quant-calibration", default=None,
                   help="KVQuant calibration file for KVQuant formats (its middle layer is "
                        f"used; default: the file shipped for {CALIBRATION_MODEL})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-md", default="BENCHMARKS.md",
                   help="markdown file whose section for this bench is replaced; none: skip")
    p.add_argument("--chart", default=None,
                   help="bar chart path (default docs/bench_attention.png); none: skip")
    p.set_defaults(func=run_attention_bench)


def build_cases(num_requests: int, shared_lens: list[int], private_len: int, distinct: bool,
                seed: int) -> tuple[list[Case], int]:
    """Block tables of every case over one shuffled pool; -> (cases, blocks needed)."""
    s = BLOCK_SIZE
    cases = []
    for n in shared_lens:
        assert n % s == 0, f"shared length {n} is not a multiple of the block size {s}"
        ctx = n + private_len
        own = (ctx + s - 1) // s - n // s
        shared = list(range(n // s))
        cases.append(Case(f"shared_{n}", [shared + [n // s + i * own + j for j in range(own)]
                                          for i in range(num_requests)], [ctx] * num_requests))
        if distinct:
            nb = (ctx + s - 1) // s
            cases.append(Case(f"distinct_{n}", [[i * nb + j for j in range(nb)]
                                                 for i in range(num_requests)],
                              [ctx] * num_requests))
    num_blocks = max(max(b for t in c.tables for b in t) for c in cases) + 1
    perm = list(range(num_blocks))
    random.Random(seed).shuffle(perm)
    cases = [Case(c.name, [[perm[b] for b in t] for t in c.tables], c.ctx_lens) for c in cases]
    return cases, num_blocks


def decode_metadata(tables: list[list[int]], ctx_lens: list[int],
                    device: torch.device) -> AttentionMetadata:
    """The decode-only metadata the runner builds for these block tables (1 query each)."""
    s = BLOCK_SIZE
    nb = (max(ctx_lens) + s - 1) // s
    padded = [b for t in tables for b in t[:nb] + [0] * (nb - len(t[:nb]))]
    lens = torch.tensor(ctx_lens, dtype=torch.long, device=device)  # [B]
    mask = (torch.arange(nb * s, device=device)[None, :] < lens[:, None])[:, None, None, :]
    slots = [t[(c - 1) // s] * s + (c - 1) % s for t, c in zip(tables, ctx_lens)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decode_tokens=len(tables),
        decode_block_ids=torch.tensor(padded, dtype=torch.long, device=device),
        decode_mask=mask, decode_context_lens=lens, prefills=[], block_size=s,
        block_tables=tables, context_lens=ctx_lens)


def _time_us(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def measure_case(case: Case, backends: list[str], stores: dict[str, LayerKV], runs: int,
                 warmup: int, seed: int) -> tuple[list[report.Result], list[str]]:
    """Time every backend on one case; -> results and notes (errors, prepare cost).

    The fast backends' calls are interleaved (run i of each, then run i + 1), so drifting load
    on a shared machine hits them alike; the reference is timed after them.
    """
    device = next(iter(stores.values())).store.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(len(case.tables), NUM_HEADS, HEAD_DIM, generator=gen).to(device)  # [B, H, D]
    scale = HEAD_DIM ** -0.5
    notes, calls, engines = [], [], []
    for fmt, kv in stores.items():
        meta0 = decode_metadata(case.tables, case.ctx_lens, device)
        expect = get_backend("reference").forward(q, None, None, kv, meta0, scale)
        suffix = "" if fmt == "float32" else f"-kv{fmt}"
        for name in backends:
            backend = get_backend(name)
            meta = decode_metadata(case.tables, case.ctx_lens, device)
            if getattr(backend, "prepare", None) is not None:
                if not suffix:
                    notes.append(_prepare_note(name, case, meta))
                meta.backend_data = backend.prepare(meta)
            out = backend.forward(q, None, None, kv, meta, scale)
            if name != "reference":
                err = (out - expect).abs().max().item()
                notes.append(f"{case.name}: {name}{suffix} max abs error vs reference on the "
                             f"same stored KV {err:.1e}")
            calls.append(functools.partial(backend.forward, q, None, None, kv, meta, scale))
            engines.append(name + suffix)
    values: list[list[float]] = [[] for _ in engines]
    # the reference (float64, large temporaries) runs on its own: interleaved, its allocations
    # slow down whichever call follows it
    groups = [[i for i, n in enumerate(engines) if not n.startswith("reference")],
              [i for i, n in enumerate(engines) if n.startswith("reference")]]
    for group in groups:
        for _ in range(warmup):
            for i in group:
                calls[i]()
        for _ in range(runs):
            for i in group:
                values[i].append(_time_us(calls[i]))
    results = [report.Result(BENCH, name, f"{case.name}_us", tuple(v))
               for name, v in zip(engines, values)]
    return results, notes


def _prepare_note(name: str, case: Case, meta: AttentionMetadata) -> str:
    """What the backend's per-step `prepare` hook costs: a fresh build (the batch changed) and a
    reuse (same batch, a later step)."""
    build = statistics.median(_time_us(lambda: get_backend(name).prepare(meta))
                              for _ in range(3))
    backend = get_backend(name)
    backend.prepare(meta)
    step = statistics.median(_time_us(lambda: backend.prepare(meta)) for _ in range(5))
    return (f"{case.name}: {name} prepare {build:.0f} us when the batch changes, {step:.0f} us "
            f"on later steps (once per step, for all layers)")


def speedup_lines(results: list[report.Result], fast: str, slow: str) -> list[str]:
    """`ratio <fast>/<slow> case=x ...` with x = slow median / fast median (> 1: fast wins)."""
    by = {(r.engine, r.metric): r.median for r in results}
    pairs = [(m.removesuffix("_us"), by[(slow, m)] / by[(fast, m)])
             for (e, m) in by if e == fast and (slow, m) in by]
    if not pairs:
        return []
    return [f"ratio {fast}/{slow} " + " ".join(f"{k}={v:.2f}" for k, v in pairs)]


def run_attention_bench(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.warmup < 0 or args.num_requests < 1 or args.private_len < 1:
        print("error: --runs, --num-requests, --private-len must be >= 1, --warmup >= 0",
              file=sys.stderr)
        return 2
    if any(n % BLOCK_SIZE for n in args.shared_lens):
        print(f"error: --shared-lens must be multiples of {BLOCK_SIZE}", file=sys.stderr)
        return 2
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cases, num_blocks = build_cases(args.num_requests, args.shared_lens, args.private_len,
                                    args.distinct, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    shape = (num_blocks * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_rows = torch.randn(shape, generator=gen)  # [N*S, K, D]
    v_rows = torch.randn(shape, generator=gen)  # [N*S, K, D]
    calibration = None
    if any(parse_format_name(f) is not None for f in args.kv_cache_dtypes):
        try:
            calibration = kvquant_calibration(args.kv_quant_calibration)
        except ValueError as e:  # CalibrationError included
            print(f"error: --kv-quant-calibration: {e}", file=sys.stderr)
            return 2
    positions = row_positions(cases, num_blocks)
    stores = {fmt: layer_store(fmt, k_rows, v_rows, calibration, positions)
              for fmt in args.kv_cache_dtypes}
    print(f"[bench] attention: {args.num_requests} requests, {threads} threads, "
          f"backends={','.join(args.backends)}, kv formats={','.join(args.kv_cache_dtypes)}",
          file=sys.stderr, flush=True)
    results: list[report.Result] = []
    notes: list[str] = []
    for case in cases:
        res, case_notes = measure_case(case, args.backends, stores, args.runs, args.warmup,
                                       args.seed)
        for r in res:
            print(r.line(), flush=True)
        results += res
        notes += case_notes
    lines = speedup_lines(results, "two_phase", "paged")
    for fmt in args.kv_cache_dtypes:
        if fmt != "float32" and "paged" in args.backends:
            lines += speedup_lines(results, f"paged-kv{fmt}", "paged")
    for line in lines:
        print(line, flush=True)
    for note in notes:
        print(f"[bench] {note}", file=sys.stderr, flush=True)
    _publish(args, results, threads, lines + notes)
    return 0


def _publish(args: argparse.Namespace, results: list[report.Result], threads: int,
             notes: list[str]) -> None:
    workload = (f"decode attention of one layer, {args.num_requests} requests, H=9 K=3 D=64 "
                f"S=16, fp32 math over KV stored as {','.join(args.kv_cache_dtypes)}; "
                f"shared_n: an n-token shared prefix + {args.private_len} own tokens each; "
                f"distinct_n: same lengths, nothing shared; microseconds per call")
    report.publish(BENCH, args, results,
                   title=f"kvwise bench attention: {args.num_requests} decode requests, one layer",
                   workload=workload, threads=threads, notes=notes, log_scale=True,
                   ylabel="microseconds per call (median, log scale)")
