"""What every benchmarked engine is fed: the model files and the prompt token ids.

Prompts are slices of real English text (`pydoc_data.topics`, shipped with CPython) tokenized
once with the model's tokenizer and cut to exact lengths, so kvwise and its peers see identical
token ids.

Invariants:
- Prompts are token-id lists, never strings: no engine re-tokenizes them.
- Every prompt of one workload is a distinct slice of the corpus (different runs get different
  prompts), so prefix caching cannot turn a repeated run into a cache hit. Only when the corpus is
  exhausted does it wrap around (stated in `TokenCorpus.wrapped`).
- Workload sizes are validated on construction; errors name the field.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from kvwise.errors import ConfigError, ModelNotFoundError
from kvwise.model import registry


@dataclass(frozen=True)
class ModelFiles:
    """Where the peers find the weights: an HF directory (or hub id) and optionally a GGUF in it."""

    name: str
    directory: str
    gguf_file: Optional[str] = None

    @property
    def gguf_path(self) -> Optional[str]:
        return None if self.gguf_file is None else os.path.join(self.directory, self.gguf_file)


def resolve_model(model: str) -> ModelFiles:
    """Map kvwise's `--model` value to files: a registered name, a .gguf path or an HF dir/id."""
    entry = registry.lookup(model)
    if entry is not None and entry.package is not None:
        path = registry.package_file(entry)
        return ModelFiles(model, os.path.dirname(path), os.path.basename(path))
    if entry is not None and entry.hub_id is not None:
        return ModelFiles(model, entry.hub_id, None)
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ModelNotFoundError(f"GGUF file not found: {model}")
        path = os.path.abspath(model)
        return ModelFiles(model, os.path.dirname(path), os.path.basename(path))
    return ModelFiles(model, model, None)


def load_encoder(files: ModelFiles) -> Callable[[str], list[int]]:
    """The model's tokenizer as `text -> ids` (no special tokens).

    HF transformers when installed (GGUF or HF dir), else llama.cpp's vocabulary-only load of the
    GGUF; the two agree on SmolLM2's ids.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return _llama_cpp_encoder(files)
    kwargs = {} if files.gguf_file is None else {"gguf_file": files.gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(files.directory, **kwargs)

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    return encode


def _llama_cpp_encoder(files: ModelFiles) -> Callable[[str], list[int]]:
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ModelNotFoundError(
            "building benchmark prompts needs a tokenizer: install transformers"
        ) from e
    if files.gguf_path is None:
        raise ModelNotFoundError(f"{files.name!r} is not a GGUF: install transformers")
    vocab = Llama(model_path=files.gguf_path, vocab_only=True, verbose=False)

    def encode(text: str) -> list[int]:
        return vocab.tokenize(text.encode(), add_bos=False, special=False)

    return encode


def corpus_text() -> str:
    """Real prose with code snippets: the Python reference topics, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class TokenCorpus:
    token_ids: tuple[int, ...]
    wrapped: bool  # the requested tokens exceeded the text, so slices repeat

    def prompts(self, num_prompts: int, length: int, start: int = 0) -> list[list[int]]:
        """`num_prompts` consecutive, non-overlapping slices of `length` tokens from `start`."""
        ids, n = self.token_ids, len(self.token_ids)
        out = []
        for i in range(num_prompts):
            begin = start + i * length
            out.append([ids[(begin + j) % n] for j in range(length)])
        return out


def build_corpus(encode: Callable[[str], list[int]], num_tokens: int) -> TokenCorpus:
    """Tokenize just enough of the corpus text for `num_tokens` ids (about 4 chars per token)."""
    text = corpus_text()
    num_chars = min(len(text), 6 * num_tokens + 1024)
    while True:
        ids = encode(text[:num_chars])
        if len(ids) >= num_tokens:
            return TokenCorpus(tuple(ids[:num_tokens]), wrapped=False)
        if num_chars >= len(text):
            return TokenCorpus(tuple(ids), wrapped=True)
        num_chars = min(len(text), 2 * num_chars)


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}", name)


@dataclass(frozen=True)
class LatencyWorkload:
    """(a) batch-1 greedy decode; (b) time to first token of one long prompt."""

    decode_prompt_len: int = 32
    decode_tokens: int = 128
    prefill_len: int = 1024

    def __post_init__(self) -> None:
        _positive("decode_prompt_len", self.decode_prompt_len)
        _positive("decode_tokens", self.decode_tokens, minimum=2)  # a rate needs two tokens
        _positive("prefill_len", self.prefill_len)

    @property
    def max_context(self) -> int:
        return max(self.decode_prompt_len + self.decode_tokens, self.prefill_len + 1)

    def tokens_needed(self, num_calls: int) -> int:
        return num_calls * (self.prefill_len + self.decode_prompt_len)

    def prompts(self, corpus: TokenCorpus, num_calls: int) -> tuple[list[list[int]], ...]:
        """(decode prompts, prefill prompts), one of each per call (warm-ups included)."""
        prefill = corpus.prompts(num_calls, self.prefill_len)
        decode = corpus.prompts(num_calls, self.decode_prompt_len, num_calls * self.prefill_len)
        return decode, prefill

    def short(self) -> str:
        return (f"decode {self.decode_tokens} tokens after a {self.decode_prompt_len}-token "
                f"prompt; prefill {self.prefill_len} tokens")

    def describe(self) -> str:
        return (
            f"decode: batch 1, {self.decode_prompt_len}-token prompt, {self.decode_tokens} greedy "
            f"tokens (ignore_eos), rate = (N-1) / (t_last - t_first); "
            f"prefill: one {self.prefill_len}-token prompt, rate = {self.prefill_len} / TTFT"
        )


@dataclass(frozen=True)
class ThroughputWorkload:
    """`num_requests` concurrent requests, each `prompt_len` in and `output_len` out, greedy."""

    num_requests: int = 64
    prompt_len: int = 128
    output_len: int = 128

    def __post_init__(self) -> None:
        _positive("num_requests", self.num_requests)
        _positive("prompt_len", self.prompt_len)
        _positive("output_len", self.output_len)

    @property
    def max_context(self) -> int:
        return self.prompt_len + self.output_len

    def tokens_needed(self, num_calls: int) -> int:
        return num_calls * self.num_requests * self.prompt_len

    def prompts(self, corpus: TokenCorpus, num_calls: int) -> list[list[list[int]]]:
        """One batch of `num_requests` prompts per call (warm-ups included)."""
        n = self.num_requests
        return [corpus.prompts(n, self.prompt_len, i * n * self.prompt_len)
                for i in range(num_calls)]

    @property
    def num_output_tokens(self) -> int:
        return self.num_requests * self.output_len

    @property
    def num_total_tokens(self) -> int:
        return self.num_requests * (self.prompt_len + self.output_len)

    def short(self) -> str:
        return f"{self.num_requests} requests x ({self.prompt_len} in + {self.output_len} out)"

    def describe(self) -> str:
        return (
            f"{self.num_requests} requests submitted together, {self.prompt_len} prompt + "
            f"{self.output_len} output tokens each (greedy, ignore_eos); "
            f"output tok/s = {self.num_output_tokens} / wall time"
        )
