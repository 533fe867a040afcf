"""`--weight-dtype auto` (the default): a GGUF's own blocks in the kvwise format that holds them
exactly (Q4_0/Q4_1 -> int4, Q8_0 -> int8, else fp32), resolved at load time, config untouched."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from kvwise import LLM, SamplingParams
from kvwise.config import EngineConfig
from kvwise.engine.model_setup import WeightFormats, resolve_weight_formats
from kvwise.errors import ConfigError
from kvwise.model.gguf_reader import GGUFReaderKV
from kvwise.model.llama import projection_weight_names
from tests.conftest import GGUF_NAME, smollm2_dir

ARGS = dict(threads=2, max_model_len=64, num_blocks=8, block_size=16)
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_bundled_gguf_is_q4_1_with_a_q8_0_embedding() -> None:
    """What the rule sees in SmolLM2-135M-Instruct.Q4_1.gguf (read with kvwise's reader)."""
    reader = GGUFReaderKV(os.path.join(smollm2_dir(), GGUF_NAME))
    types = {info.name.split(".")[-2]: info.ggml_type.name for info in
             reader.tensor_infos.values() if info.name.startswith("blk.")}
    assert {types[p] for p in PROJECTIONS} == {"Q4_1"}
    assert reader.tensor_infos["token_embd.weight"].ggml_type.name == "Q8_0"
    assert reader.config.tie_word_embeddings  # the LM head is that Q8_0 embedding


def test_default_is_auto_and_resolves_to_the_files_int4_at_load_time() -> None:
    assert EngineConfig().weight_dtype == "auto"
    auto = LLM("smollm2-135m", **ARGS)
    stats = auto.stats()
    # Q4_1 projections -> int4 (bit-exact); the head follows lm_head_dtype's rule: int8, which
    # also holds the file's Q8_0 embedding exactly
    assert (stats["weight_dtype_resolved"], stats["lm_head_dtype_resolved"]) == ("int4", "int8")
    assert auto.engine.config.weight_dtype == "auto"  # the frozen config is never rewritten
    int4 = LLM("smollm2-135m", weight_dtype="int4", **ARGS)
    assert int4.stats()["weight_dtype_resolved"] == "int4"
    assert _greedy(auto) == _greedy(int4)


def test_explicit_fp32_still_builds_dense_weights() -> None:
    fp32 = LLM("smollm2-135m", weight_dtype="fp32", **ARGS)
    stats = fp32.stats()
    assert (stats["weight_dtype_resolved"], stats["lm_head_dtype_resolved"]) == ("fp32", "fp32")
    assert all(len(t) == 6 for t in _greedy(fp32))


def _fake_gguf(types_by_projection: dict[str, str], num_layers: int = 2) -> SimpleNamespace:
    """Lazy-GGUF-like weights: only `reader.tensor_infos` with each tensor's block type."""
    infos = {}
    for i in range(num_layers):
        for proj in PROJECTIONS:
            name = f"blk.{i}.{proj}.weight"
            kind = types_by_projection.get(proj, types_by_projection.get("*", "F32"))
            infos[name] = SimpleNamespace(name=name, ggml_type=SimpleNamespace(name=kind))
        infos[f"blk.{i}.attn_norm.weight"] = SimpleNamespace(
            name=f"blk.{i}.attn_norm.weight", ggml_type=SimpleNamespace(name="F32"))
    return SimpleNamespace(reader=SimpleNamespace(tensor_infos=infos))


MC = SimpleNamespace(num_layers=2)


@pytest.mark.parametrize("types,expected", [
    ({"*": "Q4_0"}, WeightFormats("int4", "int8")),
    ({"*": "Q4_1"}, WeightFormats("int4", "int8")),
    ({"*": "Q8_0"}, WeightFormats("int8", "int8")),
    ({"*": "F16"}, WeightFormats("fp32", "fp32")),
    ({"*": "F32"}, WeightFormats("fp32", "fp32")),
    ({"*": "BF16"}, WeightFormats("fp32", "fp32")),
    ({"*": "Q4_K", "ffn_down": "Q6_K"}, WeightFormats("fp32", "fp32")),  # K-quants: not exact
    ({"*": "Q4_0", "attn_v": "Q8_0"}, WeightFormats("fp32", "fp32")),  # mixed: one format only
])
def test_auto_rule_on_gguf_block_types(types: dict[str, str], expected: WeightFormats) -> None:
    assert resolve_weight_formats(EngineConfig(), _fake_gguf(types), MC) == expected


def test_auto_rule_on_an_hf_directory_and_with_overrides() -> None:
    dense = {name: None for name in projection_weight_names(0)["qkv"]}  # dict: an HF directory
    assert resolve_weight_formats(EngineConfig(), dense, MC) == WeightFormats("fp32", "fp32")
    q4 = _fake_gguf({"*": "Q4_1"})
    assert resolve_weight_formats(EngineConfig(lm_head_dtype="fp32"), q4, MC) == \
        WeightFormats("int4", "fp32")
    assert resolve_weight_formats(EngineConfig(weight_dtype="int8"), q4, MC) == \
        WeightFormats("int8", "int8")
    assert resolve_weight_formats(EngineConfig(activation_quant="int8"), q4, MC) == \
        WeightFormats("int4", "int8")


def test_int8_activations_need_auto_to_resolve_to_int4() -> None:
    config = EngineConfig(activation_quant="int8")  # allowed: auto may resolve to int4
    with pytest.raises(ConfigError) as e:
        resolve_weight_formats(config, _fake_gguf({"*": "F16"}), MC)
    assert e.value.param == "activation_quant" and "fp32" in str(e.value)
    with pytest.raises(ConfigError) as e:
        EngineConfig(weight_dtype="fp32", activation_quant="int8")
    assert e.value.param == "activation_quant"
    with pytest.raises(ConfigError) as e:
        EngineConfig(lm_head_dtype="auto")
    assert e.value.param == "lm_head_dtype"
