"""User-facing sampling parameters, validated on construction.

Invariants:
- A constructed `SamplingParams` is always valid; every check names the field it rejects.
- Validity is judged on the values the sampler computes with: floats after rounding to float32
  (so a `top_p` of 1e-300, which is 0 in float32, is rejected, not sampled), integers within the
  ranges torch and the engine can hold (seed in 64 bits, counts in int32). Booleans are not
  numbers here.
- `top_k=None` / `top_p=1.0` / `min_p=0.0` mean "disabled"; `temperature=0.0` means greedy.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Optional, Union

from kvwise.config import check_fastgen, check_kv_compression
from kvwise.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_N = 128
INT32_MAX = 2**31 - 1  # max_tokens, top_k and token ids: far above any context or vocabulary
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # a seed is any signed or unsigned 64-bit integer
# Smallest normal float32: a top_p below it is 0 (or a subnormal flushed to 0) in the sampler.
FLOAT32_MIN_NORMAL = 2.0**-126


def _as_list(value: Union[None, str, list[str], tuple[str, ...]]) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    min_p: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    stop: Union[None, str, list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    # Logprobs of the prompt's own tokens (vLLM's name): for each prompt token after the first,
    # its logprob given the tokens before it plus this many top alternatives (0: the token only).
    # Such a request computes the LM head for every prompt position and takes no prefix hits.
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # This request's KV compression (None: the engine's --kv-compression / --sink-tokens /
    # --window-tokens); see kvwise.cache.compress
    kv_compression: Optional[str] = None
    sink_tokens: Optional[int] = None
    window_tokens: Optional[int] = None
    recovery_threshold: Optional[float] = None  # fastgen (None: the engine's settings)
    fastgen_local_ratio: Optional[float] = None
    fastgen_frequent_ratio: Optional[float] = None
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_list = _as_list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if _is_int(self.top_k) and self.top_k <= 0:  # type: ignore[operator]
            # 0 and -1 are the conventional "disabled" values of other engines
            self.top_k = None
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, message: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param}: {message}", param=param)

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        temperature = _float32(self.temperature)
        if temperature is None or not temperature >= 0.0:
            raise bad("temperature", f"must be a finite number >= 0 (in float32), got "
                      f"{self.temperature!r}")
        top_p = _float32(self.top_p)
        if top_p is None or not (0.0 < self.top_p <= 1.0 and top_p >= FLOAT32_MIN_NORMAL):
            raise bad("top_p", f"must be in (0, 1] and at least {FLOAT32_MIN_NORMAL:.3g} (the "
                      f"smallest normal float32), got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k > INT32_MAX):
            raise bad("top_k", f"must be an integer <= {INT32_MAX} (<= 0 disables it), got "
                      f"{self.top_k!r}")
        if _float32(self.min_p) is None or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.max_tokens is not None and (
            not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT32_MAX
        ):
            raise bad("max_tokens",
                      f"must be an integer in [1, {INT32_MAX}], got {self.max_tokens!r}")
        if self.seed is not None and (
            not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise bad("seed", f"must be a 64-bit integer in [{SEED_MIN}, {SEED_MAX}], got "
                      f"{self.seed!r}")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs",
                      f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise bad("prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got "
                      f"{self.prompt_logprobs!r}")
        for s in self.stop_list:
            if not isinstance(s, str) or s == "":
                raise bad("stop", "stop strings must be non-empty strings")
        for t in self.stop_token_ids or []:
            if not _is_int(t) or not 0 <= t <= INT32_MAX:
                raise bad("stop_token_ids", f"must be integers in [0, {INT32_MAX}], got {t!r}")
        if (self.kv_compression, self.sink_tokens, self.window_tokens) != (None, None, None):
            # only what was given is checked here; the engine fills the rest from its defaults
            # (and rejects streaming with no window from either) when the request is added
            check_kv_compression(self.kv_compression or "none",
                                 0 if self.sink_tokens is None else self.sink_tokens,
                                 1 if self.window_tokens is None else self.window_tokens, bad)
        fastgen = (self.recovery_threshold, self.fastgen_local_ratio,
                   self.fastgen_frequent_ratio)
        if fastgen != (None, None, None):
            check_fastgen(*(0.5 if x is None else x for x in fastgen), bad)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _float32(x: object) -> Optional[float]:
    """`x` rounded to float32 as the sampler will see it, or None when `x` is not a real
    number or is not finite there (NaN, inf, or beyond float32's range)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        value: float = struct.unpack("f", struct.pack("f", float(x)))[0]
    except OverflowError:  # |x| > float32 max, including ints too large for a double
        return None
    return value if math.isfinite(value) else None
