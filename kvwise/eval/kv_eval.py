"""KV-cache methods measured the way the field does (`kvwise eval kv`): prefill a context into
the cache, then teacher-force a continuation one token per step against it.

A setting is one point of the settings grid: a KV format (`--kv-cache-dtypes`) crossed with a
compression (`--kv-compressions`: `none`, `streaming:SINK:WINDOW`, `fastgen:T`), or a peer's cache
(kvwise.eval.kv_peers). Per setting, over every window:
- `ppl`: exp(mean NLL) of the continuation's next-token predictions; continuation token j is
  predicted from context + continuation[:j], with everything before it read from the cache (token
  0 by the prefill's last logit, token j > 0 by the decode step that feeds token j - 1);
- `greedy_agreement`: positions where the argmax equals the kvwise fp32-cache baseline's argmax
  at the same position (teacher-forced, so positions line up whatever was predicted before);
- `kept_fraction`, `final_kept_fraction`, `mean_kept_fraction`: KV entries the request keeps /
  entries a full cache would hold for the tokens it has seen (per (layer, KV head) group,
  averaged over groups), right after the prefill (its eviction applied), after the last
  prediction, and averaged over the continuation's predictions;
- `kv_bytes_ratio`: KV bytes the window holds right after its prefill / what an fp32 cache would
  hold for the same tokens. kvwise uses the engine's own accounting: planes held (whole blocks,
  a partly filled tail block counted whole) x `engine.kv_bytes_per_block`, plus the bytes the
  format holds beside its blocks (`KVStore.side_bytes` where a format has it: store-wide, and
  the window's pseudo-request is the only request in the engine);
- `seconds`: wall time of the setting over all windows (engine / model loading and a short
  warm-up window per engine excluded).

kvwise runs each window as a pseudo-request through the engine's runner and KV manager (like
kvwise.eval.perplexity): the prefill in chunks of `max_num_batched_tokens`, then one decode step
per continuation token, so the format's kernels read the stored (possibly int8) cache. After
every step it commits (the format's `seal` hook runs) and applies the compression exactly as the
engine's step does (`LLMEngine._compress`: evict, compact, copy rows), the policy resolved as the
engine resolves a request's (`LLMEngine._kv_policy`, with its refusals). Prefill chunks are
compressed too, as in the engine: a context longer than sink + window + block size is already
evicted down when its prefill ends (its own positions attended to the whole chunk).

Invariants:
- Windows are disjoint, evenly spaced and deterministic; every setting sees the same token ids.
- A pseudo-request matches no cached prefix and puts no chunk into the prefix tree
  (`commit_limit=0`); its blocks go back to the pool when the window ends, even on error.
- The baseline `kvwise/kv=float32` (no compression) is always measured, first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from kvwise.cache.kv_store import format_class
from kvwise.config import KV_COMPRESSIONS
from kvwise.errors import InvalidRequestError
from kvwise.eval.limits import check_fits
from kvwise.outputs import RequestMetrics
from kvwise.request import Request
from kvwise.sampling_params import SamplingParams
from kvwise.scheduler.plan import StepPlan
from kvwise.scheduler.scheduler import scheduled_request

BASELINE_DTYPE = "float32"
RESULT_KEYS = ("setting", "ppl", "greedy_agreement", "kept_fraction", "final_kept_fraction",
               "mean_kept_fraction", "kv_bytes_ratio", "seconds")
Window = tuple[list[int], list[int]]  # (context ids, continuation ids)


@dataclass(frozen=True)
class KVCompression:
    """One entry of the compression axis: `none`, `streaming:SINK:WINDOW` or `fastgen:T`."""

    name: str = "none"
    sink_tokens: int = 0
    window_tokens: Optional[int] = None
    recovery_threshold: Optional[float] = None  # fastgen

    @property
    def label(self) -> str:
        if self.name == "none":
            return "none"
        if self.name == "fastgen":
            return f"fastgen:{self.recovery_threshold:g}"
        return f"{self.name}:{self.sink_tokens}:{self.window_tokens}"


def parse_kv_compressions(spec: str) -> list[KVCompression]:
    """`none,streaming:4:128` -> [KVCompression("none"), KVCompression("streaming", 4, 128)]."""
    out = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, *args = entry.split(":")
        if name == "none" and not args:
            out.append(KVCompression())
        elif name == "streaming" and len(args) == 2 and all(a.isdigit() for a in args) \
                and int(args[1]) >= 1:
            out.append(KVCompression("streaming", int(args[0]), int(args[1])))
        elif name == "fastgen" and len(args) == 1 and _unit_float(args[0]) is not None:
            out.append(KVCompression("fastgen", recovery_threshold=_unit_float(args[0])))
        else:
            raise InvalidRequestError(
                f"kv_compressions: cannot parse {entry!r}; entries are `none`, "
                f"`streaming:SINK:WINDOW` (SINK >= 0, WINDOW >= 1) or `fastgen:T` (0 <= T <= 1; "
                f"known: {KV_COMPRESSIONS})", "kv_compressions")
    if not out:
        raise InvalidRequestError("kv_compressions: give at least one entry", "kv_compressions")
    return out


def _unit_float(text: str) -> Optional[float]:
    """`text` as a number in [0, 1], or None."""
    try:
        x = float(text)
    except ValueError:
        return None
    return x if 0.0 <= x <= 1.0 else None


@dataclass(frozen=True)
class KVSetting:
    kv_cache_dtype: str
    compression: KVCompression = KVCompression()

    @property
    def name(self) -> str:
        comp = "" if self.compression.name == "none" else f"/comp={self.compression.label}"
        return f"kvwise/kv={self.kv_cache_dtype}{comp}"


def kvwise_settings(kv_cache_dtypes: Sequence[str], compressions: Sequence[KVCompression]
                    ) -> list[KVSetting]:
    """The grid dtypes x compressions, baseline (float32, none) first, each setting once."""
    grid = [KVSetting(BASELINE_DTYPE)]
    grid += [KVSetting(d, c) for d in kv_cache_dtypes for c in compressions]
    return list(dict.fromkeys(grid))


def eval_windows(ids: list[int], context_len: int, continuation_len: int, num_windows: int
                 ) -> list[Window]:
    """`num_windows` disjoint windows of context + continuation tokens, evenly spaced from the
    start of `ids` to its end (one window: at the start)."""
    if context_len < 1 or continuation_len < 1 or num_windows < 1:
        raise InvalidRequestError("context_len, continuation_len and num_windows must be >= 1",
                                  "context_len")
    size = context_len + continuation_len
    if len(ids) < size * num_windows:
        raise InvalidRequestError(
            f"text has {len(ids)} tokens; {num_windows} windows of {size} need "
            f"{size * num_windows}", "num_windows")
    stride = (len(ids) - size) // (num_windows - 1) if num_windows > 1 else 0  # >= size
    return [(ids[o:o + context_len], ids[o + context_len:o + size])
            for o in (i * stride for i in range(num_windows))]


@dataclass(frozen=True)
class WindowScores:
    """One window under one setting."""

    nll: torch.Tensor  # [C] float64, NLL of each continuation token
    argmax: torch.Tensor  # [C] long, the setting's greedy prediction at each position
    mean_kept_fraction: float  # mean over the C predictions
    kv_bytes_ratio: float  # right after the prefill
    kept_fraction: float = 1.0  # right after the prefill
    final_kept_fraction: float = 1.0  # after the last prediction


def score_rows(logits: torch.Tensor, targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [C, V] predicting `targets` -> (NLL [C] float64, argmax [C] long)."""
    logp = torch.log_softmax(logits.double(), dim=-1)  # [C, V]
    nll = -logp.gather(1, torch.tensor(targets, dtype=torch.long)[:, None])[:, 0]  # [C]
    return nll, logits.argmax(dim=-1)


def greedy_agreement(argmax: Sequence[torch.Tensor], base: Sequence[torch.Tensor]) -> float:
    """Fraction of positions (all windows) where `argmax` equals `base`."""
    same = sum(int((a == b).sum()) for a, b in zip(argmax, base, strict=True))
    return same / sum(a.numel() for a in argmax)


@dataclass(frozen=True)
class KVEvalResult:
    setting: str
    ppl: float
    greedy_agreement: float
    kept_fraction: float
    final_kept_fraction: float
    mean_kept_fraction: float
    kv_bytes_ratio: float
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RESULT_KEYS}


def summarize(setting: str, windows: Sequence[WindowScores], base_argmax: Sequence[torch.Tensor],
              seconds: float) -> KVEvalResult:
    nll = torch.cat([w.nll for w in windows])  # [num_windows * C]
    n = len(windows)
    return KVEvalResult(setting, math.exp(nll.mean().item()),
                        greedy_agreement([w.argmax for w in windows], base_argmax),
                        sum(w.kept_fraction for w in windows) / n,
                        sum(w.final_kept_fraction for w in windows) / n,
                        sum(w.mean_kept_fraction for w in windows) / n,
                        sum(w.kv_bytes_ratio for w in windows) / n, seconds)


def teacher_forced(engine: Any, context: list[int], continuation: list[int],
                   compression: KVCompression, request_id: str) -> WindowScores:
    """Prefill `context` through the engine's runner, then feed `continuation[:-1]` one token
    per decode step; every prediction reads the KV of everything before it from the cache."""
    kv = engine.kv_manager
    s = kv.block_size
    n_cont = len(continuation)
    params = SamplingParams(max_tokens=n_cont, kv_compression=compression.name,
                            sink_tokens=compression.sink_tokens,
                            window_tokens=compression.window_tokens,
                            recovery_threshold=compression.recovery_threshold)
    # the engine's own resolution of a request's compression (and its refusals)
    req = Request(request_id, request_id, 0, list(context), params,
                  RequestMetrics(arrival_time=0.0), max_tokens=n_cont,
                  kv_policy=engine._kv_policy(params))
    fp32_token_bytes = format_class("float32").block_bytes(engine.model_config, s) / s
    rows: list[torch.Tensor] = []  # [1, V] each
    kept: list[float] = []
    groups = kv.num_planes if getattr(req.kv_policy, "per_head", False) else 1
    kv.start_request(request_id, [], num_groups=groups, commit_limit=0)
    try:
        budget = engine.config.max_num_batched_tokens
        while req.num_computed_tokens < req.num_tokens:  # the scheduler's prefill chunks
            last = _step(engine, req, min(budget, req.num_tokens - req.num_computed_tokens))
        rows.append(last)
        held = kv.num_planes_held(request_id) / kv.num_planes * engine.kv_bytes_per_block
        held += getattr(engine.kv_store, "side_bytes", 0)  # a format's storage beside blocks
        bytes_ratio = held / (fp32_token_bytes * len(context))
        kept.append(kept_fraction(kv, request_id, req.num_computed_tokens))
        after_prefill = kept[0]
        for token in continuation[:-1]:
            req.append_token(token)
            rows.append(_step(engine, req, 1))
            kept.append(kept_fraction(kv, request_id, req.num_computed_tokens))
    finally:
        kv.free(request_id)
    nll, argmax = score_rows(torch.cat(rows), continuation)
    return WindowScores(nll, argmax, sum(kept) / len(kept), bytes_ratio, after_prefill,
                        kept[-1])


def kept_fraction(kv: Any, request_id: str, num_tokens: int) -> float:
    """KV entries the request keeps over what the full cache would hold, averaged over its
    groups (one per (layer, KV head) under a per-head policy)."""
    n = kv.num_groups(request_id)
    return sum(kv.num_kept_tokens(request_id, g) for g in range(n)) / (n * num_tokens)


def _step(engine: Any, req: Request, n: int) -> torch.Tensor:
    """One engine step of `n` tokens of `req` -> logits [1, V] of its last token (empty [0, V]
    for a prefill chunk that does not reach the end of the known tokens)."""
    kv, rid = engine.kv_manager, req.request_id
    kv.allocate(rid, req.num_computed_tokens + n)
    sch = scheduled_request(kv, req, n)
    logits = engine.runner.run(engine.runner.prepare(StepPlan([sch]))).cpu()  # [R, V]
    req.num_computed_tokens += n
    kv.commit(rid, req.all_token_ids, req.num_computed_tokens)
    # the engine's own post-step compression (evict, compact, copy rows), not a copy of it
    engine._compress([req])
    return logits


def measure_kvwise(make_llm: Callable[[str], Any], text: str, context_len: int,
                   continuation_len: int, num_windows: int, settings: Sequence[KVSetting],
                   report: Optional[Callable[[KVEvalResult], None]] = None
                   ) -> tuple[list[KVEvalResult], list[Window], list[torch.Tensor]]:
    """-> one result per setting (in order), the windows, and the baseline's argmax per window
    (for peers' agreement). `make_llm(kv_cache_dtype)` builds an LLM; one is built per dtype
    and runs every compression of it. `settings[0]` must be the baseline. `report` gets each
    result as soon as it is measured (in measuring order: grouped by dtype)."""
    assert settings and settings[0] == KVSetting(BASELINE_DTYPE), settings
    windows: list[Window] = []
    base_argmax: list[torch.Tensor] = []
    results: dict[KVSetting, KVEvalResult] = {}
    for dtype in dict.fromkeys(st.kv_cache_dtype for st in settings):
        llm = make_llm(dtype)
        engine = llm.engine
        if not windows:
            ids = engine.tokenizer.encode(text, add_special_tokens=False)
            windows = eval_windows(ids, context_len, continuation_len, num_windows)
        total = context_len + continuation_len
        check_fits(engine, total, f"a window of {context_len} + {continuation_len} = {total} "
                   "tokens", "context_len")
        _warm_up(engine, windows[0])
        for st in (st for st in settings if st.kv_cache_dtype == dtype):
            t0 = time.perf_counter()
            scores = [teacher_forced(engine, ctx, cont, st.compression, f"kv-eval-{i}")
                      for i, (ctx, cont) in enumerate(windows)]
            seconds = time.perf_counter() - t0
            if not base_argmax:
                base_argmax = [w.argmax for w in scores]
            results[st] = summarize(st.name, scores, base_argmax, seconds)
            if report is not None:
                report(results[st])
        del llm, engine
    return [results[st] for st in settings], windows, base_argmax


def _warm_up(engine: Any, window: Window) -> None:
    """A short window through every step kind (a prefill chunk, decode steps) so that kernels
    compiled on first use (numba) are not timed as the first setting's seconds."""
    ctx, cont = window
    teacher_forced(engine, ctx[:2 * engine.config.block_size + 1], cont[:3], KVCompression(),
                   "kv-eval-warm-up")


def format_line(r: KVEvalResult, base_ppl: float) -> str:
    return (f"{r.setting:<40} ppl={r.ppl:.4f} ({r.ppl / base_ppl - 1:+.3%} vs "
            f"kvwise/kv={BASELINE_DTYPE}) greedy_agreement={r.greedy_agreement:.4f} "
            f"kept_fraction={r.kept_fraction:.4f} final_kept_fraction="
            f"{r.final_kept_fraction:.4f} kv_bytes_ratio={r.kv_bytes_ratio:.4f} "
            f"seconds={r.seconds:.1f}")
