"""KVQuant formats through the engine: refusals, and greedy tokens unchanged by prefix caching,
preemption and the two-phase backend (the shipped calibration of the bundled model).

As in tests/numerics/test_int8_kv.py, the engine runs int8 weights and 16-token steps, whose
kernels compute each K/V row independently of the step's other rows: otherwise a ~1e-6
difference of a GEMM's rounding between step sizes can move a code to the next level, which
is a real difference of the inputs, not of the cache. For the same reason the cache-state
tests run the float64 reference backend: the paged backend's SDPA rounds a row differently
with the shape of its call (a chunk's queries, a decode batch), and 3-bit codes turn such
1e-7 differences into different tokens after ~20 tokens now and then, which says nothing about
the cache (the paged and two-phase backends are compared with each other below)."""

from __future__ import annotations

import json

import pytest

from kvwise import LLM
from kvwise.config import EngineConfig
from kvwise.errors import ConfigError, InvalidRequestError, TransferError
from kvwise.sampling_params import SamplingParams

FORMAT = "nuq3-1%"
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PREFIX = ("The history of the printing press begins in the fifteenth century, when movable "
          "type made books cheap enough for ordinary readers. ")
PROMPTS = [PREFIX + "Its first effect was", PREFIX + "Scholars disagree about whether",
           PREFIX + "In the villages, people"]


def _llm(**kw) -> LLM:
    base = {"kv_cache_dtype": FORMAT, "kv_cache_memory": "32MiB", "max_num_batched_tokens": 16,
            "weight_dtype": "int8", "threads": 2, "attention_backend": "reference"}
    return LLM("smollm2-135m", **{**base, **kw})


def _tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    """The first prompt, then the other two together; no prefix caching."""
    llm = _llm(enable_prefix_caching=False)
    return _tokens(llm, PROMPTS[:1]) + _tokens(llm, PROMPTS[1:])


def test_prefix_caching_gives_the_tokens_of_no_caching(reference):
    llm = _llm(enable_prefix_caching=True)
    first = _tokens(llm, PROMPTS[:1])
    rest = _tokens(llm, PROMPTS[1:])  # hits the full blocks of the shared prefix
    assert llm.stats()["prefix_hit_tokens"] >= 32
    assert first + rest == reference


def test_preemption_gives_the_same_tokens():
    expect = _tokens(_llm(enable_prefix_caching=False))
    # 3 prompts of ~30 tokens + 24 outputs need ~12 blocks of 16; 7 force preemptions
    llm = _llm(num_blocks=7, enable_prefix_caching=False)
    assert _tokens(llm) == expect
    assert llm.stats()["num_preemptions"] > 0


def test_fast_backends_match_the_reference_on_the_same_cache(monkeypatch):
    """Every attention call of a batched, prefix-sharing run: the paged backend (the KVQuant
    decode kernel, per-block prefill) and two-phase (shared quantized chunks read once for
    all sharers) on the very inputs and cache the float64 reference sees. End-to-end tokens
    are not compared: a 1e-6 difference per layer becomes a different code somewhere."""
    from kvwise.attention import paged, reference, two_phase

    fast = {"paged": paged.PagedBackend(), "two_phase": two_phase.TwoPhaseBackend()}
    orig = reference.ReferenceBackend.forward
    worst = {name: 0.0 for name in fast}
    seen = {"decode": 0, "prefill": 0}

    def checked(self, q, k_new, v_new, kv, meta, scale):
        want = orig(self, q, k_new, v_new, kv, meta, scale)
        for name, backend in fast.items():
            meta.backend_data = None  # two-phase prepares its own plan
            got = backend.forward(q, k_new, v_new, kv, meta, scale)
            worst[name] = max(worst[name], (got - want).abs().max().item())
        seen["decode"] += meta.num_decode_tokens > 1
        seen["prefill"] += bool(meta.prefills)
        return want

    monkeypatch.setattr(reference.ReferenceBackend, "forward", checked)
    llm = _llm(enable_prefix_caching=True, max_num_batched_tokens=64)
    _tokens(llm, PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=2))
    _tokens(llm, PROMPTS, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    assert seen["decode"] > 0 and seen["prefill"] > 0
    assert worst["paged"] < 1e-4 and worst["two_phase"] < 1e-4, worst


def test_quantized_blocks_are_counted_and_side_storage_is_released():
    llm = _llm()
    _tokens(llm, PROMPTS[:1])
    s = llm.stats()
    from kvwise.cache.kv_store import format_class

    shape = llm.engine.model_config
    ratio = format_class("float16").block_bytes(shape, 16) / s["kv_bytes_per_block"]
    assert ratio > 4.0
    assert s["num_blocks_used"] == 0  # finished: nothing referenced
    # the finished request's open tail went back to the side pool
    assert llm.engine.kv_store.tail.num_used == 0


def test_refusals_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="kv_compression"):
        EngineConfig(kv_cache_dtype=FORMAT, kv_compression="streaming", window_tokens=64)
    with pytest.raises(ConfigError, match="batch_invariant"):
        EngineConfig(kv_cache_dtype=FORMAT, batch_invariant=True)
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="nuq3-20%")
    with pytest.raises(ConfigError, match="kv_quant_sink"):
        EngineConfig(kv_cache_dtype=FORMAT, kv_quant_sink=17)
    missing = tmp_path / "none.json"
    with pytest.raises(ConfigError, match="kv_quant_calibration.*none.json.*no such"):
        _llm(kv_quant_calibration=str(missing))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt.json.*not a readable"):
        _llm(kv_quant_calibration=str(corrupt))


def test_a_calibration_of_another_model_is_refused(tmp_path):
    from kvwise.engine.kv_setup import shipped_calibration

    doc = json.loads(open(shipped_calibration("smollm2-135m"), encoding="utf-8").read())
    doc["model"]["num_layers"] = 2
    for r in doc["key_ranges"].values():
        r["zero"], r["scale"] = r["zero"][:2], r["scale"][:2]
    for f in doc["formats"].values():
        for key in f:
            f[key] = f[key][:2]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="other.json.*num_layers"):
        _llm(kv_quant_calibration=str(other))


def test_requests_that_cannot_run_are_refused_without_harm():
    llm = _llm()
    bad = SamplingParams(max_tokens=4, kv_compression="streaming", window_tokens=32)
    with pytest.raises(InvalidRequestError, match="kv_compression"):
        llm.generate(["hello"], bad, use_tqdm=False)
    engine = llm.engine
    engine.add_request("held", "Tell me a story", SamplingParams(max_tokens=4),
                       hold_after_prefill=True)
    while engine.has_unfinished_requests() and "held" not in engine.scheduler.held:
        engine.step()
    with pytest.raises(TransferError, match="kv_cache_dtype"):
        engine.export_request("held")
    engine.abort_request("held")
    assert _tokens(llm, PROMPTS[:1]) == _tokens(_llm(), PROMPTS[:1])
