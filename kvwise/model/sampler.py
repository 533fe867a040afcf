"""Token sampling: turns one step's logits into one token per row, plus optional logprobs.

Pipeline for a sampling row (temperature > 0), in this order:
  logits / temperature -> top-k -> top-p (nucleus, Holtzman et al. 2019, arXiv:1904.09751)
  -> min-p (Nguyen et al. 2024, arXiv:2407.01082) -> one draw from what is left.
A greedy row (temperature < `GREEDY_EPS`, i.e. 0) takes the argmax, ties broken by the lowest id.

Invariants:
- The caller's `logits` tensor is never modified.
- Filters set logits to -inf; they are value thresholds, so tied logits at a cut-off are kept or
  dropped together and the kept set never depends on sort order or on other rows. At least one
  token (the row's maximum) survives every filter.
- The draw is inverse-CDF sampling with one uniform u per row: the first token whose cumulative
  weight exceeds u * total. A filtered token has weight exactly 0, so it never adds to the CDF
  and can never be drawn.
- A row with a generator draws exactly one number per step from that generator and nothing
  from anywhere else, and all its arithmetic is row-wise: its token depends on its logits, its
  params and its generator state alone, not on batch composition or order.
- Whatever the floats in params (validated or not: a top_p of 0, a min_p above 1, NaN
  logits), no index leaves its range: a filter keeps at least one token, and a row with no
  finite weight to draw from raises ValueError instead of returning an out-of-vocabulary id.
- Drawing the uniforms is separable (`draw_uniforms`): the engine draws a step's numbers once and
  can re-run `sample` row by row with the same numbers, so isolating one failing row never
  changes another row's token or generator state.
- Logprobs and `sampled_logprob` are the model's raw distribution, log_softmax of the
  unmodified logits (not of the temperature-scaled or filtered ones). Ranks order tokens by
  (logit desc, id asc), so the greedy token has rank 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvwise.outputs import Logprob
from kvwise.sampling_params import SamplingParams

# Temperatures below this are treated as greedy: dividing by them would overflow fp32.
GREEDY_EPS = 1e-5
# top-p looks for the nucleus among this many best tokens, tier by tier, before it sorts the
# whole vocabulary: partial top-k selection is far cheaper than a full sort of V ~ 49k.
TOP_P_TIERS = (256, 4096)

_MASK64 = (1 << 64) - 1


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    # Per row: None unless params.logprobs is not None; then the sampled token plus the
    # top-`logprobs` tokens with ranks 1..k.
    logprobs: list[dict[int, Logprob] | None]
    # raw logprob of the sampled token (for cumulative_logprob); None for rows without logprobs
    sampled_logprob: list[float | None]


def make_generator(
    seed: int | None, index: int, device: str | torch.device
) -> torch.Generator | None:
    """A per-sequence generator, or None (= the global RNG) when `seed` is None.

    Sibling sequences of one request (n > 1, `index` = 0..n-1) get distinct streams from one
    seed: (seed, index) is mixed by SplitMix64 (Steele et al. 2014) into the generator's seed.
    """
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(_splitmix64((seed & _MASK64) ^ _splitmix64(index & _MASK64)))
    return gen


def draw_uniforms(
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    device: str | torch.device,
) -> torch.Tensor | None:
    """The step's random numbers [B]: one U[0, 1) per sampling row, from its generator (or the
    global RNG when None); greedy rows get 0 and draw nothing. None for an all-greedy batch."""
    sampled_rows = [i for i, p in enumerate(params) if p.temperature >= GREEDY_EPS]
    if not sampled_rows:
        return None
    u = torch.zeros(len(params), device=device)  # [B]
    u[torch.tensor(sampled_rows, device=device)] = _uniforms(
        [generators[i] for i in sampled_rows], torch.device(device))
    return u


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    uniforms: torch.Tensor | None = None,
) -> SamplerOutput:
    """Pick one token per row of `logits` [B, V] (fp32, any device).

    Row i uses `params[i]` and `generators[i]` (None = the global RNG), or, when `uniforms` [B]
    from `draw_uniforms` is given, its number `uniforms[i]` and no generator at all. An
    all-greedy batch is a single argmax with no per-row tensor work. Logprobs are log_softmax of
    the raw, unmodified logits (the model's distribution), whatever the sampling parameters.
    """
    assert logits.dim() == 2, f"logits must be [B, V], got {tuple(logits.shape)}"
    num_rows = logits.shape[0]
    assert len(params) == num_rows and len(generators) == num_rows
    logits = logits.float()  # no copy when already fp32

    sampled_rows = [i for i, p in enumerate(params) if p.temperature >= GREEDY_EPS]
    if not sampled_rows:
        token_ids = logits.argmax(dim=-1)  # [B]; torch returns the first maximal index
    elif len(sampled_rows) == num_rows:
        token_ids = _sample_rows(logits, params, generators, uniforms)  # [B]
    else:
        greedy_rows = [i for i, p in enumerate(params) if p.temperature < GREEDY_EPS]
        token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)  # [B]
        greedy_idx = torch.tensor(greedy_rows, device=logits.device)
        sampled_idx = torch.tensor(sampled_rows, device=logits.device)
        token_ids[greedy_idx] = logits[greedy_idx].argmax(dim=-1)
        token_ids[sampled_idx] = _sample_rows(
            logits[sampled_idx],
            [params[i] for i in sampled_rows],
            [generators[i] for i in sampled_rows],
            None if uniforms is None else uniforms[sampled_idx],
        )

    logprobs: list[dict[int, Logprob] | None] = [None] * num_rows
    sampled: list[float | None] = [None] * num_rows
    lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if lp_rows:  # a full-vocabulary logsumexp per row: only for rows that asked for logprobs
        rows = _select(logits, lp_rows)  # [R, V]
        row_ids = _select(token_ids, lp_rows)  # [R]
        log_norm = _logsumexp(rows)[:, 0]  # [R]
        sampled_lp = rows.gather(1, row_ids[:, None])[:, 0] - log_norm  # [R]
        counts = [int(params[i].logprobs or 0) for i in lp_rows]
        dicts = _collect_logprobs(rows, log_norm, row_ids, sampled_lp,
                                  list(range(len(lp_rows))), counts)
        for j, (i, d) in enumerate(zip(lp_rows, dicts)):
            logprobs[i] = d
            sampled[i] = float(sampled_lp[j])
    return SamplerOutput(token_ids.tolist(), logprobs, sampled)


def score_tokens(
    logits: torch.Tensor, token_ids: Sequence[int], count: int
) -> list[dict[int, Logprob]]:
    """Logprob and rank of `token_ids[i]` under row i of `logits` [N, V], plus the row's
    top-`count` tokens: the prompt logprobs of N positions (row i = the logits of the position
    before token i). Same numbers as `sample`'s logprobs: log_softmax of the raw logits, ranks
    by (logit desc, id asc)."""
    assert logits.dim() == 2 and logits.shape[0] == len(token_ids), (logits.shape, len(token_ids))
    logits = logits.float()  # no copy when already fp32
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=logits.device)  # [N]
    log_norm = _logsumexp(logits)[:, 0]  # [N]
    token_lp = logits.gather(1, ids[:, None])[:, 0] - log_norm  # [N]
    rows = list(range(len(token_ids)))
    return _collect_logprobs(logits, log_norm, ids, token_lp, rows, [count] * len(rows))


def _sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    uniforms: torch.Tensor | None,
) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then one draw per row (with `uniforms` [R] if given).
    Returns [R] long."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)  # [R]
    x = logits / temps[:, None]  # [R, V] fresh tensor; everything below edits it in place
    _apply_top_k(x, [p.top_k for p in params])
    _apply_top_p(x, [p.top_p for p in params])
    _apply_min_p(x, [p.min_p for p in params])
    u = _uniforms(generators, x.device) if uniforms is None else uniforms  # [R] in [0, 1)
    return _draw(x, u)


def _apply_top_k(x: torch.Tensor, top_ks: Sequence[int | None]) -> None:
    """Mask every logit below the k-th largest of its row."""
    rows = [i for i, k in enumerate(top_ks) if k is not None and k < x.shape[1]]
    if not rows:
        return
    sub = _select(x, rows)  # [R', V]
    ks = torch.tensor([top_ks[i] for i in rows], device=x.device).clamp_(min=1)  # [R']
    top_vals = sub.topk(int(ks.max()), dim=-1).values  # [R', kmax] descending
    _mask_below(x, rows, sub, top_vals.gather(1, (ks - 1)[:, None]))


def _apply_top_p(x: torch.Tensor, top_ps: Sequence[float]) -> None:
    """Keep the smallest set of most likely tokens whose probability mass is >= top_p.

    The cut becomes a logit threshold (the smallest kept logit), so ties at it stay together.
    The nucleus is sought among the best `TOP_P_TIERS[0]` tokens (a top-k, not a sort), then
    the next tier for rows whose nucleus is larger, and only then in the sorted vocabulary.
    """
    rows = [i for i, p in enumerate(top_ps) if p < 1.0]
    if not rows:
        return
    sub = _select(x, rows)  # [R', V]
    vocab = x.shape[1]
    ps = torch.tensor([top_ps[i] for i in rows], device=x.device)[:, None]  # [R', 1]
    thresh = torch.empty_like(ps)  # [R', 1]
    pending = torch.arange(len(rows), device=x.device)  # rows of sub still without a cut
    log_norm: torch.Tensor | None = None  # [R', 1]
    for num_cand in [min(c, vocab) for c in TOP_P_TIERS if c < vocab] + [vocab]:
        part = sub if pending.shape[0] == sub.shape[0] else sub[pending]  # [P, V]
        if num_cand < vocab:
            cand = part.topk(num_cand, dim=-1).values  # [P, C] descending
        else:
            cand = part.sort(dim=-1, descending=True).values  # [P, V]
        if log_norm is None:
            log_norm = _row_log_norm(part, cand)
        cut, found = _nucleus_threshold(cand, log_norm[pending], ps[pending])
        if num_cand == vocab:
            found = torch.ones_like(found)
        thresh[pending[found]] = cut[found]
        pending = pending[~found]
        if pending.shape[0] == 0:
            break
    _mask_below(x, rows, sub, thresh)


def _row_log_norm(x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row of x [R, V] -> [R, 1]; from its top candidates `cand` [R, C]
    when everything outside them is -inf (e.g. after top-k), else from the whole row."""
    log_norm = _logsumexp(cand)  # [R, 1]
    partial = torch.nonzero(cand[:, -1] > -math.inf)[:, 0]  # rows with mass beyond cand
    if partial.shape[0] > 0:
        log_norm[partial] = _logsumexp(x[partial])
    return log_norm


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, keepdim; rows must hold a finite value. [R, C] -> [R, 1]"""
    row_max = x.amax(dim=-1, keepdim=True)  # [R, 1]
    return (x - row_max).exp_().sum(dim=-1, keepdim=True).log_() + row_max


def _nucleus_threshold(
    sorted_x: torch.Tensor, log_norm: torch.Tensor, ps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest kept logit [R, 1] of each row's nucleus within `sorted_x` [R, C], and whether
    the nucleus ends inside those C tokens [R] bool."""
    probs = torch.exp(sorted_x - log_norm)  # [R, C] true probabilities (whole-row normaliser)
    mass_before = probs.cumsum(dim=-1) - probs  # [R, C] mass strictly before each token
    keep = mass_before < ps  # [R, C]; column 0 is kept (mass 0 < top_p) when top_p > 0
    # >= 1 even for a top_p of 0 in fp32 (or NaN probabilities): the row's maximum survives
    num_keep = keep.sum(dim=-1, keepdim=True).clamp_(min=1)  # [R, 1]
    found = (num_keep < sorted_x.shape[1])[:, 0] | (mass_before[:, -1] + probs[:, -1] >= ps[:, 0])
    return sorted_x.gather(1, num_keep - 1), found


def _apply_min_p(x: torch.Tensor, min_ps: Sequence[float]) -> None:
    """Mask tokens with p < min_p * p_max, i.e. logit < max_logit + log(min_p).

    p / p_max is unchanged by renormalisation after earlier filters, so no softmax is needed.
    """
    rows = [i for i, m in enumerate(min_ps) if m > 0.0]
    if not rows:
        return
    sub = _select(x, rows)  # [R', V]
    # min_p above 1 would mask the maximum too: cap at 1 (keep only the maximum and its ties)
    log_min_p = torch.tensor([min(math.log(min_ps[i]), 0.0) for i in rows],
                             device=x.device)[:, None]  # [R', 1]
    _mask_below(x, rows, sub, sub.amax(dim=-1, keepdim=True) + log_min_p)


def _draw(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from softmax(x) per row [R, V] (x is consumed) with the uniforms u [R].
    Returns [R] long; raises ValueError for a row with no finite weight (NaN or all -inf)."""
    weights = x.sub_(x.amax(dim=-1, keepdim=True)).exp_()  # [R, V]; filtered tokens are 0
    cdf = weights.cumsum_(dim=-1)  # [R, V] non-decreasing; flat across zero-weight tokens
    total = cdf[:, -1:]  # [R, 1]
    # Keep the target strictly below the total despite rounding, so a token always exceeds it.
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    # First index with cdf > target: its weight is cdf[i] - cdf[i-1] > 0, never a masked token.
    token_ids = torch.searchsorted(cdf, target, right=True)[:, 0]  # [R]
    if int(token_ids.max()) >= x.shape[1]:  # only when a total is NaN or 0: nothing to draw
        bad = torch.nonzero(token_ids >= x.shape[1])[:, 0].tolist()
        raise ValueError(f"sampler: row(s) {bad} have no finite logit to sample from")
    return token_ids


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) per row [R]: from the row's generator, or from the global RNG if None."""
    u = torch.empty(len(generators), device=device)  # [R]
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        u[torch.tensor(unseeded, device=device)] = torch.rand(len(unseeded), device=device)
    for i, gen in enumerate(generators):
        if gen is not None:
            u[i] = torch.rand((), generator=gen, device=device)
    return u


def _select(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] ([R', V] copy), or x itself when rows are all of them."""
    if len(rows) == x.shape[0]:
        return x
    return x[torch.tensor(rows, device=x.device)]


def _mask_below(x: torch.Tensor, rows: list[int], sub: torch.Tensor, thresh: torch.Tensor) -> None:
    """Set x[rows] to -inf where sub (= x[rows]) < thresh [R', 1]."""
    if sub is x:
        x.masked_fill_(x < thresh, -math.inf)
    else:
        x[torch.tensor(rows, device=x.device)] = sub.masked_fill(sub < thresh, -math.inf)


def _collect_logprobs(
    logits: torch.Tensor,
    log_norm: torch.Tensor,
    token_ids: torch.Tensor,
    sampled_lp: torch.Tensor,
    rows: list[int],
    counts: list[int],
) -> list[dict[int, Logprob]]:
    """Sampled token plus the top-`count` tokens of each row, ranked by (logit desc, id asc).

    Full-vocabulary work is one top-k; the sampled token's rank needs a pass over its row only
    when it is not among the top tokens already listed.
    """
    sub = _select(logits, rows)  # [R, V] raw logits
    idx = torch.tensor(rows, device=logits.device)
    norm = log_norm[idx][:, None]  # [R, 1]
    chosen_ids = token_ids[idx].tolist()  # [R]
    chosen_lps = sampled_lp[idx].tolist()  # [R]
    kmax = min(max(counts) + 1, sub.shape[1])  # one extra to detect ties at the cut
    top_vals, top_ids = sub.topk(kmax, dim=-1)  # [R, kmax] descending

    out: list[dict[int, Logprob]] = []
    for r, count in enumerate(counts):
        tok = chosen_ids[r]
        top = _top_logprobs(sub[r], norm[r], top_vals[r], top_ids[r], max(count, 1))
        d = {t: lp for t, lp in top.items() if lp.rank <= count}
        if tok not in d:
            rank = top[tok].rank if tok in top else _rank(sub[r], tok)
            d[tok] = Logprob(logprob=chosen_lps[r], rank=rank)
        out.append(d)
    return out


def _top_logprobs(
    row: torch.Tensor, norm: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor, count: int
) -> dict[int, Logprob]:
    """First `count` tokens of one row [V] in (logit desc, id asc) order, from its sorted top
    `vals`/`ids` [kmax > count when possible]; rescans the row only on a tie at the cut."""
    if count < vals.shape[0] and bool(vals[count - 1] == vals[count]):
        ids = torch.nonzero(row >= vals[count - 1])[:, 0]  # all candidates, ids ascending
        vals = row[ids]
    else:
        vals, ids = vals[:count], ids[:count]
        by_id = torch.argsort(ids)
        vals, ids = vals[by_id], ids[by_id]
    order = torch.sort(vals, descending=True, stable=True).indices[:count]  # ties keep id order
    pairs = zip(ids[order].tolist(), (vals[order] - norm).tolist())
    return {t: Logprob(logprob=lp, rank=k + 1) for k, (t, lp) in enumerate(pairs)}


def _rank(row: torch.Tensor, token_id: int) -> int:
    """1-based position of `token_id` in row [V] ordered by (logit desc, id asc)."""
    value = row[token_id]
    num_greater = int((row > value).sum())
    num_tied_before = int((row[:token_id] == value).sum())
    return num_greater + num_tied_before + 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
