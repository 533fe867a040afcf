"""FastGen's pure core (kvwise.cache.compress.fastgen): token classes, profiling against a
brute-force float64 reference, and the exact decode-time bookkeeping of one KV group."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvwise.cache.compress.fastgen import (
    CANDIDATES,
    FastGenGroup,
    TokenClasses,
    budget,
    profile_layer,
    token_classes,
)

SPECIAL, PUNCT = 1, 2  # ids of the test vocabulary's classes (plus 3..VOCAB-1: words)
VOCAB = 8
CLASSES = TokenClasses(special=frozenset({SPECIAL}), punct=frozenset({PUNCT, 3}))
RATIOS = [0.0, 0.1, 0.25, 0.3, 0.5, 1.0]


def exact_budget(ratio: float, length: int) -> int:
    return math.ceil(Fraction(str(ratio)) * length)


def reference_keep(policy: str, positions: list[int], ids: list[int], scores: list[float],
                   length: int, window: int, r_f: float, classes: TokenClasses,
                   counts: list[float]) -> list[bool]:
    """The keep rule written plainly: union of the components, in order; heavy hitters by
    mean attention (score / queries that saw the key)."""
    kept = [False] * len(positions)
    for part in policy.split("+"):
        if part == "special":
            add = [t in classes.special for t in ids]
        elif part == "punct":
            add = [t in classes.punct for t in ids]
        elif part == "local":
            add = [p >= length - window for p in positions]
        elif part == "full":
            add = [True] * len(positions)
        else:
            assert part == "frequent"
            free = [i for i in range(len(positions)) if not kept[i]]
            free.sort(key=lambda i: (-scores[i] / counts[i], positions[i]))
            top = set(free[: exact_budget(r_f, length)])
            add = [i in top for i in range(len(positions))]
        kept = [a or b for a, b in zip(kept, add)]
    return kept


def reference_profile(q, k, ids, r_l, r_f, scale, rows):
    """Per KV head: (masks, recoveries) of every candidate and the cumulative scores, from the
    full n x n softmax in float64, mean-pooled over each KV head's query heads."""
    n, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    k_per_q = k.double().repeat_interleave(group, dim=1)  # query head h reads KV head h // group
    logits = torch.einsum("ihd,jhd->hij", q.double(), k_per_q) * scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # [H, n, n]
    pooled = probs.view(k.shape[1], group, n, n).mean(dim=1)  # [K, n, n]
    first = n - (n if rows is None else rows)
    window = exact_budget(r_l, n)
    out = []
    counts = [sum(1 for i in range(first, n) if i >= j) for j in range(n)]  # rows seeing key j
    for attn in pooled[:, first:]:  # [R, n] the profiled rows
        scores = attn.sum(dim=0).tolist()
        masks = [reference_keep(c, list(range(n)), ids, scores, n, window, r_f, CLASSES, counts)
                 for c in CANDIDATES]
        # per row: mass on kept keys (a row sees keys <= its position), then the mean of rows
        recs = [float((attn * torch.tensor(m, dtype=torch.float64)).sum(dim=1).mean())
                for m in masks]
        out.append((masks, recs, scores))
    return out


def first_meeting(recs: list[float], threshold: float) -> int:
    return next((i for i, r in enumerate(recs) if r >= threshold), len(recs) - 1)


def pick_threshold(data, want) -> float:
    """Uniform, or just below one head's recovery of a drawn candidate (so that every
    candidate, the rarely chosen local hybrid included, gets picked). Never within float noise
    of a recovery, where summation order alone could flip the choice."""
    if data.draw(st.booleans()):
        threshold = data.draw(st.floats(0.0, 1.02))
        assume(all(abs(r - threshold) > 1e-9 for _, recs, _ in want for r in recs))
        return threshold
    recs = want[data.draw(st.integers(0, len(want) - 1))][1]
    return recs[data.draw(st.integers(0, len(recs) - 1))] - 1e-9


@st.composite
def prompts(draw):
    n = draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 9, 16, generator=gen, dtype=torch.float64)  # K=3 KV heads x group 3
    k = torch.randn(n, 3, 16, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (n,), generator=gen)
    return q, k, ids


@settings(max_examples=60, deadline=None)
@given(prompts(), st.sampled_from(RATIOS), st.sampled_from(RATIOS),
       st.sampled_from([1, 3, 7, 64, 200]), st.data())
def test_profile_matches_brute_force(prompt, r_l, r_f, chunk, data):
    q, k, ids = prompt
    n = q.shape[0]
    rows = data.draw(st.one_of(st.none(), st.integers(1, n)))
    scale = 16 ** -0.5
    want = reference_profile(q, k, ids.tolist(), r_l, r_f, scale, rows)
    threshold = pick_threshold(data, want)
    got = profile_layer(q, k, ids, CLASSES, threshold, r_l, r_f, scale, rows=rows, chunk=chunk)
    picks = [first_meeting(recs, threshold) for _, recs, _ in want]
    assert got.policies == tuple(CANDIDATES[i] for i in picks)
    assert got.keep.tolist() == [masks[i] for i, (masks, _, _) in zip(picks, want)]
    assert got.recoveries.shape == (3, len(CANDIDATES))
    recs = torch.tensor([w[1] for w in want], dtype=torch.float64)
    assert torch.allclose(got.recoveries, recs, rtol=0, atol=1e-6)
    assert torch.allclose(got.recovery, recs[range(3), picks], rtol=0, atol=1e-6)
    scores = torch.tensor([w[2] for w in want], dtype=torch.float64)
    assert torch.allclose(got.scores, scores, rtol=0, atol=1e-9)
    assert got.window == exact_budget(r_l, n)


def test_thresholds_zero_and_above_one():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(30, 4, 8, generator=gen), torch.randn(30, 2, 8, generator=gen)
    ids = torch.full((30,), 5)  # no special token at all: "special" keeps nothing
    low = profile_layer(q, k, ids, CLASSES, 0.0, 0.3, 0.3, 8 ** -0.5)
    assert low.policies == ("special", "special") and not low.keep.any()
    assert low.recovery.tolist() == [0.0, 0.0]
    high = profile_layer(q, k, ids, CLASSES, 1.5, 0.3, 0.3, 8 ** -0.5, chunk=7)
    assert high.policies == ("full", "full") and high.keep.all()
    assert torch.allclose(high.recovery, torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        profile_layer(q, k, ids, CLASSES, 0.5, 0.3, 0.3, 1.0, candidates=("special+h2o", "full"))
    with pytest.raises(ValueError, match="rows"):
        profile_layer(q, k, ids, CLASSES, 0.5, 0.3, 0.3, 1.0, rows=31)


def test_constructed_heads_pick_punct_special_and_full():
    """KV head 0 attends only to punctuation and the BOS token, head 1 only to BOS, head 2
    only to each row's own token (nothing cheap recovers it)."""
    n, big = 20, 30.0 ** 0.5
    ids = torch.full((n,), 5)
    ids[0] = SPECIAL
    ids[[5, 10, 15]] = PUNCT
    q, k = torch.zeros(n, 3, 24), torch.zeros(n, 3, 24)
    q[:, 0, 20] = big
    k[ids == PUNCT, 0, 20] = big
    k[0, 0, 20] = big
    q[:, 1, 21] = big
    k[0, 1, 21] = big
    q[:, 2, :n] = big * torch.eye(n)
    k[:, 2, :n] = big * torch.eye(n)
    got = profile_layer(q, k, ids, CLASSES, 0.9, 0.3, 0.3, scale=1.0, chunk=6)
    assert got.policies == ("special+punct", "special", "full")
    assert got.keep[0].nonzero().squeeze(1).tolist() == [0, 5, 10, 15]
    assert got.recoveries[0, 0] < 0.6 and got.recoveries[0, 1] > 0.999
    assert got.recoveries[2, 3] < 0.9


def test_budgets_forgive_float_noise_and_ties_go_to_the_lower_position():
    assert [budget(0.1, 30), budget(0.7, 10), budget(0.3, 7), budget(0.0, 9)] == [3, 7, 3, 0]
    # the last row of a zero query attends uniformly: every key scores 1/40, a 40-way tie
    n = 40
    q, k = torch.zeros(n, 2, 4), torch.randn(n, 1, 4)
    got = profile_layer(q, k, torch.full((n,), 5), CLASSES, 0.2, 0.0, 0.25, 0.5, rows=1)
    assert got.policies == ("special+punct+frequent",)
    assert got.keep[0].nonzero().squeeze(1).tolist() == list(range(10))


def test_token_classes_on_a_tiny_vocab():
    vocab = ["Ġ.", "hello", ",", "Ċ", "<|im_start|>", "?!", "a.", "▁...", "。", "$", "ĠĊ-"]
    classes = token_classes(vocab, special_ids=[4])
    assert classes.special == frozenset({4})
    # "Ċ" alone is only whitespace, "a." has a letter, "$" is a symbol (Sc), not punctuation
    assert classes.punct == frozenset({0, 2, 5, 7, 8, 10})


def group(policy, positions, ids, scores, length, window=0, r_f=0.0):
    return FastGenGroup(policy, torch.tensor(positions), torch.tensor(ids),
                        torch.tensor(scores, dtype=torch.float64), length, window, r_f, CLASSES)


def kept(g: FastGenGroup) -> list[int]:
    return g.positions.tolist()


def test_local_window_slides_exactly_and_keeps_special():
    # prompt of 10 with BOS at 0: window ceil(0.3 * 10) = 3, no heavy hitters (r_f = 0)
    g = group("special+punct+frequent+local", [0, 7, 8, 9], [SPECIAL, 5, 5, 5], [1.0] * 4,
              length=10, window=3)
    for pos in range(10, 40):
        step = g.on_token(pos, 6, torch.full((len(kept(g)) + 1,), 0.2))
        assert step.evict == (pos - 3,) and step.admitted
        assert kept(g) == [0, pos - 2, pos - 1, pos]
        g.check_integrity()


def test_frequent_evicts_the_lowest_mean_attention():
    # prompt of 8, r_f = 0.25: BOS at 0 (score 0, pinned) and heavy hitters 2 and 5, each seen
    # by one query so far; a key's rank is its score / the queries that saw it
    g = group("special+punct+frequent", [0, 2, 5], [SPECIAL, 5, 5], [0.0, 3.0, 0.5], length=8,
              r_f=0.25)
    step = g.on_token(8, 6, torch.tensor([0.5, 0.25, 0.125, 0.125]))  # budget ceil(2.25) = 3
    assert step.evict == () and kept(g) == [0, 2, 5, 8]
    # scores 3.5, 0.625, 0.375, 0.25 over 3, 3, 2, 1 queries: 8 has the lowest mean (0.1875)
    step = g.on_token(9, 6, torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25]))
    assert step.evict == (8,) and step.admitted and kept(g) == [0, 2, 5, 9]
    # means: 2 0.875, 5 0.156, 9 0.25, 10 0.75 (a new token ranks by what it got, once)
    step = g.on_token(10, 6, torch.tensor([0.0, 0.0, 0.0, 0.25, 0.75]))
    assert step.evict == (5,) and step.admitted and kept(g) == [0, 2, 9, 10]
    step = g.on_token(11, 6, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))  # 9 at 0.167 goes
    assert step.evict == (9,) and kept(g) == [0, 2, 10, 11]
    assert g.scores.tolist() == [0.75, 3.5, 0.75, 1.0]
    assert g.counts.tolist() == [5.0, 5.0, 2.0, 1.0]
    g.check_integrity()
    with pytest.raises(ValueError, match="attention_mass"):
        g.on_token(12, 6, torch.ones(3))
    with pytest.raises(ValueError, match="position"):
        g.on_token(13, 6, torch.ones(5))


def test_special_and_punct_heads_admit_only_their_classes():
    both = group("special+punct", [0], [SPECIAL], [1.0], length=4)
    only = group("special", [0], [SPECIAL], [1.0], length=4)
    for pos, tok in enumerate([5, PUNCT, 7, SPECIAL, 3, 6], start=4):
        for g, admit in ((both, tok in (SPECIAL, PUNCT, 3)), (only, tok == SPECIAL)):
            step = g.on_token(pos, tok, torch.full((len(kept(g)) + 1,), 0.5))
            assert step.admitted == admit
            assert step.evict == (() if admit else (pos,))
    assert kept(both) == [0, 5, 7, 8] and kept(only) == [0, 7]


def test_full_never_evicts():
    g = group("full", [0, 1, 2], [5, 5, 5], [0.0] * 3, length=3)
    for pos in range(3, 60):
        assert g.on_token(pos, 5, torch.zeros(pos + 1)).evict == ()
    assert kept(g) == list(range(60))


@settings(max_examples=40, deadline=None)
@given(prompts(), st.sampled_from(RATIOS), st.sampled_from(RATIOS), st.integers(0, 2**31),
       st.integers(1, 40), st.data())
def test_decode_keeps_its_budget_and_its_classes(prompt, r_l, r_f, seed, steps, data):
    """From a real profile, random tokens and attention: the kept set matches the plain keep
    rule, stays within |class keys| + ceil(r_f * L) + window, and never loses a special/punct
    key of its classes; evicted keys never return."""
    q, k, ids = prompt
    n0 = q.shape[0]
    threshold = pick_threshold(data, reference_profile(q, k, ids.tolist(), r_l, r_f, 0.25, None))
    profile = profile_layer(q, k, ids, CLASSES, threshold, r_l, r_f, 0.25)
    gen = torch.Generator().manual_seed(seed)
    for head in range(3):
        g = FastGenGroup.from_profile(profile, head, ids, CLASSES)
        policy = profile.policies[head]
        parts = policy.split("+")
        pinned = (CLASSES.special if "special" in parts else frozenset()) | (
            CLASSES.punct if "punct" in parts else frozenset())
        tokens = ids.tolist()
        ref = dict(zip(kept(g), g.scores.tolist()))
        seen = dict(zip(kept(g), g.counts.tolist()))  # queries that saw each kept key
        for pos in range(n0, n0 + steps):
            tok = int(torch.randint(0, VOCAB, (1,), generator=gen))
            mass = torch.rand(len(ref) + 1, generator=gen, dtype=torch.float64)
            mass /= mass.sum()
            before = set(ref)
            step = g.on_token(pos, tok, mass)
            tokens.append(tok)
            ref = {p: s + m for (p, s), m in zip([*ref.items(), (pos, 0.0)], mass.tolist())}
            seen = {p: seen.get(p, 0.0) + 1 for p in ref}
            positions = sorted(ref)
            keep = reference_keep(policy, positions, [tokens[p] for p in positions],
                                  [ref[p] for p in positions], pos + 1, profile.window, r_f,
                                  CLASSES, [seen[p] for p in positions])
            ref = {p: ref[p] for p, kp in zip(positions, keep) if kp}
            seen = {p: seen[p] for p in ref}
            assert kept(g) == sorted(ref)
            assert set(step.evict) == (before | {pos}) - set(ref)
            assert step.admitted == (pos in ref)
            g.check_integrity()
            if policy == "full":
                assert step.evict == ()
                continue
            assert {p for p in range(pos + 1) if tokens[p] in pinned} <= set(ref)
            limit = sum(tokens[p] in pinned for p in ref)
            limit += exact_budget(r_f, pos + 1) if "frequent" in parts else 0
            limit += profile.window if "local" in parts else 0
            assert len(ref) <= limit
