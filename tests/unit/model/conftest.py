"""Fixtures for loader / GGUF / tokenizer tests: HF references loaded once, tiny model writers."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import pytest
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


BYTE_TOKENS = _bytes_to_unicode()
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`: HF rows -> GGUF rows."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.fixture(scope="session")
def llama_cpp_permute() -> Callable[[np.ndarray, int], np.ndarray]:
    return _llama_cpp_permute


@pytest.fixture(scope="session")
def smollm_gguf(gguf_path: str) -> str:
    return gguf_path


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path: str) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                      gguf_file=GGUF_NAME)


@pytest.fixture(scope="session")
def ours_smollm() -> Any:
    from kvwise.model.loader import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm_hf_dir(tmp_path_factory: pytest.TempPathFactory, hf_model: Any,
                  hf_tokenizer: Any) -> str:
    """SmolLM2 as HF transformers saves it (safetensors + tokenizer files), from the GGUF load.

    The GGUF-loaded model refuses `save_pretrained`, so its tensors are assigned (not copied)
    into a meta-initialised twin whose config lacks the GGUF quantization entry.
    """
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path_factory.mktemp("smollm2_hf"))
    cfg = copy.deepcopy(hf_model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        twin = transformers.LlamaForCausalLM(cfg)
    twin.load_state_dict(hf_model.state_dict(), assign=True)
    twin.tie_weights()
    twin.save_pretrained(out)
    hf_tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def copy_tokenizer_files(smollm_hf_dir: str) -> Callable[[str], None]:
    def copy_to(dest: str) -> None:
        for name in os.listdir(smollm_hf_dir):
            if name.startswith("tokenizer") or name.endswith(".jinja"):
                shutil.copy(os.path.join(smollm_hf_dir, name), dest)
    return copy_to


@pytest.fixture
def tiny_gguf(tmp_path: Any) -> Callable[..., dict[str, Any]]:
    """Writer of tiny random Llama-family GGUF files; returns what it stored.

    Returns {"path", "hf": HF name -> fp32 HF-layout values before quantization,
    "stored": GGUF name -> (ggml type, array written), "config": the sizes used}.
    Q/K of arch "llama" are stored permuted as llama.cpp's converter does.
    """
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    def write(*, arch: str = "llama", name: str = "tiny", hidden: int = 256, ffn: int = 256,
              layers: int = 1, heads: int = 4, kv_heads: int = 2, tied: bool = True,
              bias: bool = False, types: Optional[dict[str, T]] = None, drop: tuple = (),
              rope_freqs: Optional[np.ndarray] = None, rope_theta: float = 10000.0,
              extra_kv: Optional[dict] = None, filename: str = "tiny.gguf",
              seed: int = 0, tokenizer: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """`tokenizer` replaces the default byte-level vocabulary: keys tokens, token_types,
        model, pre, scores, merges, bos, eos, unk, add_bos, add_space_prefix, chat_template."""
        rng = np.random.default_rng(seed)
        types = types or {}
        tok = {"tokens": BYTE_TOKENS + TINY_SPECIALS,
               "token_types": [1] * 256 + [3] * len(TINY_SPECIALS), "model": "gpt2",
               "pre": "gpt2", "merges": [], "bos": 257, "eos": 258, "add_bos": False,
               **(tokenizer or {})}
        tokens = tok["tokens"]
        vocab = len(tokens)
        head_dim = hidden // heads
        path = str(tmp_path / filename)
        w = gguf.GGUFWriter(path, arch=arch)
        w.add_name(name)
        w.add_block_count(layers)
        w.add_context_length(2048)
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(ffn)
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(rope_theta)
        w.add_vocab_size(vocab)
        w.add_tokenizer_model(tok["model"])
        if tok.get("pre"):
            w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tokens)
        w.add_token_types(tok["token_types"])
        if tok.get("merges") or tok["model"] == "gpt2":
            w.add_token_merges(tok.get("merges") or [])
        if tok.get("scores"):
            w.add_token_scores(tok["scores"])
        w.add_bos_token_id(tok["bos"])
        w.add_eos_token_id(tok["eos"])
        if tok.get("unk") is not None:
            w.add_unk_token_id(tok["unk"])
        w.add_add_bos_token(tok["add_bos"])
        if tok.get("add_space_prefix") is not None:
            w.add_add_space_prefix(tok["add_space_prefix"])
        if tok.get("chat_template"):
            w.add_chat_template(tok["chat_template"])
        for key, value in (extra_kv or {}).items():
            if isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
            else:
                w.add_uint32(key, value)
        shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
        if not tied:
            shapes["output.weight"] = (vocab, hidden)
        for i in range(layers):
            b = f"blk.{i}."
            shapes.update({
                b + "attn_norm.weight": (hidden,), b + "attn_q.weight": (heads * head_dim, hidden),
                b + "attn_k.weight": (kv_heads * head_dim, hidden),
                b + "attn_v.weight": (kv_heads * head_dim, hidden),
                b + "attn_output.weight": (hidden, heads * head_dim),
                b + "ffn_norm.weight": (hidden,), b + "ffn_gate.weight": (ffn, hidden),
                b + "ffn_up.weight": (ffn, hidden), b + "ffn_down.weight": (hidden, ffn)})
            if bias:
                shapes.update({b + "attn_q.bias": (heads * head_dim,),
                               b + "attn_k.bias": (kv_heads * head_dim,),
                               b + "attn_v.bias": (kv_heads * head_dim,)})
        from kvwise.model.gguf_reader import gguf_to_hf_name

        hf: dict[str, np.ndarray] = {}
        stored: dict[str, tuple[T, np.ndarray]] = {}
        for gname, shape in shapes.items():
            if gname in drop:
                continue
            values = rng.standard_normal(shape).astype(np.float32)
            hf[gguf_to_hf_name(gname)] = values
            if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
                values = _llama_cpp_permute(values, heads if ".attn_q." in gname else kv_heads)
            qtype = types.get(gname, T.F32)
            if qtype == T.F32:
                data = values
            elif qtype == T.F16:
                data = values.astype(np.float16)
            elif qtype in (T.Q4_K, T.Q6_K):
                data = random_k_quant_blocks(rng, qtype, shape)
                hf[gguf_to_hf_name(gname)] = None  # values are defined by the raw blocks
            else:
                data = quants.quantize(values, qtype)
            stored[gname] = (qtype, data)
            w.add_tensor(gname, data, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
        if rope_freqs is not None:
            stored["rope_freqs.weight"] = (T.F32, rope_freqs.astype(np.float32))
            w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return {"path": path, "hf": hf, "stored": stored,
                "config": {"hidden": hidden, "heads": heads, "kv_heads": kv_heads,
                           "layers": layers, "ffn": ffn, "vocab": vocab}}

    return write


def random_k_quant_blocks(rng: np.random.Generator, qtype: Any, shape: tuple) -> np.ndarray:
    """Random Q4_K / Q6_K rows with finite fp16 super-block scales: uint8 [rows, row_bytes]."""
    from gguf import GGML_QUANT_SIZES

    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    scales = (rng.random((blocks.shape[0], 2)) * 0.01).astype(np.float16).view(np.uint8)
    if qtype.name == "Q4_K":  # d, dmin lead the block
        blocks[:, 0:4] = scales
    else:  # Q6_K: d is the trailing fp16
        blocks[:, -2:] = scales[:, :2]
    return blocks.reshape(rows, -1)
