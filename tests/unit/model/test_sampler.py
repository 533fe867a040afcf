"""Sampler semantics: greedy, filters (top-k / top-p / min-p), distribution, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwise.model import sampler as sampler_mod
from kvwise.model.sampler import make_generator, sample
from kvwise.sampling_params import SamplingParams


def _draw_many(logits_row: torch.Tensor, params: SamplingParams, num: int) -> torch.Tensor:
    """`num` independent draws from one row, as one batch of identical rows. [num] long"""
    logits = logits_row[None, :].expand(num, -1).contiguous()  # [num, V]
    return torch.tensor(sample(logits, [params] * num, [None] * num).token_ids)


def _reference_allowed(
    logits_row: torch.Tensor, params: SamplingParams, slack: float = 0.0
) -> set[int]:
    """Tokens a sampling row may produce, computed in float64 the textbook way.

    `slack` loosens every cut slightly, to absorb fp32-vs-fp64 rounding exactly at a boundary.
    """
    x = logits_row.double() / params.temperature  # [V]
    keep = torch.ones_like(x, dtype=torch.bool)
    if params.top_k is not None and params.top_k < x.numel():
        kth = torch.sort(x, descending=True).values[params.top_k - 1]
        keep &= x >= kth - slack
    if params.top_p < 1.0:
        masked = x.masked_fill(~keep, -math.inf)
        probs = torch.softmax(masked, dim=0)
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p
        num_keep = int((before < params.top_p + slack).sum())
        cut = masked[order[num_keep - 1]]
        keep &= masked >= cut - slack
    if params.min_p > 0.0:  # p >= min_p * p_max, in log space
        keep &= x >= x.masked_fill(~keep, -math.inf).max() + math.log(params.min_p) - slack
    return set(torch.nonzero(keep)[:, 0].tolist())


def test_greedy_equals_argmax_and_breaks_ties_by_lowest_id() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 500)
    logits[2, [7, 300, 41]] = 100.0  # three-way tie for the max
    out = sample(logits, [SamplingParams(temperature=0.0)] * 6, [None] * 6)
    expected = logits.argmax(dim=-1).tolist()
    expected[2] = 7
    assert out.token_ids == expected
    assert out.logprobs == [None] * 6
    assert out.sampled_logprob == [None] * 6  # no full-vocabulary logsumexp unless asked
    with_lp = sample(logits, [SamplingParams(temperature=0.0, logprobs=0)] * 6, [None] * 6)
    assert with_lp.token_ids == expected
    ref_lp = torch.log_softmax(logits, dim=-1)
    for i, t in enumerate(with_lp.token_ids):
        assert with_lp.sampled_logprob[i] == pytest.approx(float(ref_lp[i, t]), abs=1e-5)


def test_all_greedy_batch_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("per-row sampling used for an all-greedy batch")

    monkeypatch.setattr(sampler_mod, "_sample_rows", fail)
    logits = torch.randn(4, 50)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 4, [None] * 4)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_caller_logits_are_not_modified() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 100)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.7, top_k=5, top_p=0.5, min_p=0.1, logprobs=3),
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=1.3, top_p=0.9),
    ]
    sample(logits, params, [None] * 3)
    assert torch.equal(logits, before)


def test_top_k_never_samples_outside_the_k_best() -> None:
    torch.manual_seed(2)
    row = torch.randn(40)
    params = SamplingParams(temperature=2.0, top_k=4)  # high T: the tail would be likely
    drawn = set(_draw_many(row, params, 4000).tolist())
    best = set(torch.topk(row, 4).indices.tolist())
    assert drawn == best  # subset: the filter holds; equality: it is not over-restrictive


def test_top_p_never_samples_outside_the_nucleus() -> None:
    torch.manual_seed(3)
    row = torch.randn(30) * 2
    params = SamplingParams(temperature=1.0, top_p=0.6)
    probs = torch.softmax(row.double(), 0)
    sorted_p, order = torch.sort(probs, descending=True)
    num_keep = int(((torch.cumsum(sorted_p, 0) - sorted_p) < 0.6).sum())
    nucleus = set(order[:num_keep].tolist())
    assert 1 < len(nucleus) < 30
    drawn = set(_draw_many(row, params, 4000).tolist())
    assert drawn <= nucleus
    assert len(drawn) >= len(nucleus) - 1  # all but possibly the least likely one show up


def test_min_p_never_samples_below_the_cut() -> None:
    torch.manual_seed(4)
    row = torch.randn(50) * 2
    params = SamplingParams(temperature=1.0, min_p=0.2)
    probs = torch.softmax(row.double(), 0)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max())[:, 0].tolist())
    assert 1 < len(allowed) < 50
    drawn = set(_draw_many(row, params, 4000).tolist())
    assert drawn == allowed


@pytest.mark.parametrize(
    "vocab,scale,min_keep,max_keep",
    [(1_000, 4.0, 1, 255), (20_000, 2.5, 257, 4095), (10_000, 0.1, 4097, 10_000)],
    ids=["first-tier", "second-tier", "full-sort"],
)
def test_top_p_tiers_agree_with_reference(
    vocab: int, scale: float, min_keep: int, max_keep: int
) -> None:
    assert sampler_mod.TOP_P_TIERS == (256, 4096)
    torch.manual_seed(5)
    x = torch.randn(3, vocab) * scale  # [3, V]
    ref = [_reference_allowed(x[i], SamplingParams(top_p=0.9)) for i in range(3)]
    assert all(min_keep <= len(r) <= max_keep for r in ref)  # the nucleus lands in this tier
    masked = x.clone()
    sampler_mod._apply_top_p(masked, [0.9, 0.9, 0.9])
    for i in range(3):
        assert set(torch.nonzero(masked[i] > -math.inf)[:, 0].tolist()) == ref[i]


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square critical values at p = 0.001 (df 9 and df 4); the draws are seeded, so no flakes.
_CHI2_CRIT = {9: 27.88, 4: 18.47}


def test_temperature_sampling_matches_softmax_distribution() -> None:
    torch.manual_seed(6)
    row = torch.randn(10)
    temperature = 0.7
    drawn = _draw_many(row, SamplingParams(temperature=temperature), 40_000)
    counts = torch.bincount(drawn, minlength=10).double()
    expected = torch.softmax(row.double() / temperature, 0)
    assert _chi_square(counts, expected) < _CHI2_CRIT[9]
    # The same draws are far from the untempered distribution: the test can fail.
    assert _chi_square(counts, torch.softmax(row.double(), 0)) > 10 * _CHI2_CRIT[9]


def test_filtered_sampling_matches_renormalised_distribution() -> None:
    torch.manual_seed(7)
    row = torch.randn(10)
    params = SamplingParams(temperature=1.5, top_k=5)
    drawn = _draw_many(row, params, 40_000)
    top = torch.topk(row, 5).indices
    counts = torch.bincount(drawn, minlength=10).double()[top]
    expected = torch.softmax(row.double()[top] / 1.5, 0)
    assert _chi_square(counts, expected) < _CHI2_CRIT[4]


def test_seeded_row_is_independent_of_batch_composition_and_order() -> None:
    torch.manual_seed(8)
    vocab, steps = 2000, 12
    step_logits = [torch.randn(vocab) for _ in range(steps)]
    target = SamplingParams(temperature=1.0, top_p=0.95, top_k=500, seed=1234)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=99),
        SamplingParams(temperature=1.2, top_p=0.5, logprobs=3),
        SamplingParams(temperature=0.5, min_p=0.1),
    ]

    def run(batch_before: list[SamplingParams], batch_after: list[SamplingParams]) -> list[int]:
        params = batch_before + [target] + batch_after
        gens = [make_generator(p.seed, 0, "cpu") for p in params]
        pos = len(batch_before)
        tokens = []
        for logits_row in step_logits:
            noise = torch.randn(len(params), vocab)  # other rows differ from run to run
            noise[pos] = logits_row
            tokens.append(sample(noise, params, gens).token_ids[pos])
        return tokens

    alone = run([], [])
    assert len(set(alone)) > 1  # actually sampling
    assert run(others, []) == alone
    assert run(others[2:], others[:2]) == alone
    assert run(others[::-1] * 3, others) == alone


def test_siblings_of_one_seed_get_different_streams() -> None:
    logits = torch.zeros(1, 1000)  # uniform: any two streams agree with probability 1/1000
    params = [SamplingParams(temperature=1.0, seed=7, n=2)]

    def stream(index: int) -> list[int]:
        gen = make_generator(7, index, "cpu")
        return [sample(logits, params, [gen]).token_ids[0] for _ in range(10)]

    assert stream(0) == stream(0)
    assert stream(0) != stream(1)
    assert stream(1) != stream(2)
    assert make_generator(None, 0, "cpu") is None


def test_logprobs_are_raw_log_softmax_with_ranks() -> None:
    torch.manual_seed(9)
    logits = torch.randn(4, 300) * 3
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=5.0, top_k=200, logprobs=3),  # sampled token often unlisted
        SamplingParams(temperature=1.0, logprobs=0),
        SamplingParams(temperature=1.0),
    ]
    ref = torch.log_softmax(logits, dim=-1)
    for _ in range(5):
        out = sample(logits, params, [None] * 4)
        assert out.logprobs[3] is None
        for i in range(3):
            lps = out.logprobs[i]
            assert lps is not None
            tok = out.token_ids[i]
            assert out.sampled_logprob[i] == lps[tok].logprob
            order = torch.sort(ref[i], descending=True).indices.tolist()
            count = params[i].logprobs
            assert count is not None
            expected_ids = set(order[:count]) | {tok}
            assert set(lps) == expected_ids
            for t, lp in lps.items():
                assert lp.logprob == pytest.approx(float(ref[i, t]), abs=1e-5)
                assert lp.rank == order.index(t) + 1
        assert out.logprobs[0] is not None
        assert out.logprobs[0][out.token_ids[0]].rank == 1


def test_logprob_ranks_break_ties_by_lowest_id() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0]])
    out = sample(logits, [SamplingParams(temperature=0.0, logprobs=2)], [None])
    lps = out.logprobs[0]
    assert lps is not None
    assert out.token_ids == [1]
    assert {t: lp.rank for t, lp in lps.items()} == {1: 1, 3: 2}
    # An unlisted tied token: rank counts the equal logits with lower ids.
    gen = make_generator(0, 0, "cpu")
    params = [SamplingParams(temperature=1.0, top_k=3, logprobs=1)]
    ranks = {}
    for _ in range(60):
        out = sample(logits, params, [gen])
        lps = out.logprobs[0]
        assert lps is not None
        ranks[out.token_ids[0]] = lps[out.token_ids[0]].rank
    assert ranks == {1: 1, 3: 2, 4: 3}


_params_strategy = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0.05, 3.0)),
    top_k=st.one_of(st.none(), st.integers(1, 12)),
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
)


@settings(max_examples=150, deadline=None)
@given(
    logits=st.lists(
        st.one_of(st.integers(-6, 6).map(float), st.floats(-6.0, 6.0)), min_size=2, max_size=12
    ),
    params=_params_strategy,
    seed=st.integers(0, 2**32),
)
def test_sampled_token_is_always_allowed(
    logits: list[float], params: SamplingParams, seed: int
) -> None:
    row = torch.tensor(logits)
    num = 16
    gens = [make_generator(seed, i, "cpu") for i in range(num)]
    batch = row[None, :].expand(num, -1).contiguous()
    tokens = sample(batch, [params] * num, gens).token_ids
    if params.temperature == 0.0:
        assert tokens == [int(torch.argmax(row))] * num
        return
    allowed = _reference_allowed(row, params, slack=1e-4)
    assert set(tokens) <= allowed


def _unvalidated(**fields: object) -> SamplingParams:
    """Params past validation: what the sampler must survive even if a caller mutates them."""
    params = SamplingParams(temperature=1.0)
    for name, value in fields.items():
        setattr(params, name, value)
    return params


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 0.0, -1.0, 1e-45])
def test_top_p_that_is_zero_in_float32_keeps_the_maximum(top_p: float) -> None:
    """A top_p of 0 in fp32 once made the nucleus empty and gathered index -1."""
    torch.manual_seed(2)
    logits = torch.randn(3, 5000)  # > TOP_P_TIERS[0]: the tiered search runs
    params = [_unvalidated(top_p=top_p), SamplingParams(temperature=0.8, top_p=0.9),
              _unvalidated(top_p=top_p, top_k=7)]
    out = sample(logits, params, [None] * 3)
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[2] == int(logits[2].argmax())


def test_min_p_above_one_and_huge_top_k_keep_the_maximum() -> None:
    logits = torch.randn(2, 300)
    out = sample(logits, [_unvalidated(min_p=5.0), _unvalidated(top_k=10**30)], [None] * 2)
    assert out.token_ids[0] == int(logits[0].argmax())
    assert 0 <= out.token_ids[1] < 300


def test_row_without_a_finite_logit_raises_instead_of_returning_an_invalid_id() -> None:
    logits = torch.randn(2, 50)
    logits[1] = float("nan")
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        sample(logits, [SamplingParams(temperature=1.0)] * 2, [None] * 2)


def test_predrawn_uniforms_give_the_generators_tokens_row_by_row() -> None:
    """draw_uniforms then sample(uniforms=...) equals sample with the generators, batched or
    one row at a time: what lets the engine retry rows without moving any generator."""
    torch.manual_seed(3)
    logits = torch.randn(4, 400)
    params = [SamplingParams(temperature=0.9, seed=1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.2, top_p=0.8, seed=2), SamplingParams(temperature=0.7)]

    def gens() -> list[torch.Generator | None]:
        return [make_generator(p.seed, 0, "cpu") for p in params]

    torch.manual_seed(9)
    expected = sample(logits, params, gens()).token_ids
    torch.manual_seed(9)
    g = gens()
    u = sampler_mod.draw_uniforms(params, g, "cpu")
    assert u is not None and float(u[1]) == 0.0
    batched = sample(logits, params, [None] * 4, u).token_ids
    rows = [sample(logits[i:i + 1], [params[i]], [None], u[i:i + 1]).token_ids[0]
            for i in range(4)]
    assert batched == rows == expected
    assert sampler_mod.draw_uniforms([SamplingParams(temperature=0.0)], [None], "cpu") is None
