"""Model loading entry point: a name, file, directory or hub id -> config, weights, tokenizer.

`load_model` resolves `model` in this order:
1. a registry name (`kvwise.model.registry`, e.g. "smollm2-135m", the default model);
2. an existing path: a `.gguf` file, or a Hugging Face directory (config.json, *.safetensors
   single or sharded via model.safetensors.index.json, tokenizer.json, tokenizer_config.json);
   a directory holding no config.json but exactly one .gguf loads that file;
3. a hub id "org/name", fetched with `huggingface_hub.snapshot_download` (json, safetensors,
   tokenizer files only).

Invariants:
- `LoadedModel.weights` uses HF Llama names, holds exactly `expected_weight_names(config)`, and
  every tensor is contiguous and in the requested dtype. With `lazy=True` a GGUF source gives a
  `LazyGGUFWeights` mapping instead of a dict (same names, dequantized on access, raw blocks via
  `.raw(name)`), so a quantizing loader never holds an fp32 copy of the model.
- `LoadedModel.config.eos_token_ids == LoadedModel.tokenizer.eos_token_ids`.
- Errors: an unresolvable name, missing path or unreachable hub repo raises ModelNotFoundError;
  a file that exists but is corrupt, truncated, unsupported or lacks tensors raises
  WeightLoadError naming the file; an unsupported dtype raises ConfigError.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch

from kvwise.errors import ConfigError, ModelNotFoundError, WeightLoadError
from kvwise.model import registry
from kvwise.model.config import ModelConfig
from kvwise.model.gguf_reader import GGUFReaderKV, check_rope_scaling, expected_weight_names
from kvwise.model.tokenizer import Tokenizer

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# model_type in config.json -> ModelConfig.arch
_HF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: Mapping[str, torch.Tensor]  # HF names, contiguous, in the requested dtype
    tokenizer: Tokenizer
    source: str  # resolved file or directory path


def load_model(model: str = registry.DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               tokenizer: Optional[str] = None, lazy: bool = False) -> LoadedModel:
    """Load config, weights and tokenizer; `tokenizer` optionally names another source for it;
    `lazy` keeps a GGUF's tensors in the file until taken (HF directories always load)."""
    if dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype {dtype} is not supported (use float32, float16 or bfloat16)",
                          param="dtype")
    source = resolve_model_path(model)
    if _is_gguf(source):
        reader = GGUFReaderKV(source)
        config = reader.config
        weights: Mapping[str, torch.Tensor] = (reader.lazy_weights(dtype) if lazy
                                               else reader.load_weights(dtype))
        tok = Tokenizer.from_gguf_metadata(reader.metadata, source=source)
    else:
        config = load_hf_config(source)
        weights = load_hf_weights(source, config, dtype)
        tok = Tokenizer.from_hf_dir(source)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    # The tokenizer knows every end-of-generation id (eot, im_end, ...); config.json does not.
    config = dataclasses.replace(config, eos_token_ids=tok.eos_token_ids)
    return LoadedModel(config=config, weights=weights, tokenizer=tok, source=source)


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer of a registry name, .gguf file, HF directory or hub id."""
    source = resolve_model_path(spec)
    return Tokenizer.from_gguf(source) if _is_gguf(source) else Tokenizer.from_hf_dir(source)


def resolve_model_path(model: str) -> str:
    """A local .gguf file or HF directory for `model` (see module docstring for the order)."""
    entry = registry.lookup(model)
    if entry is not None:
        if entry.hub_id is not None:
            return _download_hub(entry.hub_id)
        return registry.package_file(entry)
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        return _dir_source(path)
    if _HUB_ID.match(model) and not model.endswith(".gguf"):
        return _download_hub(model)
    if model.endswith(".gguf") or os.sep in model or model.startswith((".", "~")):
        raise ModelNotFoundError(f"no such model file or directory: {model}")
    raise ModelNotFoundError(f"unknown model {model!r}: not a registered name "
                             f"({', '.join(registry.known_model_names())}), a path, or an "
                             "org/name hub id")


def _is_gguf(path: str) -> bool:
    return os.path.isfile(path)


def _dir_source(path: str) -> str:
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1:
        return ggufs[0]
    raise ModelNotFoundError(f"{path} is not a model directory: no config.json and "
                             f"{len(ggufs)} .gguf files")


def _download_hub(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelNotFoundError(f"{repo_id!r} looks like a hub id but huggingface_hub is not "
                                 "installed; pip install huggingface_hub or pass a path") from e
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated, HTTP errors: all mean "not found here"
        raise ModelNotFoundError(
            f"could not fetch hub model {repo_id!r} ({type(e).__name__}: {e}). Offline? Download "
            "it where there is network and pass the local directory instead.") from e
    return _dir_source(str(path))


def load_hf_config(path: str) -> ModelConfig:
    """ModelConfig from `path`/config.json (+ generation_config.json eos ids)."""
    cfg_file = os.path.join(path, "config.json")
    cfg = _read_json(cfg_file, required=True)
    gen_eos = _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
    return config_from_hf_dict(cfg, cfg_file, extra_eos=gen_eos)


def config_from_hf_dict(cfg: dict[str, Any], source: str = "config.json",
                        extra_eos: Any = None) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type not in _HF_ARCHS:
        raise WeightLoadError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(_HF_ARCHS)})")

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise WeightLoadError(f"{source}: required key {key!r} is missing")
        return cfg[key]

    hidden, num_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    # transformers 5 nests rope_theta and the scaling in rope_parameters; 4 has rope_scaling.
    rope_params = cfg.get("rope_parameters") or {}
    scaling = dict(cfg.get("rope_scaling") or rope_params)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling.pop("rope_theta", None)
    rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **scaling}
    check_rope_scaling(rope_scaling, source)
    eos = [x for v in (cfg.get("eos_token_id"), extra_eos) if v is not None
           for x in (v if isinstance(v, list) else [v])]
    try:
        return ModelConfig(
            arch=_HF_ARCHS[model_type],
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta") or rope_params.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama/Mistral say so in attention_bias.
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            bos_token_id=int(cfg["bos_token_id"]) if cfg.get("bos_token_id") is not None else None,
            eos_token_ids=tuple(dict.fromkeys(int(x) for x in eos)),
        )
    except (ValueError, TypeError) as e:
        raise WeightLoadError(f"{source}: {e}") from e


def load_hf_weights(path: str, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights `config` needs from the directory's safetensors files, by HF name."""
    from safetensors import safe_open  # local: only HF directories need it

    wanted = expected_weight_names(config)
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        weight_map = _read_json(index_file).get("weight_map") or {}
        shards = sorted(set(weight_map.values()))
        shard_paths = [os.path.join(path, s) for s in shards]
        for p in shard_paths:
            if not os.path.isfile(p):
                raise WeightLoadError(f"{index_file}: lists shard {os.path.basename(p)}, which "
                                      "is missing")
    else:
        shard_paths = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not shard_paths:
        raise ModelNotFoundError(f"no *.safetensors weights in {path}")
    wanted_set = set(wanted)
    weights: dict[str, torch.Tensor] = {}
    for shard in shard_paths:
        try:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    if name in wanted_set:
                        weights[name] = f.get_tensor(name).to(dtype).contiguous()
        except Exception as e:  # SafetensorError and OSError on truncated or bad files
            raise WeightLoadError(f"{shard}: cannot read safetensors ({e})") from e
    missing = [n for n in wanted if n not in weights]
    if missing:
        raise WeightLoadError(f"{path}: {len(missing)} tensors missing, e.g. "
                              f"{', '.join(missing[:5])}")
    return {n: weights[n] for n in wanted}


def _read_json(path: str, required: bool = False) -> dict[str, Any]:
    if not os.path.isfile(path):
        if required:
            raise ModelNotFoundError(f"{path} not found")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightLoadError(f"{path}: invalid JSON ({e})") from e
