"""GGUF reading: SmolLM2 against HF transformers' GGUF loader; every tensor type against
independent dequantizers; Q/K un-permute; rope scaling; corrupt files."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from kvwise.errors import ModelNotFoundError, WeightLoadError
from kvwise.model.gguf_dequant import dequantize, dequantize_reference
from kvwise.model.gguf_reader import GGUFReaderKV, gguf_to_hf_name, unpermute_qk

# ---- SmolLM2 against transformers' GGUF loader ---------------------------------------------


def test_smollm2_config_matches_hf(smollm_gguf: str, hf_model) -> None:
    ours = GGUFReaderKV(smollm_gguf).config
    hf = hf_model.config
    assert ours.arch == hf.model_type == "llama"
    assert ours.vocab_size == hf.vocab_size
    assert ours.hidden_size == hf.hidden_size
    assert ours.intermediate_size == hf.intermediate_size
    assert ours.num_layers == hf.num_hidden_layers
    assert ours.num_heads == hf.num_attention_heads
    assert ours.num_kv_heads == hf.num_key_value_heads
    assert ours.head_dim == hf.head_dim
    assert ours.rms_norm_eps == hf.rms_norm_eps
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.rope_scaling is None and hf.rope_parameters["rope_type"] == "default"
    assert ours.max_position_embeddings == hf.max_position_embeddings
    assert ours.tie_word_embeddings == hf.tie_word_embeddings is True
    assert ours.attention_bias == hf.attention_bias is False
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_ids[0] == hf.eos_token_id


def test_smollm2_weights_match_hf(ours_smollm, hf_model) -> None:
    ref = hf_model.state_dict()
    ours = ours_smollm.weights
    # tied: HF lists lm_head.weight as an alias of the embedding; we leave it out
    assert set(ref) - set(ours) == {"lm_head.weight"} and set(ours) <= set(ref)
    worst = 0.0
    for name, w in ours.items():
        assert w.dtype == torch.float32 and w.is_contiguous(), name
        assert w.shape == ref[name].shape, name
        # numpy: single-threaded, so a CPU shared with other jobs does not stall it
        worst = max(worst, float(np.abs(w.numpy() - ref[name].numpy()).max()))
    print(f"max |ours - hf| over {len(ours)} SmolLM2 tensors: {worst:.3g}")
    assert worst <= 1e-6


def test_raw_tensor_is_a_view_and_dequantizes_to_tensor(smollm_gguf: str) -> None:
    reader = GGUFReaderKV(smollm_gguf)
    for name in ("model.layers.3.mlp.up_proj.weight", "model.embed_tokens.weight",
                 "model.layers.3.self_attn.q_proj.weight", "model.norm.weight"):
        raw = reader.raw_tensor(name)
        assert raw.data.dtype == np.uint8 and raw.data.ndim == 2
        block, size = GGML_QUANT_SIZES[raw.ggml_type]
        assert raw.data.size == math.prod(raw.shape) // block * size
        full = torch.from_numpy(dequantize(raw.data, raw.ggml_type).reshape(raw.shape))
        assert torch.equal(full, reader.tensor(name)), name
    # unpermuted tensors are not copied: a quantized model never needs an fp32 copy
    up = reader.raw_tensor("model.layers.3.mlp.up_proj.weight")
    assert up.ggml_type == T.Q4_1 and up.shape == (1536, 576)
    assert np.shares_memory(up.data, reader._bytes)


# ---- dequantization against independent computations ---------------------------------------


def _random_blocks(rng: np.random.Generator, qtype: T, nblocks: int) -> np.ndarray:
    """Random blocks whose fp16 scales are finite (random bytes could be NaN/inf)."""
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(nblocks, size), dtype=np.uint8)
    if qtype in (T.F16, T.BF16, T.F32):
        vals = rng.standard_normal(nblocks).astype(np.float32)
        dt = {T.F16: np.float16, T.F32: np.float32}.get(qtype)
        if dt is not None:
            return vals.astype(dt).view(np.uint8).reshape(nblocks, size)
        return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(nblocks, 2)
    n_scales = 2 if qtype == T.Q4_1 else 1
    scales = (rng.standard_normal((nblocks, n_scales)) * 0.05).astype(np.float16)
    data[:, : 2 * n_scales] = scales.view(np.uint8)
    return data


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1])
def test_fast_dequant_bit_identical_to_gguf_reference(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    block = GGML_QUANT_SIZES[qtype][0]
    raw = _random_blocks(rng, qtype, 4 * 64 // block * 8).reshape(4, -1)  # 4 rows of 512 values
    ours = dequantize(raw, qtype)
    ref = dequantize_reference(raw, qtype)
    assert ours.shape == ref.shape == (4, 512) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def _ref_q8_0(b: np.ndarray) -> np.ndarray:
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    return b[:, 2:].copy().view(np.int8).astype(np.float32) * d


def _ref_q4_0(b: np.ndarray) -> np.ndarray:  # ggml-quants.c dequantize_row_q4_0
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    out = np.empty((b.shape[0], 32), np.float32)
    for j in range(16):
        out[:, j] = ((b[:, 2 + j] & 0xF).astype(np.int32) - 8) * d[:, 0]
        out[:, j + 16] = ((b[:, 2 + j] >> 4).astype(np.int32) - 8) * d[:, 0]
    return out


def _ref_q4_1(b: np.ndarray) -> np.ndarray:  # ggml-quants.c dequantize_row_q4_1
    dm = b[:, :4].copy().view(np.float16).astype(np.float32)
    out = np.empty((b.shape[0], 32), np.float32)
    for j in range(16):
        out[:, j] = (b[:, 4 + j] & 0xF) * dm[:, 0] + dm[:, 1]
        out[:, j + 16] = (b[:, 4 + j] >> 4) * dm[:, 0] + dm[:, 1]
    return out


def _scale_min_k4(j: int, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = s.astype(np.int32)
    if j < 4:
        return s[:, j] & 63, s[:, j + 4] & 63
    return ((s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4),
            (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4))


def _ref_q4_k(b: np.ndarray) -> np.ndarray:  # ggml-quants.c dequantize_row_q4_K
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
    scales, qs = b[:, 4:16], b[:, 16:].astype(np.int32)
    out = []
    for j in range(4):
        sc1, m1 = _scale_min_k4(2 * j, scales)
        sc2, m2 = _scale_min_k4(2 * j + 1, scales)
        q = qs[:, 32 * j : 32 * j + 32]
        out.append((d * sc1)[:, None] * (q & 0xF) - (dmin * m1)[:, None])
        out.append((d * sc2)[:, None] * (q >> 4) - (dmin * m2)[:, None])
    return np.concatenate(out, axis=1).astype(np.float32)


def _ref_q6_k(b: np.ndarray) -> np.ndarray:  # ggml-quants.c dequantize_row_q6_K
    ql, qh = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
    y = np.empty((b.shape[0], 256), np.float32)
    for half in range(2):
        l_ = ql[:, 64 * half : 64 * half + 64]
        h = qh[:, 32 * half : 32 * half + 32]
        s = sc[:, 8 * half : 8 * half + 8]
        for l in range(32):  # noqa: E741 - the C loop variable
            i = l // 16
            q1 = ((l_[:, l] & 0xF) | (((h[:, l] >> 0) & 3) << 4)) - 32
            q2 = ((l_[:, l + 32] & 0xF) | (((h[:, l] >> 2) & 3) << 4)) - 32
            q3 = ((l_[:, l] >> 4) | (((h[:, l] >> 4) & 3) << 4)) - 32
            q4 = ((l_[:, l + 32] >> 4) | (((h[:, l] >> 6) & 3) << 4)) - 32
            base = 128 * half
            y[:, base + l] = d[:, 0] * s[:, i] * q1
            y[:, base + l + 32] = d[:, 0] * s[:, i + 2] * q2
            y[:, base + l + 64] = d[:, 0] * s[:, i + 4] * q3
            y[:, base + l + 96] = d[:, 0] * s[:, i + 6] * q4
    return y


_SCALAR_REFS = {T.Q8_0: _ref_q8_0, T.Q4_0: _ref_q4_0, T.Q4_1: _ref_q4_1, T.Q4_K: _ref_q4_k,
                T.Q6_K: _ref_q6_k}


def _hf_dequant(raw: np.ndarray, qtype: T) -> np.ndarray:
    """transformers' torch dequantizer (integrations/gguf/dequant.py): a third implementation."""
    dq = pytest.importorskip("transformers.integrations.gguf.dequant")
    flat = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1))
    return dq.dequantize(flat, int(qtype)).numpy().reshape(raw.shape[0], -1)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K])
def test_every_type_through_a_gguf_file(tiny_gguf, qtype: T) -> None:
    """Write a model whose linear weights are all `qtype`; read them back through the reader."""
    linear = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    types = {f"blk.0.{n}.weight": qtype for n in linear} | {"token_embd.weight": qtype}
    out = tiny_gguf(types=types, seed=int(qtype))
    reader = GGUFReaderKV(out["path"])
    heads = {"attn_q": out["config"]["heads"], "attn_k": out["config"]["kv_heads"]}
    for gname, (stored_type, data) in out["stored"].items():
        if gname not in types:
            continue
        assert reader.tensor_infos[gname].ggml_type == qtype == stored_type
        hf_name = gguf_to_hf_name(gname)
        got = reader.tensor(hf_name).numpy()
        blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, GGML_QUANT_SIZES[qtype][1])
        if qtype in _SCALAR_REFS:
            expected = _SCALAR_REFS[qtype](blocks).reshape(got.shape)
            np.testing.assert_array_equal(_hf_dequant(blocks, qtype).reshape(got.shape),
                                          expected)
        elif qtype == T.BF16:
            expected = (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            expected = np.asarray(data, dtype=np.float32)
        expected = expected.reshape(got.shape)
        short = gname.split(".")[-2]
        if short in heads:  # the file holds llama.cpp's permuted rows
            expected = unpermute_qk(expected, heads[short])
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=gname)
        original = out["hf"][hf_name]
        if original is not None:  # quantization error bound: within one step of the scale
            step = {T.Q8_0: 1 / 127, T.Q4_0: 1 / 7, T.Q4_1: 1 / 15, T.F16: 1e-3,
                    T.BF16: 1e-2, T.F32: 0.0}[qtype]
            assert np.abs(got - original).max() <= step * np.abs(original).max() + 1e-7


# ---- Q/K layout, architectures, rope -------------------------------------------------------


@pytest.mark.parametrize("heads,shape", [(9, (576, 576)), (3, (192, 576)), (4, (256,))])
def test_unpermute_inverts_llama_cpp_permute(llama_cpp_permute, heads: int, shape: tuple) -> None:
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, heads), heads), w)
    t = torch.from_numpy(llama_cpp_permute(w, heads))
    assert torch.equal(unpermute_qk(t, heads), torch.from_numpy(w))
    assert not np.array_equal(llama_cpp_permute(w, heads), w)


def test_llama_qk_unpermuted_qwen2_left_alone(tiny_gguf) -> None:
    llama = tiny_gguf(filename="llama.gguf", bias=True)
    reader = GGUFReaderKV(llama["path"])
    assert reader.config.arch == "llama" and reader.config.attention_bias
    for name, values in llama["hf"].items():
        np.testing.assert_array_equal(reader.tensor(name).numpy(), values, err_msg=name)
    qwen = tiny_gguf(arch="qwen2", filename="qwen2.gguf", bias=True, tied=False)
    reader = GGUFReaderKV(qwen["path"])
    c = reader.config
    assert (c.arch, c.attention_bias, c.tie_word_embeddings) == ("qwen2", True, False)
    weights = reader.load_weights()
    assert set(weights) == set(qwen["hf"]) and "lm_head.weight" in weights
    assert "model.layers.0.self_attn.q_proj.bias" in weights
    for name, values in qwen["hf"].items():
        np.testing.assert_array_equal(weights[name].numpy(), values, err_msg=name)


def test_mistral_named_llama_file_is_mistral(tiny_gguf) -> None:
    out = tiny_gguf(name="Mistral 7B Instruct v0.3")
    assert GGUFReaderKV(out["path"]).config.arch == "mistral"


def test_linear_rope_scaling_from_metadata(tiny_gguf) -> None:
    out = tiny_gguf(extra_kv={"llama.rope.scaling.type": "linear",
                              "llama.rope.scaling.factor": 4.0})
    assert GGUFReaderKV(out["path"]).config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("factor,low,high", [(32.0, 1.0, 4.0), (8.0, 1.0, 4.0), (16.0, 2.0, 8.0)])
def test_llama3_rope_scaling_recovered_from_rope_freqs(tiny_gguf, factor, low, high) -> None:
    """The converter stores llama3 scaling only as per-frequency divisors; HF's own llama3 init
    must give the same inverse frequencies from the dict we recover."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, hidden, heads = 500000.0, 256, 2  # head_dim 128, as in Llama 3
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
               "high_freq_factor": high, "original_max_position_embeddings": 8192}

    def hf_inv_freq(rope_scaling):
        cfg = transformers.LlamaConfig(hidden_size=hidden, num_attention_heads=heads,
                                       max_position_embeddings=131072,
                                       rope_parameters={"rope_theta": theta, **(rope_scaling or
                                                        {"rope_type": "default"})})
        kind = (rope_scaling or {}).get("rope_type", "default")
        if kind == "default":
            dim = hidden // heads
            return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")[0].double()

    base = hf_inv_freq(None)
    divisors = (base / hf_inv_freq(scaling)).numpy()
    out = tiny_gguf(hidden=hidden, heads=heads, kv_heads=1, rope_freqs=divisors,
                    rope_theta=theta)
    got = GGUFReaderKV(out["path"]).config.rope_scaling
    assert got["rope_type"] == "llama3" and got["factor"] == factor
    torch.testing.assert_close(hf_inv_freq(got), hf_inv_freq(scaling), rtol=1e-5, atol=0)
    assert (got["low_freq_factor"], got["high_freq_factor"]) == pytest.approx((low, high),
                                                                               rel=1e-3)


# ---- errors ---------------------------------------------------------------------------------


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError):
        GGUFReaderKV(str(tmp_path / "nope.gguf"))


def test_bad_magic(tiny_gguf) -> None:
    path = tiny_gguf()["path"]
    with open(path, "r+b") as f:
        f.write(b"GGML")
    with pytest.raises(WeightLoadError, match="magic") as e:
        GGUFReaderKV(path)
    assert path in str(e.value)


@pytest.mark.parametrize("keep", [0, 3, 100, 0.5, 0.999])
def test_truncated_file(tiny_gguf, tmp_path, keep) -> None:
    path = tiny_gguf()["path"]
    size = os.path.getsize(path)
    cut = str(tmp_path / "cut.gguf")
    shutil.copy(path, cut)
    with open(cut, "r+b") as f:
        f.truncate(int(size * keep) if isinstance(keep, float) else keep)
    with pytest.raises(WeightLoadError) as e:
        GGUFReaderKV(cut)
    assert cut in str(e.value)


def test_missing_tensor_is_named(tiny_gguf) -> None:
    path = tiny_gguf(drop=("blk.0.ffn_up.weight",))["path"]
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        GGUFReaderKV(path)


def test_unsupported_architecture(tiny_gguf) -> None:
    path = tiny_gguf(arch="gpt2")["path"]
    with pytest.raises(WeightLoadError, match="gpt2"):
        GGUFReaderKV(path)


def test_unsupported_rope_scaling_is_rejected(tiny_gguf) -> None:
    path = tiny_gguf(extra_kv={"llama.rope.scaling.type": "yarn",
                               "llama.rope.scaling.factor": 4.0})["path"]
    with pytest.raises(WeightLoadError, match="yarn"):
        GGUFReaderKV(path)


def test_inconsistent_head_counts(tiny_gguf) -> None:
    path = tiny_gguf(heads=4, kv_heads=3)["path"]
    with pytest.raises(WeightLoadError, match="num_kv_heads"):
        GGUFReaderKV(path)
