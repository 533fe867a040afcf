"""GGUF files: header parsing, metadata -> ModelConfig, tensor access and dequantization.

Owns the translation from llama.cpp's GGUF layout (spec: ggml/docs/gguf.md) to kvwise's Hugging
Face-named weights. The header is parsed by hand because `gguf.GGUFReader` builds a numpy view per
vocabulary string (~2 s for a 49k vocabulary); tensor data stays memory-mapped.

Invariants:
- The file is mapped copy-on-write and never written. `raw_tensor` returns views into the map
  (a row-permuted copy for llama Q/K), so using a quantized model never needs an fp32 copy of
  more than one tensor at a time. Dequantized tensors never alias the map.
- Every tensor's byte range lies inside the file; this is checked when the file is opened, so a
  truncated file fails before any weight is read.
- Weights come out in HF Llama naming, linear weights [out, in] like `nn.Linear`. For files whose
  `general.architecture` is "llama", Q and K rows (and biases) are un-permuted from llama.cpp's
  interleaved RoPE layout to HF's rotate-half layout (inverse of `LlamaModel.permute` in llama.cpp
  convert_hf_to_gguf.py); qwen2 files are stored un-permuted and left alone.
- Block dequantization lives in gguf_dequant.py.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, TypeVar

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kvwise.errors import ModelNotFoundError, WeightLoadError
from kvwise.model.config import ModelConfig
from kvwise.model.gguf_dequant import dequantize

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("linear", "llama3")  # see kvwise/model/rope.py

# Token texts llama.cpp treats as end-of-generation when they exist in the vocabulary
# (llama-vocab.cpp, `special_eog_ids`; ggml-org/llama.cpp#9606).
END_OF_GENERATION_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>",
)

# GGUF metadata value types (gguf.md, `gguf_metadata_value_type`) -> struct format.
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}
_TYPE_STRING, _TYPE_ARRAY = 8, 9

# GGUF tensor name -> HF name; per-layer names are "blk.{i}.<key>" -> "model.layers.{i}.<value>".
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Tensors that carry no HF weight: rope_freqs becomes config.rope_scaling (llama3).
_IGNORED_TENSORS = ("rope_freqs.weight",)


class RawTensor(NamedTuple):
    """Stored bytes of a tensor: `data` uint8 [rows, row_bytes]; `shape` the logical shape."""

    ggml_type: GGMLQuantizationType
    data: np.ndarray
    shape: tuple[int, ...]


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: [rows, cols] for a linear weight (GGUF ne reversed)
    offset: int  # absolute byte offset in the file
    nbytes: int


def gguf_to_hf_name(name: str) -> Optional[str]:
    """HF name of a GGUF tensor, or None when kvwise has no such weight."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def expected_weight_names(config: ModelConfig) -> list[str]:
    """Every HF weight name a model with `config` needs (no lm_head when embeddings are tied)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        names += [f"model.layers.{i}.{n}" for n in _LAYER_NAMES.values()
                  if config.attention_bias or not n.endswith(".bias")]
    return names


ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def unpermute_qk(w: ArrayT, num_heads: int) -> ArrayT:
    """Undo llama.cpp's Q/K row permutation: per head, rows [D/2, 2] -> [2, D/2] (a copy)."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Cursor:
    """Little-endian reader over the mapped header."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise WeightLoadError(f"string of {n} bytes runs past the end of the file")
        s = self.buf[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _TYPE_STRING:
            return self.string()
        if vtype == _TYPE_ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == _TYPE_STRING:
                return [self.string() for _ in range(count)]
            if etype in _SCALAR_FORMATS:
                dt = np.dtype(_SCALAR_FORMATS[etype].replace("?", "b1"))
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += dt.itemsize * count
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]  # nested arrays
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        raise WeightLoadError(f"unknown metadata value type {vtype} at byte {self.pos}")


def _parse_header(buf: mmap.mmap) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    cur = _Cursor(buf)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise WeightLoadError(f"bad magic {bytes(buf[:4])!r}, expected {GGUF_MAGIC!r}")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise WeightLoadError(f"unsupported GGUF version {version} (big-endian or v1 file?)")
    num_tensors, num_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(num_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    raw_infos = []
    for _ in range(num_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        raw_infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    infos = []
    for name, dims, type_id, offset in raw_infos:
        try:
            ggml_type = GGMLQuantizationType(type_id)
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError) as e:
            raise WeightLoadError(f"tensor {name!r} has unknown ggml type {type_id}") from e
        n_elements = math.prod(dims)
        if dims and dims[0] % block_size:
            raise WeightLoadError(f"tensor {name!r}: row length {dims[0]} is not a multiple of "
                                  f"the {ggml_type.name} block size {block_size}")
        nbytes = n_elements // block_size * type_size
        infos.append(GGUFTensorInfo(name, ggml_type, tuple(reversed(dims)), data_start + offset,
                                    nbytes))
    return metadata, infos


class GGUFReaderKV:
    """One open GGUF file: metadata, ModelConfig, and HF-named tensors (dequantized or raw)."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        self.path = path
        with open(path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError as e:  # empty file
                raise WeightLoadError(f"{path}: cannot map file ({e})") from e
        try:
            self.metadata, infos = _parse_header(self._map)
        except WeightLoadError as e:
            raise WeightLoadError(f"{path}: {e}") from e
        except (struct.error, ValueError, IndexError, MemoryError) as e:
            raise WeightLoadError(f"{path}: header is truncated or corrupt ({e})") from e
        size = len(self._map)
        for info in infos:
            if info.offset + info.nbytes > size:
                raise WeightLoadError(
                    f"{path}: truncated: tensor {info.name!r} needs bytes "
                    f"[{info.offset}, {info.offset + info.nbytes}) but the file has {size}")
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)  # [file size]
        self.tensor_infos: dict[str, GGUFTensorInfo] = {i.name: i for i in infos}
        self.file_arch = str(self.metadata.get("general.architecture", ""))
        try:
            self.config = self._build_config()
        except (ValueError, TypeError, ZeroDivisionError) as e:  # e.g. heads % kv heads != 0
            raise WeightLoadError(f"{path}: inconsistent metadata ({e})") from e
        self._hf_to_gguf: dict[str, str] = {}
        for name in self.tensor_infos:
            hf = gguf_to_hf_name(name)
            if hf is not None:
                self._hf_to_gguf[hf] = name
            elif not name.endswith(_IGNORED_TENSORS):
                raise WeightLoadError(f"{path}: unsupported tensor {name!r} (architecture variant "
                                      f"kvwise does not implement)")
        self._check_weights_present()

    def _meta(self, key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{self.file_arch}.{key}"
        if full in self.metadata:
            return self.metadata[full]
        if required:
            raise WeightLoadError(f"{self.path}: metadata key {full!r} is missing")
        return default

    def _build_config(self) -> ModelConfig:
        md = self.metadata
        name = str(md.get("general.name", "")).lower()
        # llama.cpp writes Mistral as "llama"; transformers tells them apart by name, as do we.
        arch = "mistral" if self.file_arch == "llama" and "mistral" in name else self.file_arch
        if arch not in SUPPORTED_ARCHS:
            raise WeightLoadError(f"{self.path}: architecture {self.file_arch!r} is not supported "
                                  f"(supported: {', '.join(SUPPORTED_ARCHS)})")
        hidden = int(self._meta("embedding_length", required=True))
        num_heads = int(self._meta("attention.head_count", required=True))
        num_kv = int(self._meta("attention.head_count_kv", num_heads))
        tokens = md.get("tokenizer.ggml.tokens")
        embd = self.tensor_infos.get("token_embd.weight")
        vocab = self._meta("vocab_size") or (len(tokens) if tokens else None)
        vocab = vocab or (embd.shape[0] if embd else 0)
        bos = md.get("tokenizer.ggml.bos_token_id")
        return ModelConfig(
            arch=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._meta("feed_forward_length", required=True)),
            num_layers=int(self._meta("block_count", required=True)),
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=int(self._meta("attention.key_length", hidden // num_heads)),
            rms_norm_eps=float(self._meta("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self._meta("rope.freq_base", 10000.0)),
            rope_scaling=check_rope_scaling(self._rope_scaling(), self.path),
            max_position_embeddings=int(self._meta("context_length", 4096)),
            tie_word_embeddings="output.weight" not in self.tensor_infos,
            attention_bias="blk.0.attn_q.bias" in self.tensor_infos,
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=gguf_end_of_generation_ids(md),
        )

    def _rope_scaling(self) -> Optional[dict[str, Any]]:
        if "rope_freqs.weight" in self.tensor_infos:
            info = self.tensor_infos["rope_freqs.weight"]
            raw = self._bytes[info.offset : info.offset + info.nbytes].reshape(1, -1)
            factors = dequantize(raw, info.ggml_type).reshape(-1).astype(np.float64)  # [D/2]
            return _fit_llama3_rope_scaling(factors, float(self._meta("rope.freq_base", 10000.0)),
                                            self.path)
        kind = self._meta("rope.scaling.type")
        factor = self._meta("rope.scaling.factor") or self._meta("rope.scale_linear")
        if kind == "none" or (kind is None and factor is None):
            return None
        if kind in (None, "linear"):
            return {"rope_type": "linear", "factor": float(factor)}
        scaling: dict[str, Any] = {"rope_type": str(kind), "factor": float(factor or 1.0)}
        orig = self._meta("rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        return scaling

    def _check_weights_present(self) -> None:
        missing = [n for n in expected_weight_names(self.config) if n not in self._hf_to_gguf]
        if missing:
            raise WeightLoadError(f"{self.path}: {len(missing)} tensors missing, e.g. "
                                  f"{', '.join(missing[:5])}")

    def hf_names(self) -> list[str]:
        """HF names of all weights in the file, in file order."""
        return list(self._hf_to_gguf)

    def _info(self, name: str) -> GGUFTensorInfo:
        gguf_name = self._hf_to_gguf.get(name, name)
        if gguf_name not in self.tensor_infos:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self.tensor_infos[gguf_name]

    def _qk_heads(self, info: GGUFTensorInfo) -> Optional[int]:
        """Head count to un-permute this tensor's rows with, or None if it is not permuted."""
        if self.file_arch != "llama":
            return None
        if ".attn_q." in info.name:
            return self.config.num_heads
        if ".attn_k." in info.name:
            return self.config.num_kv_heads
        return None

    def raw_tensor(self, name: str) -> RawTensor:
        """Stored bytes of a tensor (HF or GGUF name) without dequantizing.

        `data` is a view into the file map, except for Q/K of llama files, whose rows are
        un-permuted into a copy so that row r of `data` is row r of the HF weight.
        """
        info = self._info(name)
        data = self._bytes[info.offset : info.offset + info.nbytes]
        rows = math.prod(info.shape[:-1]) if len(info.shape) > 1 else 1
        data = data.reshape(rows, -1)  # [rows, row_bytes]
        heads = self._qk_heads(info)
        if heads is not None and len(info.shape) == 1:
            # a Q/K bias: permute its elements (block size 1 for the float types biases use)
            assert GGML_QUANT_SIZES[info.ggml_type][0] == 1, f"quantized bias {info.name}"
            data = unpermute_qk(data.reshape(info.shape[0], -1), heads).reshape(1, -1)
        elif heads is not None:
            data = unpermute_qk(data, heads)
        return RawTensor(info.ggml_type, data, info.shape)

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized tensor (HF or GGUF name) in `dtype`, Q/K un-permuted, contiguous."""
        raw = self.raw_tensor(name)  # rows already un-permuted
        w = torch.from_numpy(dequantize(raw.data, raw.ggml_type).reshape(raw.shape))
        return w if dtype == torch.float32 else w.to(dtype)

    def load_weights(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """All weights by HF name, in `expected_weight_names` order (no lm_head when tied)."""
        return {name: self.tensor(name, dtype) for name in expected_weight_names(self.config)}

    def lazy_weights(self, dtype: torch.dtype = torch.float32) -> LazyGGUFWeights:
        """The same names as `load_weights`, each dequantized only when taken."""
        return LazyGGUFWeights(self, dtype)


class LazyGGUFWeights(Mapping[str, torch.Tensor]):
    """HF-named weights of an open GGUF file, dequantized one tensor at a time on access.

    Lets a loader that quantizes (kvwise.model.quant) read raw blocks with `raw(name)` and never
    hold an fp32 copy of the whole model. `pop` returns the tensor and forgets the name.
    """

    def __init__(self, reader: GGUFReaderKV, dtype: torch.dtype) -> None:
        self.reader = reader
        self.dtype = dtype
        self._names = dict.fromkeys(expected_weight_names(reader.config))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self.reader.tensor(name, self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def pop(self, name: str) -> torch.Tensor:
        tensor = self[name]
        del self._names[name]
        return tensor

    def raw(self, name: str) -> RawTensor:
        """Stored blocks of `name` (Q/K rows un-permuted), see GGUFReaderKV.raw_tensor."""
        return self.reader.raw_tensor(name)


def check_rope_scaling(scaling: Optional[dict[str, Any]], source: str) -> Optional[dict]:
    """`scaling` if kvwise's RoPE implements it (ModelConfig's invariant), else WeightLoadError."""
    if scaling is not None and scaling.get("rope_type") not in SUPPORTED_ROPE_TYPES:
        raise WeightLoadError(f"{source}: rope scaling {scaling.get('rope_type')!r} is not "
                              f"supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return scaling


def gguf_end_of_generation_ids(metadata: dict[str, Any]) -> tuple[int, ...]:
    """Ids that end generation: eos, eot, eom from metadata, then llama.cpp's by-text list."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    types = metadata.get("tokenizer.ggml.token_type") or []
    wanted = set(END_OF_GENERATION_TEXTS)
    for i, (text, ttype) in enumerate(zip(tokens, types)):
        # 3 = CONTROL, 4 = USER_DEFINED (gguf TokenType)
        if ttype in (3, 4) and text in wanted and i not in ids:
            ids.append(i)
    return tuple(ids)


def _llama3_factors(inv_freq: np.ndarray, factor: float, low: float, high: float,
                    orig: float) -> np.ndarray:
    """Divisors llama.cpp stores in rope_freqs (convert_hf_to_gguf.py, LlamaModel)."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def _fit_llama3_rope_scaling(factors: np.ndarray, theta: float, path: str) -> Optional[dict]:
    """Recover HF llama3 rope_scaling from the per-frequency divisors in `rope_freqs.weight`.

    The divisors depend on (factor, orig/(high-low), low/(high-low)) only, so any
    `original_max_position_embeddings` reproduces them; we take Llama 3's 8192 and solve for
    low/high from the linear smooth region (HF `_compute_llama3_parameters`).
    """
    factor = round(float(factors.max()), 4)  # stored as float32; real factors are 8, 32, ...
    if factor <= 1.0 + 1e-6:
        return None
    dim = 2 * len(factors)
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # [D/2]
    orig = 8192.0
    mid = (factors > 1 + 1e-4) & (factors < factor - 1e-4)
    low, high = 1.0, 4.0
    if mid.sum() >= 2:
        smooth = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(inv_freq[mid], smooth, 1)
        span = orig / (slope * 2 * math.pi)  # high - low
        low = -intercept * span
        high = low + span
        low, high = round(low, 4), round(high, 4)
    if not np.allclose(_llama3_factors(inv_freq, factor, low, high, orig), factors, rtol=1e-3):
        raise WeightLoadError(f"{path}: rope_freqs.weight does not match llama3 rope scaling")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": int(orig)}
