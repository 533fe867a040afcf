"""Engine-side state of one sequence (one sibling of a user request).

Counters, not modes: a request has `num_tokens` known tokens (prompt + generated) and
`num_computed_tokens` of them have KV in the cache. Prefill, chunked prefill, prefix hits and
recompute after preemption are all "computed catches up to known".

Invariants:
- 0 <= num_computed_tokens <= num_tokens; computed == tokens - 1 after a decode step (the newest
  sampled token has no KV yet).
- `all_token_ids` == prompt_token_ids + output_token_ids.
- A HELD request ("held for send", `hold_after_prefill`) has sampled at least one token, keeps
  its blocks, is never scheduled, and has a `lease_deadline`; it leaves the engine by export or
  is aborted when the lease passes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from kvwise.outputs import Logprob, RequestMetrics
from kvwise.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"  # prefilled, waiting for its export (see LLMEngine.export_request)
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str  # unique per sequence: "<user id>" or "<user id>#<index>" when n > 1
    parent_id: str  # the user's request id
    index: int  # sibling index in [0, n)
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    max_tokens: int  # resolved: params.max_tokens or what fits in max_model_len
    generator: Optional[torch.Generator] = None
    detokenizer: Any = None
    cache_salt: Optional[str] = None
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: Optional[str] = None
    stop_reason: Union[None, int, str] = None
    text: str = ""
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None  # summed only when params.logprobs is set
    hold_after_prefill: bool = False  # stop after the first sampled token, wait for export
    lease_s: Optional[float] = None  # how long a held request waits for its export
    # the request's KV compression policy (kvwise.cache.compress), None: keeps all its KV
    kv_policy: Any = None
    lease_deadline: Optional[float] = None  # engine clock time; set when it becomes HELD

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
