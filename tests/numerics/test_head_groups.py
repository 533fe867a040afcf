"""Per-head KV groups through the engine (the seam FastGen plugs into): a request with one KV
group per (layer, KV head), whose groups evict different tokens, decodes through per-head
tables in every backend.

The policies here are test instruments, not user features (FastGen is): a per-head policy is
any object with `per_head = True` and `evict_group_slots(group, num_kept)`; the engine evicts
and compacts each group with it, the scheduler hands the per-head tables to the runner.
- Every group evicting the same slots gives exactly the tokens of the one-group streaming
  policy (same kept KV, read through per-head tables instead of one table).
- Groups evicting differently: the paged backend (per-head CPU kernel) and two-phase (which
  routes such steps to paged) match the float64 reference on every attention call of the run,
  the reference itself being checked against a brute-force softmax per head in
  tests/unit/attention/test_paged.py.
- Freed memory is real: after the run every block is back, integrity holds throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kvwise import LLM, SamplingParams
from kvwise.cache.compress import StreamingPolicy

PROMPT = "Once upon a time, in a land far away, there lived a"
SINK, WINDOW, S = 4, 24, 16


@dataclass(frozen=True)
class PerHeadStreaming:
    """Streaming per group; group g's window is WINDOW + extra[g % len(extra)]."""

    extra: tuple[int, ...] = (0,)
    name: str = "per-head-streaming"
    per_head: bool = True

    def _policy(self, group: int) -> StreamingPolicy:
        return StreamingPolicy(SINK, WINDOW + self.extra[group % len(self.extra)], S)

    def evict_group_slots(self, group: int, num_kept: int) -> Optional[range]:
        return self._policy(group).evict_slots(num_kept)

    def max_blocks(self) -> int:
        return self._policy(0).max_blocks() + max(self.extra) // S + 1


def _llm(**kw) -> LLM:
    args = dict(threads=2, max_model_len=512, kv_cache_memory="32MiB", weight_dtype="int8",
                kv_compression="streaming", sink_tokens=SINK, window_tokens=WINDOW)
    return LLM("smollm2-135m", **{**args, **kw})


def _per_head(llm: LLM, policy: PerHeadStreaming) -> LLM:
    llm.engine._kv_policy = lambda params: policy  # the test instrument (module docstring)
    return llm


def _greedy(llm: LLM, prompts, max_tokens: int) -> list[list[int]]:
    p = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(prompts, p, use_tqdm=False)
    llm.engine.check_integrity()
    assert llm.stats()["num_blocks_used"] == 0
    return [o.outputs[0].token_ids for o in outs]


def test_same_evictions_per_head_give_the_one_group_tokens():
    llm = _llm()
    one_group = _greedy(llm, [PROMPT, PROMPT + " king"], 80)
    per_head = _greedy(_per_head(llm, PerHeadStreaming()), [PROMPT, PROMPT + " king"], 80)
    assert per_head == one_group


def test_heads_evicting_differently_match_the_reference(monkeypatch):
    from kvwise.attention import paged, reference, two_phase

    fast = {"paged": paged.PagedBackend(), "two_phase": two_phase.TwoPhaseBackend()}
    orig = reference.ReferenceBackend.forward
    worst = {name: 0.0 for name in fast}
    seen = {"heads": 0}

    def checked(self, q, k_new, v_new, kv, meta, scale):
        want = orig(self, q, k_new, v_new, kv, meta, scale)
        for name, backend in fast.items():
            got = backend.forward(q, k_new, v_new, kv, meta, scale)
            worst[name] = max(worst[name], (got - want).abs().max().item())
        seen["heads"] += meta.heads is not None
        return want

    monkeypatch.setattr(reference.ReferenceBackend, "forward", checked)
    llm = _per_head(_llm(attention_backend="reference"), PerHeadStreaming((0, 16, 40)))
    tokens = _greedy(llm, [PROMPT, PROMPT + " dragon"], 60)
    assert all(len(t) == 60 for t in tokens)
    assert seen["heads"] > 0
    assert worst["paged"] < 1e-4 and worst["two_phase"] < 1e-4, worst
