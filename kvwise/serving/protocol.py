"""The OpenAI wire format: pydantic request/response models and RequestOutput -> JSON builders.

Owns: what a client may send (field names, types, coarse bounds) and exactly what it gets back.
Sampling semantics are validated once, by `SamplingParams`; this module only maps fields.

Invariants:
- Floats are finite (`allow_inf_nan=False`); every string is valid UTF-8 (no lone surrogates), so
  nothing a client sends can crash the tokenizer or the JSON encoder.
- Logprobs sent to clients are finite: -inf is clamped to `MIN_LOGPROB`.
- Streaming text is sent as deltas of the engine's cumulative text; token counts in `usage` are
  the engine's.
- `echo` (legacy completions, non-streaming): text = prompt + completion and logprobs cover the
  prompt tokens then the completion's; the first prompt token has logprob null (nothing scores
  it). `max_tokens: 0` is only meaningful with echo (the prompt's logprobs, as lm-eval's
  loglikelihood asks): the engine runs the prompt with max_tokens=1 and the generated token is
  dropped (finish_reason "length", completion_tokens 0), as vLLM does; without echo it is a 400.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvwise.errors import InvalidRequestError
from kvwise.outputs import CompletionOutput, Logprob, RequestOutput
from kvwise.sampling_params import SamplingParams

MIN_LOGPROB = -9999.0
GREEDY_EPS = 1e-5  # temperatures below this are greedy (dividing logits by ~0 overflows)
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="after")
    def _utf8_only(self) -> _Model:
        _check_utf8(self.model_dump(mode="python"), "")
        return self


def _check_utf8(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where or 'body'}: string is not valid UTF-8") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_utf8(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for v in value:
            _check_utf8(v, where)


# -- requests ----------------------------------------------------------------------------------
class StreamOptions(_Model):
    include_usage: Optional[bool] = False


class _SamplingFields(_Model):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    n: int = 1
    seed: Optional[Annotated[int, Field(ge=_INT64_MIN, le=_UINT64_MAX)]] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[TokenId]] = None
    ignore_eos: bool = False
    user: Optional[str] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    # kvwise extensions (extra body): this request's KV compression, see --kv-compression
    kv_compression: Optional[str] = None
    sink_tokens: Optional[int] = None
    window_tokens: Optional[int] = None
    recovery_threshold: Optional[float] = None
    fastgen_local_ratio: Optional[float] = None
    fastgen_frequent_ratio: Optional[float] = None

    def _unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise InvalidRequestError(f"{name}: not supported (use 0 or omit it)", name)
        if self.logit_bias:
            raise InvalidRequestError("logit_bias: not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options: only allowed when stream is true",
                                      "stream_options")

    def sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int],
                        vocab_size: int, prompt_logprobs: Optional[int] = None
                        ) -> SamplingParams:
        """Map to SamplingParams (which validates and names the bad field)."""
        self._unsupported()
        temperature = 1.0 if self.temperature is None else self.temperature
        if 0.0 <= temperature < GREEDY_EPS:
            temperature = 0.0
        top_k = self.top_k
        if top_k is not None and top_k > vocab_size:
            top_k = vocab_size  # same distribution, and torch.topk stays in range
        return SamplingParams(
            n=self.n, temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=top_k,
            min_p=0.0 if self.min_p is None else self.min_p, seed=self.seed,
            max_tokens=max_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            kv_compression=self.kv_compression, sink_tokens=self.sink_tokens,
            window_tokens=self.window_tokens, recovery_threshold=self.recovery_threshold,
            fastgen_local_ratio=self.fastgen_local_ratio,
            fastgen_frequent_ratio=self.fastgen_frequent_ratio)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: Union[list[list[TokenId]], list[TokenId], list[str], str]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @property
    def echo_only(self) -> bool:
        """`echo` with `max_tokens: 0`: the prompt and its logprobs, nothing generated."""
        return bool(self.echo) and self.max_tokens == 0

    def engine_params(self, vocab_size: int) -> SamplingParams:
        """The engine's params: with echo, the prompt's logprobs too (as many alternatives as
        `logprobs`); echo with max_tokens 0 runs one token, which the response drops."""
        max_tokens = 1 if self.echo_only else self.max_tokens
        prompt_logprobs = self.logprobs if self.echo else None
        return self.sampling_params(max_tokens, self.logprobs, vocab_size, prompt_logprobs)

    def prompts(self) -> list[Union[str, list[int]]]:
        if self.echo and self.stream:
            raise InvalidRequestError("echo: not supported with stream", "echo")
        if self.suffix:
            raise InvalidRequestError("suffix: not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of: only best_of == n is supported", "best_of")
        p = self.prompt
        if isinstance(p, str):
            prompts: list[Union[str, list[int]]] = [p]
        elif p and isinstance(p[0], int):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = list(p)  # type: ignore[arg-type]
        if not prompts:
            raise InvalidRequestError("prompt: must not be empty", "prompt")
        return prompts


class TextPart(_Model):
    type: str
    text: Optional[str] = None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def as_template_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise InvalidRequestError(
                        f"messages: content part of type {part.type!r} is not supported "
                        f"(text only)", "messages")
            content = "".join(part.text or "" for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    echo: Optional[bool] = False

    def chat_logprobs(self) -> Optional[int]:
        if self.echo:
            raise InvalidRequestError("echo: only /v1/completions echoes its prompt", "echo")
        if not self.messages:
            raise InvalidRequestError("messages: must contain at least one message", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs: requires logprobs to be true",
                                      "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_dict() for m in self.messages]


class TokenizeRequest(_Model):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Model):
    model: Optional[str] = None
    tokens: list[TokenId]


class PrefixRequest(_Model):
    """Body of POST /v1/kvwise/pin_prefix and /v1/kvwise/unpin_prefix."""

    model: Optional[str] = None
    prompt: Union[list[TokenId], str]


# -- responses ---------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    # None (null) only for the first prompt token of an echo: nothing scores it
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvwise"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class PrefixResponse(BaseModel):
    num_tokens: int  # tokens pinned / unpinned: the prompt's cached full blocks


# -- builders ----------------------------------------------------------------------------------
def _finite(x: float) -> float:
    return MIN_LOGPROB if math.isnan(x) else max(x, MIN_LOGPROB)


def _token_str(lp: Optional[Logprob], token_id: int) -> str:
    if lp is None or lp.decoded_token is None:
        return f"token_id:{token_id}"
    return lp.decoded_token


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(entry.items(), key=lambda kv: kv[1].rank)[:k]


def completion_logprobs(c: CompletionOutput, start: int, k: int,
                        text_offset: int) -> CompletionLogprobs:
    """Legacy-completions logprobs of tokens [start:] of `c`; offsets begin at `text_offset`."""
    out = CompletionLogprobs()
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        sampled = entry.get(tid)
        tok = _token_str(sampled, tid)
        out.tokens.append(tok)
        out.token_logprobs.append(_finite(sampled.logprob) if sampled else MIN_LOGPROB)
        top = {_token_str(lp, t): _finite(lp.logprob) for t, lp in _top(entry, k)}
        if sampled is not None:
            top.setdefault(tok, _finite(sampled.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(tok)
    return out


def prompt_completion_logprobs(out: RequestOutput, first_token: str, k: int
                               ) -> CompletionLogprobs:
    """Legacy-completions logprobs of the prompt tokens (echo) from `out.prompt_logprobs`: the
    first token (`first_token`, decoded) has null logprob and null top_logprobs."""
    res = CompletionLogprobs()
    scored = out.prompt_logprobs or []
    offset = 0
    for i, tid in enumerate(out.prompt_token_ids):
        entry = scored[i] if i < len(scored) else None
        own = entry.get(tid) if entry is not None else None
        if entry is None or own is None:
            tok, lp, top = first_token if i == 0 else f"token_id:{tid}", None, None
        else:
            tok, lp = _token_str(own, tid), _finite(own.logprob)
            top = {_token_str(x, t): _finite(x.logprob) for t, x in _top(entry, k)}
            top.setdefault(tok, lp)
        res.tokens.append(tok)
        res.token_logprobs.append(lp)
        res.top_logprobs.append(top)
        res.text_offset.append(offset)
        offset += len(tok)
    return res


@dataclass
class Echo:
    """What an echo response adds per prompt: its text and its first token decoded (nothing
    scores that token, so no Logprob carries its string), and whether generation is dropped."""

    texts: list[str]
    first_tokens: list[str]
    echo_only: bool

    @staticmethod
    def build(finals: list[RequestOutput], decode: Callable[[list[int]], str],
              echo_only: bool) -> Echo:
        """`decode(ids)` -> text with special tokens kept (call it on the engine's thread)."""
        texts = [out.prompt if out.prompt is not None else decode(out.prompt_token_ids)
                 for out in finals]
        return Echo(texts, [decode(out.prompt_token_ids[:1]) for out in finals], echo_only)


def _echo_choice(i: int, out: RequestOutput, c: CompletionOutput, echo: Echo,
                 logprobs: Optional[int]) -> CompletionChoice:
    lp = None
    if logprobs is not None:
        lp = prompt_completion_logprobs(out, echo.first_tokens[i], logprobs)
        if not echo.echo_only:
            gen = completion_logprobs(c, 0, logprobs, sum(len(t) for t in lp.tokens))
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(lp, name).extend(getattr(gen, name))
    if echo.echo_only:
        return CompletionChoice(index=c.index, text=echo.texts[i], logprobs=lp,
                                finish_reason="length")
    return CompletionChoice(index=c.index, text=echo.texts[i] + c.text, logprobs=lp,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason)


def chat_logprobs(c: CompletionOutput, start: int, k: int) -> ChatLogprobs:
    content = []
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        sampled = entry.get(tid)
        tok = _token_str(sampled, tid)
        top = [TopLogprob(token=_token_str(lp, t), logprob=_finite(lp.logprob),
                          bytes=list(_token_str(lp, t).encode("utf-8")))
               for t, lp in _top(entry, k)]
        content.append(ChatTokenLogprob(
            token=tok, logprob=_finite(sampled.logprob) if sampled else MIN_LOGPROB,
            bytes=list(tok.encode("utf-8")), top_logprobs=top))
    return ChatLogprobs(content=content)


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                     total_tokens=num_prompt_tokens + num_completion_tokens)


# -- streaming deltas ------------------------------------------------------------------------------
class StreamState:
    """What has already been streamed for one choice."""

    def __init__(self) -> None:
        self.chars = 0
        self.tokens = 0
        self.offset = 0  # legacy-logprobs text offset
        self.done = False

    def advance(self, c: CompletionOutput, want_logprobs: bool) -> Optional[tuple[str, int]]:
        """(text delta, first new token index) of `c`, or None when nothing is worth sending."""
        delta = c.text[self.chars:]
        start = self.tokens
        self.chars = max(self.chars, len(c.text))
        self.tokens = len(c.token_ids)
        self.done = c.finished
        if not delta and not c.finished and not (want_logprobs and self.tokens > start):
            return None
        return delta, start


def chunk(rid: str, obj: str, created: int, model: str, choices: list[dict[str, Any]],
          include_usage: bool, usage_info: Optional[dict[str, Any]]) -> dict[str, Any]:
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if include_usage:  # OpenAI: every chunk carries "usage", null but in the last one
        out["usage"] = usage_info
    return out


def completion_chunk_choice(index: int, c: CompletionOutput, st: StreamState,
                            logprobs: Optional[int]) -> Optional[dict[str, Any]]:
    offset = st.offset
    step = st.advance(c, logprobs is not None)
    if step is None:
        return None
    lp = completion_logprobs(c, step[1], logprobs, offset) if logprobs is not None else None
    if lp is not None:
        st.offset = offset + sum(len(t) for t in lp.tokens)
    return CompletionChoice(index=index, text=step[0], logprobs=lp,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason).model_dump()


def chat_role_choices(n: int) -> list[dict[str, Any]]:
    return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for i in range(n)]


def chat_chunk_choice(index: int, c: CompletionOutput, st: StreamState,
                      top_logprobs: Optional[int]) -> Optional[dict[str, Any]]:
    step = st.advance(c, top_logprobs is not None)
    if step is None:
        return None
    lp = chat_logprobs(c, step[1], top_logprobs).model_dump() if top_logprobs is not None \
        else None
    return {"index": index, "delta": {"content": step[0]} if step[0] else {}, "logprobs": lp,
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


def completion_response(rid: str, created: int, model: str, finals: list[RequestOutput], n: int,
                        logprobs: Optional[int], echo: Optional[Echo] = None
                        ) -> CompletionResponse:
    """Choice index = prompt index * n + sibling index (as the OpenAI API numbers them)."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, out in enumerate(finals):
        prompt_tokens += len(out.prompt_token_ids)
        for c in out.outputs:
            if echo is not None:
                choice = _echo_choice(i, out, c, echo, logprobs)
                choice.index = i * n + c.index
                choices.append(choice)
                completion_tokens += 0 if echo.echo_only else len(c.token_ids)
                continue
            completion_tokens += len(c.token_ids)
            choices.append(CompletionChoice(
                index=i * n + c.index, text=c.text, finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                logprobs=completion_logprobs(c, 0, logprobs, 0) if logprobs is not None
                else None))
    return CompletionResponse(id=rid, created=created, model=model, choices=choices,
                              usage=usage(prompt_tokens, completion_tokens))


def chat_response(rid: str, created: int, model: str, out: RequestOutput,
                  top_logprobs: Optional[int]) -> ChatCompletionResponse:
    choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                          finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                          logprobs=chat_logprobs(c, 0, top_logprobs)
                          if top_logprobs is not None else None)
               for c in out.outputs]
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                  usage=usage(len(out.prompt_token_ids), completion_tokens))
