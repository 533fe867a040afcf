"""What the engine hands back to callers: per-request outputs and timings.

Invariants:
- `CompletionOutput.text` and `.token_ids` are cumulative (everything generated so far);
  streaming callers compute deltas from lengths they have already seen.
- `finish_reason` is None until the sequence ends; then "stop" (EOS, stop string or stop token),
  "length" (max_tokens or max_model_len) or "abort".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Logprob:
    """Log-probability of one token at one position, with its rank (1 = most likely)."""

    logprob: float
    rank: int
    decoded_token: Optional[str] = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token: None for the first (nothing scores it), then token id -> Logprob
# (the prompt token given the tokens before it, plus the top-k), as vLLM returns them.
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.monotonic seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_preemptions: int = 0

    @property
    def queue_time(self) -> Optional[float]:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> Optional[float]:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> Optional[float]:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    stop_reason: Union[None, int, str] = None
    logprobs: Optional[SampleLogprobs] = None
    cumulative_logprob: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=0.0))
    # None unless SamplingParams.prompt_logprobs is set; then complete once the prompt is
    # computed (entries not yet computed are None too)
    prompt_logprobs: Optional[PromptLogprobs] = None
