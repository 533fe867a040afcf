"""Bad input gets a clear error naming the field, and the engine keeps serving."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvwise import LLM, SamplingParams
from kvwise.config import EngineConfig
from kvwise.errors import ConfigError, InvalidRequestError, ModelNotFoundError


@pytest.fixture(scope="module")
def small():
    return LLM("smollm2-135m", threads=2, max_model_len=64, num_blocks=8, block_size=16)


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(small, prompt):
    with pytest.raises(InvalidRequestError) as e:
        small.generate([prompt], SamplingParams(max_tokens=4), use_tqdm=False)
    assert e.value.param == "prompt"


@pytest.mark.parametrize("extra,ok", [(-1, True), (0, True), (1, False)])
def test_context_limit_boundary(small, extra, ok):
    """prompt + max_tokens at max_model_len - 1, == and + 1."""
    prompt = [100] * 40
    params = SamplingParams(max_tokens=64 - 40 + extra, ignore_eos=True)
    if ok:
        out = small.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == 64 - 40 + extra and out.finish_reason == "length"
    else:
        with pytest.raises(InvalidRequestError) as e:
            small.generate([prompt], params, use_tqdm=False)
        assert e.value.param == "max_tokens" and "max_model_len=64" in str(e.value)


def test_prompt_alone_over_limit(small):
    with pytest.raises(InvalidRequestError) as e:
        small.generate([[5] * 64], SamplingParams(max_tokens=1), use_tqdm=False)
    assert e.value.param == "prompt" and "64" in str(e.value)


def test_token_ids_outside_vocab(small):
    with pytest.raises(InvalidRequestError) as e:
        small.generate([[1, 2, 49152]], SamplingParams(max_tokens=1), use_tqdm=False)
    assert e.value.param == "prompt"


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_p=2.0), "min_p"), (dict(logprobs=99), "logprobs"), (dict(stop=[""]), "stop"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_invalid_sampling_values(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_bad_request_in_batch_queues_nothing_and_engine_keeps_serving(small):
    with pytest.raises(InvalidRequestError):
        small.generate(["hello", ""], SamplingParams(max_tokens=2), use_tqdm=False)
    assert small.stats()["num_waiting"] == 0 and small.stats()["num_blocks_used"] == 0
    out = small.generate(["hello"], SamplingParams(max_tokens=2, ignore_eos=True),
                         use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    small.engine.check_integrity()


def test_pool_too_small_for_request(small):
    # 8 blocks x 16 = 128 slots; max_model_len 64 always fits, so use a wider engine limit
    llm = LLM("smollm2-135m", threads=2, max_model_len=512, num_blocks=4, block_size=16)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[7] * 10], SamplingParams(max_tokens=100), use_tqdm=False)
    assert e.value.param == "max_tokens" and "KV blocks" in str(e.value)


def test_unknown_model_and_bad_config():
    with pytest.raises(ModelNotFoundError):
        LLM("no-such-model-xyz")
    with pytest.raises(ConfigError) as e:
        EngineConfig(block_size=3)
    assert e.value.param == "block_size"
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_kwargs(max_num_seq=4)
    assert e.value.param == "max_num_seq"
    with pytest.raises(ConfigError) as e:
        EngineConfig(kv_cache_dtype="fp8")
    assert e.value.param == "kv_cache_dtype" and "float16" in str(e.value)
    assert EngineConfig(dtype="bfloat16").resolved_kv_cache_dtype == "bfloat16"
    with pytest.raises(ConfigError) as e:
        EngineConfig(activation_quant="int4", weight_dtype="int4")
    assert e.value.param == "activation_quant" and "int8" in str(e.value)
    with pytest.raises(ConfigError, match="int4 layers") as e:
        EngineConfig(activation_quant="int8", weight_dtype="int8")
    assert e.value.param == "activation_quant"
    with pytest.raises(ConfigError, match="CPU"):
        EngineConfig(activation_quant="int8", weight_dtype="int4", device="cuda")
    EngineConfig(activation_quant="int8", weight_dtype="fp32", lm_head_dtype="int4")
    assert EngineConfig(kv_cache_dtype="float16").resolved_kv_cache_dtype == "float16"


def test_cli_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    for args in (["--model", "no-such-model-xyz"], ["--model", str(bad)],
                 ["--temperature", "-1"]):
        proc = subprocess.run([sys.executable, "-m", "kvwise.cli", "generate", "--prompt", "hi",
                               "--max-tokens", "2", *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("kwargs,param", [
    (dict(top_p=1e-300), "top_p"), (dict(top_p=5e-324), "top_p"),  # 0 in float32
    (dict(top_p=1e-40), "top_p"),  # a float32 subnormal: flushed to 0 under FTZ
    (dict(top_p=float("inf")), "top_p"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1e39), "temperature"),  # inf in float32
    (dict(min_p=float("nan")), "min_p"), (dict(min_p=-1e-300), "min_p"),
    (dict(seed=2**64), "seed"), (dict(seed=-(2**63) - 1), "seed"), (dict(seed=1.5), "seed"),
    (dict(top_k=2**31), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=-0.5), "top_k"),
    (dict(max_tokens=2**31), "max_tokens"), (dict(max_tokens=True), "max_tokens"),
    (dict(n=True), "n"), (dict(n=129), "n"), (dict(stop_token_ids=[2**40]), "stop_token_ids"),
    (dict(temperature=10**400), "temperature"), (dict(top_p="0.5"), "top_p"),
])
def test_sampling_values_are_judged_in_float32_and_integer_ranges(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


@pytest.mark.parametrize("kwargs", [
    dict(top_p=1e-30), dict(top_p=1), dict(temperature=1e30), dict(temperature=5e-324),
    dict(seed=-(2**63)), dict(seed=2**64 - 1), dict(top_k=-(2**70)), dict(min_p=5e-324),
])
def test_extreme_but_valid_sampling_values_are_accepted(kwargs):
    SamplingParams(**kwargs)
