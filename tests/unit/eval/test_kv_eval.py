"""`kvwise eval kv`: windows, agreement and NLL math, setting parsing, JSON keys; one small real
run on the bundled model checked against an independent full-sequence forward; peers when
installed."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from kvwise.errors import InvalidRequestError, KvwiseError
from kvwise.eval import kv_peers
from kvwise.eval.kv_eval import (
    RESULT_KEYS,
    KVCompression,
    KVSetting,
    WindowScores,
    eval_windows,
    greedy_agreement,
    kvwise_settings,
    measure_kvwise,
    parse_kv_compressions,
    score_rows,
    summarize,
)
from kvwise.eval.perplexity import prompt_logits
from tests.conftest import pydoc_text

# -- pure parts ----------------------------------------------------------------------------


def test_windows_are_disjoint_evenly_spaced_and_deterministic():
    ids = list(range(1000))
    windows = eval_windows(ids, 10, 5, 3)
    # stride (1000 - 15) // 2 = 492: offsets 0, 492, 984
    assert windows == [(ids[o:o + 10], ids[o + 10:o + 15]) for o in (0, 492, 984)]
    assert eval_windows(ids, 10, 5, 3) == windows
    assert eval_windows(ids, 10, 5, 1) == [(ids[:10], ids[10:15])]
    # exactly enough tokens: back to back
    assert [c[0] for c, _ in eval_windows(list(range(30)), 10, 5, 2)] == [0, 15]
    with pytest.raises(InvalidRequestError, match="2 windows of 15 need 30"):
        eval_windows(list(range(29)), 10, 5, 2)
    with pytest.raises(InvalidRequestError):
        eval_windows(ids, 0, 5, 1)


def test_score_rows_and_agreement():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 0.0, 0.0], [0.0, 2.0, 9.0, 1.0]])
    nll, argmax = score_rows(logits, [3, 0, 1])
    assert nll.dtype == torch.float64
    assert nll[0].item() == pytest.approx(math.log(4))
    expect = -torch.log_softmax(logits.double(), -1)[[0, 1, 2], [3, 0, 1]]
    assert torch.allclose(nll, expect)
    assert argmax.tolist() == [0, 0, 2]
    a = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6])]
    b = [torch.tensor([1, 0, 3, 4]), torch.tensor([0, 6])]
    assert greedy_agreement(a, b) == pytest.approx(4 / 6)
    assert greedy_agreement(a, a) == 1.0
    with pytest.raises(ValueError):  # windows must pair up
        greedy_agreement(a, b[:1])


def test_summarize_averages_over_all_predictions():
    w1 = WindowScores(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([1, 2]),
                      1.0, 0.5, 1.0, 0.5)
    w2 = WindowScores(torch.tensor([3.0, 6.0], dtype=torch.float64), torch.tensor([3, 4]),
                      0.5, 0.25, 0.5, 0.25)
    r = summarize("x", [w1, w2], [torch.tensor([1, 0]), torch.tensor([3, 4])], 1.5)
    assert r.ppl == pytest.approx(math.exp(3.0))
    assert (r.greedy_agreement, r.mean_kept_fraction, r.kv_bytes_ratio) == (0.75, 0.75, 0.375)
    assert (r.kept_fraction, r.final_kept_fraction) == (0.75, 0.375)
    row = json.loads(json.dumps(r.as_json()))
    assert list(row) == list(RESULT_KEYS) == [
        "setting", "ppl", "greedy_agreement", "kept_fraction", "final_kept_fraction",
        "mean_kept_fraction", "kv_bytes_ratio", "seconds"]
    assert row["setting"] == "x" and row["seconds"] == 1.5


def test_parse_kv_compressions():
    assert parse_kv_compressions("none, streaming:4:128") == [
        KVCompression(), KVCompression("streaming", 4, 128)]
    assert parse_kv_compressions("streaming:0:1")[0].label == "streaming:0:1"
    assert parse_kv_compressions("fastgen:0.95") == [KVCompression("fastgen",
                                                                   recovery_threshold=0.95)]
    assert parse_kv_compressions("fastgen:1")[0].label == "fastgen:1"
    for bad in ("", "streaming", "streaming:4", "streaming:4:0", "streaming:a:8",
                "streaming:-1:8", "none:1", "fastgen", "fastgen:1.5", "fastgen:x",
                "fastgen:0.9:1"):
        with pytest.raises(InvalidRequestError, match="kv_compressions"):
            parse_kv_compressions(bad)


def test_settings_grid_puts_the_baseline_first_once():
    comps = [KVCompression(), KVCompression("streaming", 4, 64)]
    names = [s.name for s in kvwise_settings(["float16", "float32", "int8"], comps)]
    assert names == ["kvwise/kv=float32", "kvwise/kv=float16",
                     "kvwise/kv=float16/comp=streaming:4:64",
                     "kvwise/kv=float32/comp=streaming:4:64", "kvwise/kv=int8",
                     "kvwise/kv=int8/comp=streaming:4:64"]
    assert [s.name for s in kvwise_settings(["int8"], comps[1:])] == [
        "kvwise/kv=float32", "kvwise/kv=int8/comp=streaming:4:64"]


def test_parse_peers_adds_each_peers_baseline():
    names = [s.name for s in kv_peers.parse_peers("quanto:int4,llamacpp,quanto:int4")]
    assert names == ["hf/fp32", "quanto/int4", "llamacpp/f16", "llamacpp/q8_0",
                     "llamacpp/q4_0", "llamacpp/q4_1", "llamacpp/iq4_nl"]
    with pytest.raises(KvwiseError, match="unknown peer"):
        kv_peers.parse_peers("vllm")
    with pytest.raises(KvwiseError, match="no cache type"):
        kv_peers.parse_peers("llamacpp:q2_k")


def test_missing_peer_package_names_it_and_make_peers(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(KvwiseError, match=r"llama-cpp-python.*make peers"):
        kv_peers.check_available(kv_peers.parse_peers("llamacpp:q4_0"))


# -- a real run on the bundled model --------------------------------------------------------

CTX, CONT, SINK, WINDOW = 64, 16, 4, 16
STREAMING = KVCompression("streaming", SINK, WINDOW)
FASTGEN_NEUTRAL = KVCompression("fastgen", recovery_threshold=1.0)
FASTGEN = KVCompression("fastgen", recovery_threshold=0.8)


@pytest.fixture(scope="module")
def kv_run(llm):
    """The session engine (fp32 weights, float32 KV) is the baseline; float16 and int8 get
    engines of their own with the same flags."""
    from kvwise import LLM

    def make_llm(kv_cache_dtype: str):
        if kv_cache_dtype == "float32":
            return llm
        return LLM("smollm2-135m", threads=2, max_model_len=2048, kv_cache_memory="64MiB",
                   max_num_batched_tokens=256, weight_dtype="fp32", kv_cache_dtype=kv_cache_dtype)

    settings = [KVSetting("float32"), KVSetting("float32", STREAMING),
                KVSetting("float32", FASTGEN_NEUTRAL), KVSetting("float32", FASTGEN),
                KVSetting("float16"), KVSetting("int8")]
    results, windows, base = measure_kvwise(make_llm, pydoc_text()[:20000], CTX, CONT, 1,
                                            settings)
    return {r.setting: r for r in results}, windows, base


def test_baseline_ppl_equals_an_independent_full_forward(llm, kv_run):
    results, windows, base = kv_run
    r = results["kvwise/kv=float32"]
    ((ctx, cont),) = windows
    assert (len(ctx), len(cont)) == (CTX, CONT)
    # one prefill of context + continuation: position p's logits predict token p + 1
    logits = prompt_logits(llm.engine, ctx + cont)[CTX - 1:-1]  # [CONT, V]
    nll, argmax = score_rows(logits, cont)
    ref = math.exp(nll.mean().item())
    print(f"teacher-forced ppl {r.ppl:.6f}, full forward {ref:.6f}")
    assert r.ppl == pytest.approx(ref, rel=1e-4)
    assert (r.greedy_agreement, r.kept_fraction, r.kv_bytes_ratio) == (1.0, 1.0, 1.0)
    assert (argmax == base[0]).float().mean().item() >= 15 / 16  # decode vs prefill kernels
    # the pseudo-requests gave every block back (the session engine may hold other tests'
    # cached chunks, of this very text too, so "cached nothing" is not checked here)
    assert llm.stats()["num_blocks_used"] == 0


def test_narrow_formats_bytes_and_bounded_quality(llm, kv_run):
    results, _, _ = kv_run
    d = llm.engine.model_config.head_dim
    base = results["kvwise/kv=float32"]
    f16, i8 = results["kvwise/kv=float16"], results["kvwise/kv=int8"]
    assert f16.kv_bytes_ratio == pytest.approx(0.5)
    assert i8.kv_bytes_ratio == pytest.approx((d + 2) / (4 * d))  # int8 codes + fp16 scale
    print(f"ppl fp32 {base.ppl:.5f} fp16 {f16.ppl:.5f} int8 {i8.ppl:.5f}; agreement "
          f"{f16.greedy_agreement} {i8.greedy_agreement}")
    assert abs(f16.ppl / base.ppl - 1) < 0.005 and f16.greedy_agreement >= 0.9
    assert abs(i8.ppl / base.ppl - 1) < 0.03 and i8.greedy_agreement >= 0.8
    assert f16.ppl != base.ppl  # the float16 cache really was read


def _streaming_kept(seen: int, kept: int) -> int:
    """StreamingLLM's rule as the policy documents it: once the kept tokens reach
    sink + window + S, everything between the sinks and the last `window` goes."""
    return SINK + WINDOW if kept >= SINK + WINDOW + 16 else kept


def test_streaming_evicts_during_prefill_and_continuation(kv_run):
    results, _, _ = kv_run
    r = results["kvwise/kv=float32/comp=streaming:4:16"]
    kept, fractions = CTX, []
    for seen in range(CTX, CTX + CONT):  # after the prefill, then after each decode step
        kept = _streaming_kept(seen, kept + (seen > CTX))
        fractions.append(kept / seen)
    assert r.mean_kept_fraction == pytest.approx(sum(fractions) / CONT)
    assert (r.kept_fraction, r.final_kept_fraction) == pytest.approx((fractions[0],
                                                                      fractions[-1]))
    # after the prefill: 20 tokens kept, compacted into 2 of the context's 4 blocks
    assert r.kv_bytes_ratio == pytest.approx(2 / 4)
    assert r.ppl != results["kvwise/kv=float32"].ppl
    assert r.greedy_agreement < 1.0


# -- peers (only where `make peers` installed them) ----------------------------------------


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m.split(".")[0]) is not None
               and importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.skipif(not _installed("transformers", "optimum.quanto"),
                    reason="quanto peer needs transformers + optimum-quanto (make peers)")
def test_quanto_peer_baseline_matches_kvwise(llm, kv_run):
    results, windows, base = kv_run
    out = {r.setting: r for r in kv_peers.measure_peers(
        kv_peers.parse_peers("quanto:int4"), llm.engine.model_source, windows, base, 2)}
    hf, q4 = out["hf/fp32"], out["quanto/int4"]
    ours = results["kvwise/kv=float32"]
    print(f"hf/fp32 {hf.ppl:.6f} kvwise {ours.ppl:.6f} quanto/int4 {q4.ppl:.6f}")
    # the same fp32 weights and an fp32 cache on both sides: only kernels differ
    assert hf.ppl == pytest.approx(ours.ppl, rel=0.02)
    assert hf.greedy_agreement >= 0.9 and hf.kv_bytes_ratio == pytest.approx(1.0)
    # 4-bit codes + fp32 scale and zero point per group of 32 values: 6 bits of 32
    assert q4.kv_bytes_ratio == pytest.approx((4 + 2 * 32 / 32) / 32)
    assert q4.ppl != hf.ppl and abs(q4.ppl / hf.ppl - 1) < 0.2


@pytest.mark.skipif(not _installed("llama_cpp"),
                    reason="llamacpp peer needs llama-cpp-python (make peers)")
def test_llamacpp_peer_runs_each_cache_type(llm, kv_run):
    results, windows, base = kv_run
    out = {r.setting: r for r in kv_peers.measure_peers(
        kv_peers.parse_peers("llamacpp:q8_0"), llm.engine.model_source, windows, base, 2)}
    f16, q8 = out["llamacpp/f16"], out["llamacpp/q8_0"]
    ours = results["kvwise/kv=float32"]
    print(f"llamacpp/f16 {f16.ppl:.6f} q8_0 {q8.ppl:.6f} kvwise {ours.ppl:.6f}")
    # llama.cpp computes on the GGUF's Q4_1 weights, kvwise here on them dequantized to fp32
    assert abs(f16.ppl / ours.ppl - 1) < 0.1 and f16.greedy_agreement >= 0.7
    assert (f16.kv_bytes_ratio, q8.kv_bytes_ratio) == (0.5, 34 / 32 / 4)
    assert abs(q8.ppl / f16.ppl - 1) < 0.05


@pytest.mark.skipif(not _installed("transformers", "optimum.quanto"),
                    reason="quanto peer needs transformers + optimum-quanto (make peers)")
def test_quanto_refuses_a_context_its_key_groups_cannot_tile():
    windows = [(list(range(48)), list(range(8)))]
    with pytest.raises(KvwiseError, match="multiple of 32, got 48"):
        kv_peers.measure_peers(kv_peers.parse_peers("quanto:int4"), "unused.gguf", windows,
                               [torch.zeros(8, dtype=torch.long)], 1)


def test_fastgen_axis_neutral_and_compressing(kv_run):
    """fastgen:1 keeps every head full: the baseline's predictions exactly; fastgen:0.8 evicts
    right after the prefill (its profile) and so predicts differently."""
    results, _, _ = kv_run
    base = results["kvwise/kv=float32"]
    neutral = results["kvwise/kv=float32/comp=fastgen:1"]
    assert (neutral.ppl, neutral.greedy_agreement, neutral.kept_fraction) == (base.ppl, 1.0, 1.0)
    r = results["kvwise/kv=float32/comp=fastgen:0.8"]
    assert r.kept_fraction < 1.0 and r.final_kept_fraction < 1.0
    assert r.ppl != base.ppl

