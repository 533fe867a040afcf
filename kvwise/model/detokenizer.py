"""Incremental detokenization of one output sequence, and stop-string matching.

`IncrementalDetokenizer` turns output token ids into text deltas with the prefix/read-offset
method (as in HF text-generation-inference and vLLM): each step decodes only a short window
`ids[prefix_offset:]`, where `ids[prefix_offset:read_offset]` is already-emitted context, and
emits the part of that window's text beyond the context's text. The context token keeps
tokenizers that depend on their neighbours (SentencePiece's leading-space stripping, byte-level
BPE's multi-byte characters) decoding as they do inside the full sequence.

Invariants:
- `prefix_offset <= read_offset <= len(output ids)`; `ids[:read_offset]` have been emitted
  and `read_offset` falls on a character boundary (the text up to it did not end in U+FFFD).
- Text is emitted only when it does not end in U+FFFD: a multi-byte character split over
  tokens is held back until completed (or until `flush()` at the end of the sequence).
- `text` is the concatenation of every delta returned so far, and after `flush()` it equals
  `tokenizer.decode(output_ids, skip_special_tokens)`. (When a window's text does not extend
  its context's text, which well-behaved tokenizers never do, the full output is re-decoded.)
- The prompt is not decoding context: the output text is `decode(output ids)` alone, so a
  SentencePiece first token has no leading space and a prompt ending mid-character does not
  complete the output's first character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"  # what decoders emit for incomplete or invalid UTF-8


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...


class IncrementalDetokenizer:
    """Owns the output token ids and emitted text of one sequence.

    Cost per `append` is two decodes of a window of a few tokens, O(window), not O(length).
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.num_prompt_tokens = len(prompt_token_ids)  # not decoding context; see module doc
        self.skip_special_tokens = skip_special_tokens
        self.output_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._text = ""

    @property
    def text(self) -> str:
        """All output text emitted so far (without held-back incomplete characters)."""
        return self._text

    @property
    def num_pending_tokens(self) -> int:
        """Tokens appended whose text is held back (incomplete UTF-8)."""
        return len(self.output_ids) - self.read_offset

    def append(self, token_id: int) -> str:
        """Add one output token; return the newly decodable text (possibly "")."""
        self.output_ids.append(token_id)
        window = self.output_ids[self.prefix_offset :]
        context_len = self.read_offset - self.prefix_offset
        context_text = self._decode(window[:context_len]) if context_len else ""
        window_text = self._decode(window)
        if window_text.endswith(_REPLACEMENT):
            return ""  # maybe an incomplete character: wait for the next token
        if window_text.startswith(context_text):
            delta = window_text[len(context_text) :]
        else:
            delta = self._delta_from_full_decode()
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.output_ids)
        return self._emit(delta)

    def flush(self) -> str:
        """End of sequence: emit held-back text (e.g. a trailing U+FFFD) so `text` is final."""
        if self.read_offset == len(self.output_ids):
            return ""
        self.prefix_offset = self.read_offset = len(self.output_ids)
        return self._emit(self._delta_from_full_decode())

    def _delta_from_full_decode(self) -> str:
        # Emitted text cannot be taken back; if a tokenizer rewrote it (not prefix-stable),
        # the best we can do is to emit what lies beyond it.
        return self._decode(self.output_ids)[len(self._text) :]

    def _emit(self, delta: str) -> str:
        self._text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def find_stop(
    text: str, stop: Sequence[str], num_new_chars: int, include_stop: bool
) -> tuple[str, int] | None:
    """Look for a stop string that ends within the last `num_new_chars` characters of `text`.

    Only matches overlapping the new characters are considered (earlier text was checked on
    earlier steps), so a match may start up to `len(s) - 1` characters before them. Returns
    `(truncated_text, index into stop)` for the earliest match in the text (ties: the earlier
    entry of `stop`), cut just before the stop string, or just after it if `include_stop`;
    None when nothing matches.
    """
    if num_new_chars <= 0:
        return None
    best: tuple[int, int] | None = None  # (position in text, index in stop)
    for i, s in enumerate(stop):
        start = max(0, len(text) - num_new_chars - len(s) + 1)
        pos = text.find(s, start)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, i)
    if best is None:
        return None
    pos, i = best
    end = pos + len(stop[i]) if include_stop else pos
    return text[:end], i
