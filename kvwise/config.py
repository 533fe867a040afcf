"""Engine configuration: one frozen dataclass whose fields are the CLI engine flags.

Invariants:
- `EngineConfig` is validated in `__post_init__`; every error names its field.
- Values discovered at start-up (number of blocks, eos ids, resolved max_model_len, the weight
  formats `weight_dtype="auto"` resolves to) live in the engine's runtime state, never written
  back here.
- CLI flag `--max-num-seqs` <-> field `max_num_seqs` <-> `LLM(max_num_seqs=...)`: the mapping is
  `ENGINE_FLAGS` below, the single place where flags are declared.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from kvwise.errors import ConfigError
from kvwise.kv_names import parse_format_name

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_bytes(value: Union[int, str]) -> int:
    """'2GiB' -> 2147483648; plain ints are bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"kv_cache_memory: cannot parse {value!r} (use e.g. 512MiB, 2GiB)", "kv_cache_memory"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda")
WEIGHT_FORMATS = ("fp32", "int8", "int4")  # storage of projection weights, see kvwise.model.quant
# auto: the nearest format that loses nothing of the source (a GGUF's Q4_0/Q4_1 -> int4, Q8_0 ->
# int8, anything else -> fp32), resolved when the model loads (kvwise.engine.model_setup)
WEIGHT_DTYPES = ("auto",) + WEIGHT_FORMATS
# KV formats by name (kvwise.cache.kv_store registry; a test checks the two lists agree)
KV_CACHE_DTYPES = ("auto",) + DTYPES + ("int8",)
ACTIVATION_QUANTS = ("none", "int8")  # inputs of the int4 CPU decode kernels
KV_COMPRESSIONS = ("none", "streaming", "fastgen")  # eviction policies, see kvwise.cache.compress


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m"
    tokenizer: Optional[str] = None
    max_model_len: Optional[int] = None  # None: the model's context length
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 1024
    kv_cache_memory: Union[int, str] = "1GiB"
    num_blocks: Optional[int] = None  # overrides kv_cache_memory
    dtype: str = "float32"  # compute/storage dtype of weights and KV
    device: str = "cpu"
    threads: Optional[int] = None
    seed: int = 0
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    attention_backend: str = "paged"
    weight_dtype: str = "auto"  # decoder projections: auto | fp32 | int8 | int4 (weight-only)
    lm_head_dtype: Optional[str] = None  # None: the projections' format, but int8 for int4
    kv_cache_dtype: str = "auto"  # auto (= dtype) | float32 | float16 | bfloat16 | int8 | nuq3...
    kv_quant_calibration: Optional[str] = None  # KVQuant tables (None: the bundled model's own)
    kv_quant_sink: int = 1  # KVQuant: first tokens kept in fp16 (attention sink)
    activation_quant: str = "none"  # none | int8: int4 layers' CPU decode kernels take int8 inputs
    kv_compression: str = "none"  # none | streaming (a request may override it)
    sink_tokens: int = 4  # streaming: first tokens always kept (attention sinks)
    window_tokens: Optional[int] = None  # streaming: recent tokens kept (required for it)
    recovery_threshold: float = 0.95  # fastgen: attention a head's policy must recover
    fastgen_local_ratio: float = 0.3  # fastgen: local window, a fraction of the prompt length
    fastgen_frequent_ratio: float = 0.3  # fastgen: heavy hitters, a fraction of the length
    # a token's logits independent of its step's size and of the cache state (see
    # docs/architecture.md, "Batch-invariant mode"); costs prefill speed
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ConfigError:
            return ConfigError(f"{name}: {msg}", name)

        if not isinstance(self.model, str) or not self.model:
            raise bad("model", "must be a non-empty string")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise bad("max_model_len", f"must be >= 2, got {self.max_model_len}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise bad("block_size", f"must be a power of two in [1, 128], got {self.block_size}")
        if self.max_num_seqs < 1:
            raise bad("max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise bad("max_num_batched_tokens", f"must be >= 1, got {self.max_num_batched_tokens}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise bad("num_blocks", f"must be >= 1, got {self.num_blocks}")
        if parse_bytes(self.kv_cache_memory) <= 0:
            raise bad("kv_cache_memory", "must be positive")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.device.split(":")[0] not in DEVICES:
            raise bad("device",
                      f"must be one of {DEVICES} (optionally cuda:N), got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise bad("threads", f"must be >= 1, got {self.threads}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise bad("weight_dtype", f"must be one of {WEIGHT_DTYPES}, got {self.weight_dtype!r}")
        if self.lm_head_dtype is not None and self.lm_head_dtype not in WEIGHT_FORMATS:
            raise bad("lm_head_dtype",
                      f"must be one of {WEIGHT_FORMATS}, got {self.lm_head_dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            try:
                kvquant = parse_format_name(self.kv_cache_dtype)
            except ValueError as e:
                raise bad("kv_cache_dtype", str(e).split(": ", 1)[-1]) from None
            if kvquant is None or kvquant.name != self.kv_cache_dtype:
                raise bad("kv_cache_dtype", f"must be one of {KV_CACHE_DTYPES} or a KVQuant "
                          f"format (nuq4, nuq3-1%, int2, ...), got {self.kv_cache_dtype!r}")
        if not 0 <= self.kv_quant_sink <= self.block_size:
            raise bad("kv_quant_sink", f"must be within 0..block_size ({self.block_size}), got "
                      f"{self.kv_quant_sink}")
        if self.kvquant and self.kv_compression != "none":
            raise bad("kv_compression", f"{self.kv_compression} cannot run with kv_cache_dtype="
                      f"{self.kv_cache_dtype} yet (evicting rows of quantized blocks is not "
                      "supported)")
        if self.activation_quant not in ACTIVATION_QUANTS:
            raise bad("activation_quant",
                      f"must be one of {ACTIVATION_QUANTS}, got {self.activation_quant!r}")
        if self.activation_quant != "none":
            # with auto the format is known only at load time; model_setup checks it then
            if not {"int4", "auto"} & {self.weight_dtype, self.lm_head_dtype}:
                raise bad("activation_quant", f"{self.activation_quant} applies to int4 layers; "
                          f"set weight_dtype=int4 (or lm_head_dtype=int4), got weight_dtype="
                          f"{self.weight_dtype!r}")
            if self.device != "cpu":
                raise bad("activation_quant", f"{self.activation_quant} is implemented by the "
                          f"CPU kernels only, got device={self.device!r}")
        check_kv_compression(self.kv_compression, self.sink_tokens, self.window_tokens, bad)
        check_fastgen(self.recovery_threshold, self.fastgen_local_ratio,
                      self.fastgen_frequent_ratio, bad)
        if self.batch_invariant:
            need = {"device": (self.device, "cpu"), "dtype": (self.dtype, "float32"),
                    "attention_backend": (self.attention_backend, "paged")}
            for name, (got, want) in need.items():
                if got != want:
                    raise bad("batch_invariant", f"needs {name}={want} (its row-invariant "
                              f"kernels are the CPU fp32 paged ones), got {name}={got!r}")
            if self.kv_compression == "fastgen":
                raise bad("kv_compression", "fastgen cannot run with batch_invariant (its "
                          "per-head KV groups are read through per-head tables)")
            if self.resolved_kv_cache_dtype == "bfloat16" or self.kvquant:
                raise bad("batch_invariant", "needs a KV format the CPU attention kernel reads "
                          f"(float32, float16, int8), got kv_cache_dtype="
                          f"{self.resolved_kv_cache_dtype}")

    @property
    def kvquant(self) -> bool:
        """Whether the KV format is one of KVQuant's (nuq*/int4/int3/int2)."""
        return self.kv_cache_dtype not in KV_CACHE_DTYPES

    @property
    def resolved_kv_cache_dtype(self) -> str:
        """The KV cache's storage dtype name: `kv_cache_dtype`, or `dtype` for auto."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    @property
    def kv_cache_bytes(self) -> int:
        return parse_bytes(self.kv_cache_memory)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown engine argument(s): {', '.join(unknown)}", unknown[0])
        return cls(**kwargs)


# flag name, type, help. Booleans get --x / --no-x.
ENGINE_FLAGS: list[tuple[str, Any, str]] = [
    ("model", str, "model name (smollm2-135m), .gguf path, HF directory or hub id"),
    ("tokenizer", str, "tokenizer source if different from the model"),
    ("max_model_len", int, "maximum prompt + output tokens per request"),
    ("block_size", int, "KV block size in tokens"),
    ("max_num_seqs", int, "maximum running requests per step"),
    ("max_num_batched_tokens", int, "token budget per engine step (chunked prefill)"),
    ("kv_cache_memory", str, "memory for the KV block pool, e.g. 512MiB or 2GiB"),
    ("num_blocks", int, "number of KV blocks (overrides --kv-cache-memory)"),
    ("dtype", str, "weight and KV dtype: float32 | float16 | bfloat16"),
    ("device", str, "cpu | cuda"),
    ("threads", int, "CPU threads for PyTorch"),
    ("seed", int, "global random seed"),
    ("enable_chunked_prefill", bool, "split long prompts across steps"),
    ("enable_prefix_caching", bool, "reuse KV of shared prompt prefixes"),
    ("attention_backend", str, "attention implementation: paged | reference | two_phase"),
    ("weight_dtype", str, "decoder projection weights: auto (default: a GGUF's own blocks where "
                          "a kvwise format holds them exactly, Q4_0/Q4_1 -> int4, Q8_0 -> int8; "
                          "else fp32) | fp32 | int8 | int4 (weight-only quant)"),
    ("lm_head_dtype", str, "LM head weights: fp32 | int8 | int4 (default: the projections' "
                           "format, but int8 for int4)"),
    ("kv_cache_dtype", str, "KV cache format: auto (= --dtype) | float32 | float16 | bfloat16 | "
                            "int8; float16 halves the bytes decode attention reads, int8 "
                            "(per token and KV head, fp16 scales) takes 0.26x of float32 (math "
                            "stays in --dtype); KVQuant: nuq4 | nuq3 | nuq2 (calibrated "
                            "non-uniform), int4 | int2 (uniform), each optionally with "
                            "dense-and-sparse outliers, e.g. nuq3-1%% (keys per channel before "
                            "RoPE, values per token)"),
    ("kv_quant_calibration", str, "KVQuant calibration file from `kvwise calibrate` (default: "
                                  "the one shipped for the bundled model)"),
    ("kv_quant_sink", int, "KVQuant: first tokens of a request kept in fp16 (attention sink; "
                           "default 1, 0 = off)"),
    ("activation_quant", str, "none | int8: int4 layers round each decode step's activations "
                              "to int8 per 32 values and use integer dot products (CPU; "
                              "llama.cpp's Q8 activations)"),
    ("kv_compression", str, "none | streaming | fastgen. streaming: evict KV between the first "
                            "--sink-tokens and the last --window-tokens of each request "
                            "(StreamingLLM); fastgen: profile each (layer, KV head) on the "
                            "prompt and keep only what its cheapest sufficient policy keeps "
                            "(FastGen); both free blocks; a request may set its own"),
    ("sink_tokens", int, "streaming: first tokens always kept (attention sinks; default 4)"),
    ("window_tokens", int, "streaming: most recent tokens kept (required with streaming)"),
    ("recovery_threshold", float, "fastgen: share of a head's prompt attention its policy must "
                                  "keep (default 0.95; 1.0 keeps everything)"),
    ("fastgen_local_ratio", float, "fastgen: local window as a fraction of the prompt length "
                                   "(default 0.3)"),
    ("fastgen_frequent_ratio", float, "fastgen: heavy hitters kept, a fraction of the length "
                                      "(default 0.3)"),
    ("batch_invariant", bool, "a request's tokens do not depend on the batch, the step size, "
                              "chunked prefill or prefix-cache hits (seeded sampling repeats "
                              "exactly); row-invariant CPU kernels for every projection and "
                              "prefill attention, at a prefill-speed cost (BENCHMARKS.md)"),
]


def check_kv_compression(name: object, sink_tokens: object, window_tokens: object,
                         bad: Callable[[str, str], Exception]) -> None:
    """Validate a KV compression setting (engine config or one request); `bad(field, message)`
    builds the error to raise."""
    if name not in KV_COMPRESSIONS:
        raise bad("kv_compression", f"must be one of {KV_COMPRESSIONS}, got {name!r}")
    if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) \
            or not 0 <= sink_tokens <= 2**31 - 1:
        raise bad("sink_tokens", f"must be an integer >= 0, got {sink_tokens!r}")
    if window_tokens is not None and (
            not isinstance(window_tokens, int) or isinstance(window_tokens, bool)
            or not 1 <= window_tokens <= 2**31 - 1):
        raise bad("window_tokens", f"must be an integer >= 1, got {window_tokens!r}")
    if name == "streaming" and window_tokens is None:
        raise bad("window_tokens", "is required with kv_compression=streaming")


def check_fastgen(threshold: object, local_ratio: object, frequent_ratio: object,
                  bad: Callable[[str, str], Exception]) -> None:
    """Validate FastGen's settings (engine config or one request): a threshold in [0, 1] and
    ratios in (0, 1]."""
    def number(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x

    if not number(threshold) or not 0.0 <= threshold <= 1.0:  # type: ignore[operator]
        raise bad("recovery_threshold", f"must be a number in [0, 1], got {threshold!r}")
    for field_name, ratio in (("fastgen_local_ratio", local_ratio),
                              ("fastgen_frequent_ratio", frequent_ratio)):
        if not number(ratio) or not 0.0 < ratio <= 1.0:  # type: ignore[operator]
            raise bad(field_name, f"must be a number in (0, 1], got {ratio!r}")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Declare every engine flag on `parser` with defaults left as None (= config default)."""
    group = parser.add_argument_group("engine")
    for name, typ, help_text in ENGINE_FLAGS:
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=typ, default=None, help=help_text)


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags a user set on the command line, by config field name (unset ones are
    left out, so they keep the config default)."""
    return {name: getattr(args, name) for name, _, _ in ENGINE_FLAGS
            if getattr(args, name, None) is not None}


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build an EngineConfig from parsed CLI args; flags left unset keep the config default."""
    return EngineConfig.from_kwargs(**engine_kwargs_from_args(args))


def parse_cli_args(parser: argparse.ArgumentParser,
                   argv: Optional[list[str]] = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, except that a subcommand declared as a stub, whose namespace
    has `unparsed_args` (e.g. `bench attention`, whose flags are declared beside its torch code),
    receives the arguments argparse did not recognise instead of an error."""
    args, rest = parser.parse_known_args(argv)
    if rest:
        if getattr(args, "unparsed_args", None) is None:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.unparsed_args = rest
    return args
