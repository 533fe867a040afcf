"""FastGen, the pure core: which keys each KV head keeps (Ge et al., ICLR 2024, "Model Tells You
What to Discard", arXiv 2310.01801). Token classes from a vocabulary, base policies chosen by
name and their greedy hybrids, one-shot profiling of a layer on its prompt, and the decode-time
bookkeeping of one (request, layer, KV head) group. No K/V tensors live here.

Keep rule, one rule for both phases. It chooses among the keys of a `KeyView` (the prompt at
profiling; the kept keys plus the new token during decode); `length` is the number of tokens
seen (prompt length n0 at profiling, position + 1 during decode). Base policies:
- special: keys whose token is in `classes.special`;
- punct: keys whose token is in `classes.punct`;
- frequent: the ceil(r_f * length) keys with the highest mean attention among the keys not
  kept by the earlier components of the hybrid (as cold-compress does), ties to the lower
  position. Mean attention = cumulative attention / the number of queries that have seen the
  key (`counts`), not the cumulative sum the paper and H2O rank by: with the sum, a key's score
  grows with its age, so a prompt key profiled over 256 rows carries 256 rows of mass against
  one row for a new decode token, and frequent heads never admit a new token (on pydoc, 512
  context + 256 teacher-forced tokens at T=0.9: ppl +255% with the sum, +9.7% with the mean,
  at the same kept fraction);
- local: keys at positions >= length - window, window = ceil(r_l * n0), fixed at profiling;
- full: every key.
A hybrid "a+b+c" keeps the union of its components, applied left to right (frequent sees what
the components before it kept). CANDIDATES is the paper's greedy order (Sec. 3.2, Eq. 2).

Profiling (paper Eq. 1). The attention probabilities of the profiled query rows are computed in
chunks of rows and mean-pooled over the query heads of each KV head (GQA as in cold-compress;
the paper is MHA only). A row at prompt position i sees keys 0..i, over which its probabilities
sum to 1; its recovery under a keep mask is its mass on the kept keys among those it sees (a
kept key after i, e.g. the local window seen from an early row, adds nothing). A policy's
recovery is the mean over the profiled rows. A mask is over keys only, so that mean equals
(mask . scores) / rows, scores[j] being the summed mass of the profiled rows on key j: one
chunked pass yields `scores`, then each candidate costs a dot product. The first candidate
whose recovery >= threshold wins; the last one ("full") wins if none does, and always when
threshold >= 1 (a rounded sum of probabilities can reach 1 without every key).

Decode (`FastGenGroup.on_token`), per new token: its K/V is written and its own query attends
the kept keys and itself (the attention that produced it cannot be undone); the caller passes
that attention, mean-pooled over the group's query heads; it is added to the running scores
(the new token starts with its self-attention); the keep rule runs over the kept keys plus the
new token; every key it rejects is evicted after the step, the new token included when it is
not admitted. So special/punct heads admit only tokens of their classes, local heads slide
their window, frequent heads keep at most ceil(r_f * length) heavy hitters outside the
special/punct keys (lowest running score goes first), full heads never evict.

Invariants:
- A kept set is a fixed point of the keep rule: re-running the rule on it evicts nothing
  (`FastGenGroup.check_integrity`).
- Keys kept by special/punct components are never evicted; every other kept key is in the
  local window or among the ceil(r_f * length) heavy hitters, so a group keeps at most
  |special/punct keys| + ceil(r_f * length) + window keys.
- Evicted keys never come back: a group's positions only ever lose members, plus new tokens.
- Profiling computes in q's dtype promoted to at least float32 and holds O(chunk * n * H)
  probabilities at a time, never an n x n matrix per head.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional, Protocol

import torch

# byte-level BPE (GPT-2, Llama-3, SmolLM) writes whitespace byte b as chr(0x100 + b): "Ġ" for
# space, "Ċ" for newline, "ĉ" for tab...; SentencePiece (Llama-2) writes a space as "▁"
_SPACE_MARKERS = frozenset(chr(0x100 + b) for b in b"\t\n\v\f\r ") | {"\u2581"}


@dataclass(frozen=True)
class TokenClasses:
    special: frozenset[int]
    punct: frozenset[int]


def token_classes(vocab: Sequence[str], special_ids: Iterable[int]) -> TokenClasses:
    """`vocab[i]` is the text of token id i (a raw vocabulary piece or its decoded text).
    Punctuation: ids whose text, without whitespace and whitespace markers, is non-empty and
    made only of Unicode punctuation (category P*). Special: `special_ids`, as given."""
    punct = []
    for token_id, text in enumerate(vocab):
        core = [c for c in text if not c.isspace() and c not in _SPACE_MARKERS]
        if core and all(unicodedata.category(c).startswith("P") for c in core):
            punct.append(token_id)
    return TokenClasses(special=frozenset(special_ids), punct=frozenset(punct))


def budget(ratio: float, length: int) -> int:
    """ceil(ratio * length), forgiving float noise (0.1 * 30 is 3, not 4)."""
    return max(0, math.ceil(ratio * length - 1e-9))


@dataclass(frozen=True, eq=False)
class KeyView:
    """The keys a keep rule chooses among, in ascending position order (shapes: m keys)."""

    positions: torch.Tensor  # [m] int64, ascending
    token_ids: torch.Tensor  # [m] int64
    scores: torch.Tensor  # [m] float, cumulative attention
    counts: torch.Tensor  # [m] float, queries that have seen each key (>= 1)
    length: int  # tokens seen: n0 at profiling, position + 1 during decode
    window: int  # local window, ceil(r_l * n0)
    frequent_ratio: float
    classes: TokenClasses


class BasePolicy(Protocol):
    name: ClassVar[str]

    def keep(self, view: KeyView, kept: torch.Tensor) -> torch.Tensor:
        """[m] bool: the keys this component keeps; `kept` [m] bool is what the earlier
        components of the hybrid kept."""
        ...


BASE_POLICIES: dict[str, BasePolicy] = {}


def register_base_policy(cls: type[BasePolicy]) -> type[BasePolicy]:
    """Class decorator: make a base policy available by its `name` to hybrids."""
    BASE_POLICIES[cls.name] = cls()
    return cls


def _in_ids(token_ids: torch.Tensor, ids: frozenset[int]) -> torch.Tensor:
    table = torch.tensor(sorted(ids), dtype=torch.long, device=token_ids.device)
    return torch.isin(token_ids, table)


@register_base_policy
class Special:
    name = "special"

    def keep(self, view: KeyView, kept: torch.Tensor) -> torch.Tensor:
        return _in_ids(view.token_ids, view.classes.special)


@register_base_policy
class Punct:
    name = "punct"

    def keep(self, view: KeyView, kept: torch.Tensor) -> torch.Tensor:
        return _in_ids(view.token_ids, view.classes.punct)


@register_base_policy
class Frequent:
    name = "frequent"

    def keep(self, view: KeyView, kept: torch.Tensor) -> torch.Tensor:
        free = (~kept).nonzero().squeeze(1)  # [f] ascending positions
        # stable descending sort: equal scores stay in position order, the lower one first
        mean = view.scores[free] / view.counts[free]  # attention per query that saw the key
        order = torch.sort(mean, descending=True, stable=True).indices
        chosen = free[order[: budget(view.frequent_ratio, view.length)]]
        mask = torch.zeros_like(kept)
        mask[chosen] = True
        return mask


@register_base_policy
class Local:
    name = "local"

    def keep(self, view: KeyView, kept: torch.Tensor) -> torch.Tensor:
        return view.positions >= view.length - view.window


@register_base_policy
class Full:
    name = "full"

    def keep(self, view: KeyView, kept: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(kept)


def _hybrids(order: Sequence[str]) -> tuple[str, ...]:
    return tuple("+".join(order[: i + 1]) for i in range(len(order))) + ("full",)


# paper Eq. 2: special -> +punct -> +frequent -> +local -> full, cheapest first
CANDIDATES: tuple[str, ...] = _hybrids(("special", "punct", "frequent", "local"))


def components(policy: str) -> tuple[str, ...]:
    """The base policies of a hybrid name, in order ("special+punct" -> special, punct)."""
    parts = tuple(policy.split("+"))
    unknown = [p for p in parts if p not in BASE_POLICIES]
    if unknown:
        raise ValueError(f"fastgen policy {policy!r}: unknown {unknown}; known: "
                         f"{sorted(BASE_POLICIES)}")
    return parts


def hybrid_keep(policy: str, view: KeyView) -> torch.Tensor:
    """[m] bool: the keys of `view` that `policy` keeps (the module's keep rule)."""
    kept = torch.zeros_like(view.positions, dtype=torch.bool)  # [m]
    for name in components(policy):
        kept = kept | BASE_POLICIES[name].keep(view, kept)
    return kept


@dataclass(frozen=True, eq=False)
class LayerProfile:
    """Per KV head of one layer (n prompt tokens, P candidates)."""

    candidates: tuple[str, ...]  # [P] in greedy order
    policies: tuple[str, ...]  # [K] the chosen policy of each KV head
    keep: torch.Tensor  # [K, n] bool, keep mask of the chosen policy
    recovery: torch.Tensor  # [K] float, recovery of the chosen policy
    recoveries: torch.Tensor  # [K, P] float, recovery of every candidate
    scores: torch.Tensor  # [K, n] float, cumulative attention per key over the profiled rows
    counts: torch.Tensor  # [n] float, profiled rows that see each key
    window: int  # ceil(r_l * n), the local window decode keeps
    frequent_ratio: float  # r_f, the heavy-hitter ratio decode keeps


def _cumulative_attention(q: torch.Tensor, k: torch.Tensor, scale: float, first_row: int,
                          chunk: int) -> torch.Tensor:
    """[K, n]: summed over query rows first_row..n-1 of the causal attention probabilities,
    mean-pooled over the query heads of each KV head; `chunk` rows at a time."""
    n, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dtype).reshape(n, num_kv, num_heads // num_kv, head_dim)  # [n, K, G, D]
    kf = k.to(dtype)  # [n, K, D]
    scores = torch.zeros(num_kv, n, dtype=dtype, device=q.device)  # [K, n]
    for start in range(first_row, n, chunk):
        end = min(start + chunk, n)  # rows start..end-1 see keys 0..end-1 at most
        logits = torch.einsum("ckgd,jkd->kgcj", qg[start:end], kf[:end]) * scale  # [K, G, c, end]
        rows = torch.arange(start, end, device=q.device)  # [c]
        future = torch.arange(end, device=q.device)[None, :] > rows[:, None]  # [c, end]
        probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)  # [K, G, c, end]
        scores[:, :end] += probs.mean(dim=1).sum(dim=1)
    return scores


def _check_profile_args(q: torch.Tensor, k: torch.Tensor, token_ids: torch.Tensor,
                        local_ratio: float, frequent_ratio: float, num_rows: int, chunk: int,
                        candidates: Sequence[str]) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"profile_layer: q [n, H, D] and k [n, K, D], got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"profile_layer: H={q.shape[1]} is not a multiple of K={k.shape[1]}")
    if tuple(token_ids.shape) != (q.shape[0],):
        raise ValueError(f"profile_layer: token_ids must be [{q.shape[0]}], got "
                         f"{tuple(token_ids.shape)}")
    for name, ratio in (("local_ratio", local_ratio), ("frequent_ratio", frequent_ratio)):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"profile_layer: {name} must be in [0, 1], got {ratio}")
    if not 1 <= num_rows <= q.shape[0]:
        raise ValueError(f"profile_layer: rows must be in 1..{q.shape[0]}, got {num_rows}")
    if chunk < 1:
        raise ValueError(f"profile_layer: chunk must be >= 1, got {chunk}")
    if not candidates:
        raise ValueError("profile_layer: candidates is empty")
    for policy in candidates:
        components(policy)


def profile_layer(q: torch.Tensor, k: torch.Tensor, token_ids: torch.Tensor,
                  classes: TokenClasses, threshold: float, local_ratio: float,
                  frequent_ratio: float, scale: float, rows: Optional[int] = None,
                  chunk: int = 256, candidates: Sequence[str] = CANDIDATES) -> LayerProfile:
    """Choose each KV head's policy from the prompt's own attention (see the module docstring).

    q [n, H, D] and k [n, K, D]: the prompt's rotated queries and keys of this layer (query head
    h reads KV head h // (H // K)); token_ids [n]; scale: the softmax scale (e.g. D ** -0.5).
    rows: profile only the last `rows` query rows (None: all n); they see the whole prompt, so
    this is the cheap option for long prompts. chunk: query rows per attention slice (memory
    O(chunk * n * H)). candidates: the greedy order, cheapest first (an ablation may reorder).
    """
    num_rows = q.shape[0] if rows is None else rows
    _check_profile_args(q, k, token_ids, local_ratio, frequent_ratio, num_rows, chunk,
                        candidates)
    n, num_kv = k.shape[0], k.shape[1]
    scores = _cumulative_attention(q, k, scale, n - num_rows, chunk)  # [K, n]
    window = budget(local_ratio, n)
    positions = torch.arange(n, device=q.device)  # [n]
    ids = token_ids.to(device=q.device, dtype=torch.long)  # [n]
    # rows first..n-1 are profiled; row i sees keys <= i, so key j is seen by n - max(j, first)
    counts = (n - positions.clamp(min=n - num_rows)).to(scores.dtype)  # [n]
    masks = torch.stack([
        torch.stack([hybrid_keep(policy, KeyView(positions, ids, scores[h], counts, n, window,
                                                 frequent_ratio, classes))
                     for policy in candidates])
        for h in range(num_kv)
    ])  # [K, P, n] bool
    recoveries = (masks.to(scores.dtype) * scores[:, None, :]).sum(dim=-1) / num_rows  # [K, P]
    # T >= 1 asks for all of a head's attention: only keeping every key it sees gives that, and
    # a sum of probabilities can round to >= 1 without it, so such a threshold picks "full"
    meets = (recoveries >= threshold).tolist() if threshold < 1.0 else \
        [[c == "full" for c in candidates] for _ in range(num_kv)]
    chosen = [next((i for i, ok in enumerate(row) if ok), len(row) - 1) for row in meets]
    heads = torch.arange(num_kv, device=q.device)
    index = torch.tensor(chosen, device=q.device)
    return LayerProfile(candidates=tuple(candidates),
                        policies=tuple(candidates[i] for i in chosen),
                        keep=masks[heads, index], recovery=recoveries[heads, index],
                        recoveries=recoveries, scores=scores, counts=counts, window=window,
                        frequent_ratio=frequent_ratio)


@dataclass(frozen=True)
class DecodeStep:
    evict: tuple[int, ...]  # positions to evict after this step, ascending
    admitted: bool  # the new token stays (else it is the last entry of `evict`)


class FastGenGroup:
    """Decode-time bookkeeping of one (request, layer, KV head) group: its kept positions, their
    token ids, running scores and the number of queries that have seen each (CPU tensors, no
    K/V; `counts` None: every key seen once so far). Not thread-safe."""

    def __init__(self, policy: str, positions: torch.Tensor, token_ids: torch.Tensor,
                 scores: torch.Tensor, length: int, window: int, frequent_ratio: float,
                 classes: TokenClasses, counts: Optional[torch.Tensor] = None) -> None:
        components(policy)
        self.policy = policy
        self.positions = positions.to("cpu", torch.long)  # [m] ascending
        self.token_ids = token_ids.to("cpu", torch.long)  # [m]
        self.scores = scores.to("cpu", torch.float64)  # [m]
        self.counts = (torch.ones_like(self.scores) if counts is None
                       else counts.to("cpu", torch.float64))  # [m]
        self.length = length
        self.window = window
        self.frequent_ratio = frequent_ratio
        self.classes = classes

    @classmethod
    def from_profile(cls, profile: LayerProfile, kv_head: int, token_ids: torch.Tensor,
                     classes: TokenClasses) -> FastGenGroup:
        """The group of KV head `kv_head` right after its prompt (token_ids [n0]) was profiled:
        it holds the keys the chosen policy kept, with their cumulative scores and counts."""
        keep = profile.keep[kv_head].cpu()  # [n0] bool
        return cls(profile.policies[kv_head], keep.nonzero().squeeze(1),
                   token_ids.cpu()[keep], profile.scores[kv_head].cpu()[keep],
                   length=keep.shape[0], window=profile.window,
                   frequent_ratio=profile.frequent_ratio, classes=classes,
                   counts=profile.counts.cpu()[keep])

    def _view(self) -> KeyView:
        return KeyView(self.positions, self.token_ids, self.scores, self.counts, self.length,
                       self.window, self.frequent_ratio, self.classes)

    def on_token(self, position: int, token_id: int, attention_mass: torch.Tensor) -> DecodeStep:
        """Account for the token written at `position` (the next one); attention_mass [m + 1]:
        its query's attention (mean over the group's query heads) on each kept position, in
        ascending order, then on itself; every kept key's count grows by one (this query saw
        it), the new token's starts at one. Returns what to evict after this step."""
        if position != self.length:
            raise ValueError(f"on_token: expected position {self.length}, got {position}")
        mass = attention_mass.to("cpu", torch.float64).reshape(-1)  # [m + 1]
        if mass.shape[0] != self.positions.shape[0] + 1:
            raise ValueError(f"on_token: attention_mass must have {self.positions.shape[0] + 1} "
                             f"entries (kept + new), got {mass.shape[0]}")
        self.positions = torch.cat([self.positions, torch.tensor([position])])
        self.token_ids = torch.cat([self.token_ids, torch.tensor([token_id])])
        self.scores = torch.cat([self.scores, torch.zeros(1, dtype=torch.float64)]) + mass
        self.counts = torch.cat([self.counts, torch.zeros(1, dtype=torch.float64)]) + 1
        self.length = position + 1
        keep = hybrid_keep(self.policy, self._view())  # [m + 1] bool
        evict = tuple(self.positions[~keep].tolist())
        self.positions = self.positions[keep]
        self.token_ids = self.token_ids[keep]
        self.scores = self.scores[keep]
        self.counts = self.counts[keep]
        return DecodeStep(evict=evict, admitted=bool(keep[-1]))

    def check_integrity(self) -> None:
        """Assert the module invariants on the current kept set."""
        m = self.positions.shape[0]
        assert self.token_ids.shape == (m,) and self.scores.shape == (m,)
        assert self.counts.shape == (m,) and bool((self.counts >= 1).all())
        assert bool((self.positions[1:] > self.positions[:-1]).all())
        assert m == 0 or int(self.positions[-1]) < self.length
        assert bool(hybrid_keep(self.policy, self._view()).all()), "kept set is not a fixed point"
