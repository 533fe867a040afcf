"""Offline API shaped like vLLM's: LLM(model, **engine_args).generate / chat / stream.

Invariants:
- Keyword arguments are EngineConfig fields, i.e. the CLI engine flags with underscores.
- generate() returns one RequestOutput per prompt, in prompt order, whatever order they finish in.
- A request that fails validation raises before any request of the batch is queued.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

from tqdm import tqdm

from kvwise.config import EngineConfig
from kvwise.engine.engine import LLMEngine
from kvwise.outputs import RequestOutput
from kvwise.sampling_params import SamplingParams

Prompt = Union[str, list[int]]
Messages = list[dict[str, str]]


class LLM:
    def __init__(self, model: str = "smollm2-135m", **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompt_list = _as_prompt_list(prompts)
        params = _broadcast_params(sampling_params, len(prompt_list))
        ids = self._add_all(prompt_list, params)
        return self._run(ids, use_tqdm)

    def chat(self, messages: Union[Messages, Sequence[Messages]],
             sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = [tok.encode(tok.apply_chat_template(c, add_generation_prompt=True),
                              add_special_tokens=False) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: Optional[SamplingParams] = None
               ) -> Iterator[RequestOutput]:
        """Yield the (cumulative) output of one prompt after every step that extends it."""
        (rid,) = self._add_all([prompt], [sampling_params or SamplingParams()])
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def _add_all(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[str]:
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        try:
            for rid, p, sp in zip(ids, prompts, params):
                self.engine.add_request(rid, p, sp)
                added.append(rid)
        except Exception:
            self.engine.abort_request(added)
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        pending = set(ids)
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm or len(ids) < 2)
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        done[out.request_id] = out
                        pending.discard(out.request_id)
                        bar.update(1)
        finally:
            bar.close()
            if pending:
                self.engine.abort_request(pending)
        return [done[i] for i in ids]

    def pin_prefix(self, prompt: Prompt) -> int:
        """Keep the KV of `prompt`'s full blocks cached, never evicted, until `unpin_prefix`;
        return the tokens pinned (a tail shorter than a block is not). A prefix not yet cached
        is computed first by a 1-token greedy generation. Pins nest. Give token ids to pin
        exactly what later prompts start with (text tokenized alone may differ at its end)."""
        pinned = self.engine.pin_prefix(prompt, only_if_cached=True)
        if pinned is None:
            self.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0),
                          use_tqdm=False)
            pinned = self.engine.pin_prefix(prompt)
        return pinned

    def unpin_prefix(self, prompt: Prompt) -> int:
        """Undo one `pin_prefix(prompt)`; return the tokens unpinned (evictable again)."""
        return self.engine.unpin_prefix(prompt)


def _as_prompt_list(prompts: Union[Prompt, Sequence[Prompt]]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # a single prompt of token ids
    return prompts


def _broadcast_params(sp: Union[None, SamplingParams, Sequence[SamplingParams]],
                      n: int) -> list[SamplingParams]:
    if sp is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(sp, SamplingParams):
        return [sp] * n
    sp = list(sp)
    if len(sp) != n:
        raise ValueError(f"sampling_params: got {len(sp)} for {n} prompts")
    return sp
