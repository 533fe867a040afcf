"""User-facing sampling parameters, validated on construction.

Invariants:
- A constructed `SamplingParams` is always valid; every check names the field it rejects.
- `top_k=None` / `top_p=1.0` / `min_p=0.0` mean "disabled"; `temperature=0.0` means greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from kvwise.errors import InvalidRequestError

MAX_LOGPROBS = 20


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
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_list = _as_list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is not None and self.top_k <= 0:
            # 0 and -1 are the conventional "disabled" values of other engines
            self.top_k = None
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, message: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param}: {message}", param=param)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.n > 128:
            raise bad("n", f"must be <= 128, got {self.n}")
        if not _is_number(self.temperature) or self.temperature < 0.0:
            raise bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and not isinstance(self.top_k, int):
            raise bad("top_k", f"must be an integer, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs",
                      f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        for s in self.stop_list:
            if not isinstance(s, str) or s == "":
                raise bad("stop", "stop strings must be non-empty strings")
        for t in self.stop_token_ids or []:
            if not isinstance(t, int) or t < 0:
                raise bad("stop_token_ids", f"must be non-negative integers, got {t!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN
