"""Tokenizer: ids against HF transformers (and llama.cpp where installed), round trips, chat
templates against HF `apply_chat_template`, SentencePiece path, message validation."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwise.errors import InvalidRequestError
from kvwise.model.tokenizer import FALLBACK_CHAT_TEMPLATE, Tokenizer
from tests.conftest import pydoc_text

EXTRA_TEXTS = [
    "Hello world", "héllo wörld — naïve café", "日本語のテキストと中文", "Привет, мир!",
    "emoji 🤗🚀👩‍👩‍👧‍👦 and flags 🇫🇷", "def f(x):\n    return x**2\t\t# comment\n",
    "   leading and trailing   ", "tabs\t\tand\r\nCRLF\n\n\n\nnewlines", "a" * 300,
    "1234567890 3.14159 1e-5 0x1F 2024-06-01", "x  12\n\n 3", "  1", "$$$!!!???...",
    "<|im_start|>user\nhi<|im_end|>\n", "mixed <|endoftext|> special in text", "",
]
# llama.cpp 0.3.36 on the SmolLM2 GGUF (tokenizer.ggml.pre = "smollm": every digit is its own
# pre-token, so a whitespace run before a digit stays one token). Independent golden values.
LLAMA_CPP_GOLDEN = {"  1": [256, 33], "x  12\n\n 3": [104, 256, 33, 34, 8866, 35],
                    "Hello world": [19556, 905]}


def _paragraphs() -> list[str]:
    return [p for p in pydoc_text().split("\n\n") if p.strip()]


def _collapse_space_before_digit(text: str) -> str:
    # transformers' GGUF tokenizer drops SmolLM's digit pre-split, so "  1" differs there:
    # HF gives ["Ġ", "Ġ", "1"], llama.cpp and SmolLM2's tokenizer.json give ["ĠĠ", "1"].
    return re.sub(r"(?<=\s)\s+(?=\d)", "", text)


@pytest.fixture(scope="session")
def ours(smollm_gguf: str) -> Tokenizer:
    return Tokenizer.from_gguf(smollm_gguf)


def test_special_ids_and_bos_policy(ours: Tokenizer, hf_tokenizer) -> None:
    assert ours.vocab_size == len(hf_tokenizer) == 49152
    assert ours.bos_token_id == hf_tokenizer.bos_token_id == 1
    # <|im_end|> is the metadata eos; <|endoftext|> ends generation too (llama.cpp's EOG set)
    assert ours.eos_token_ids == (2, 0)
    assert set(hf_tokenizer.all_special_ids) <= ours.all_special_ids
    assert ours.all_special_ids == frozenset(range(17))  # the 17 CONTROL tokens of the file
    # tokenizer.ggml.add_bos_token is false for SmolLM2: nothing is added
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False) == hf_tokenizer.encode(
        "hi")
    assert ours.encode("<|im_start|>user") == [1, 4093]


def test_encode_matches_hf(ours: Tokenizer, hf_tokenizer) -> None:
    texts = [_collapse_space_before_digit(t) for t in _paragraphs() + EXTRA_TEXTS]
    ref = hf_tokenizer(texts, add_special_tokens=True)["input_ids"]
    mismatched = [t[:60] for t, r in zip(texts, ref) if ours.encode(t) != r]
    assert not mismatched, mismatched[:3]
    joined = _collapse_space_before_digit("\n\n".join(texts))
    assert ours.encode(joined) == hf_tokenizer.encode(joined)


def test_encode_matches_llama_cpp_golden(ours: Tokenizer) -> None:
    for text, ids in LLAMA_CPP_GOLDEN.items():
        assert ours.encode(text) == ids, text


def test_encode_matches_llama_cpp(ours: Tokenizer, smollm_gguf: str) -> None:
    """llama.cpp is the runtime the GGUF was made for; compare on the raw texts."""
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(smollm_gguf, vocab_only=True, verbose=False)
    texts = _paragraphs()[:400] + EXTRA_TEXTS
    mismatched = [t[:60] for t in texts
                  if ours.encode(t) != vocab.tokenize(t.encode(), add_bos=False, special=True)]
    assert not mismatched, mismatched[:3]


def test_decode_round_trip(ours: Tokenizer, hf_tokenizer) -> None:
    for text in _paragraphs()[:300] + EXTRA_TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        if "<|" not in text:
            assert ours.decode(ids) == text
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ours.decode(ids) == "user\nhi" == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.convert_ids_to_tokens(ids) == hf_tokenizer.convert_ids_to_tokens(ids)
    with pytest.raises(InvalidRequestError):
        ours.convert_ids_to_tokens([ours.vocab_size + 5])


# SmolLM2's vocabulary lacks the byte tokens of a few control characters (0x04, 0x06, 0x13,
# 0x14, 0x16, 0x1d) and of UTF-8 lead bytes 0xF1/0xF2 (U+40000..U+BFFFF): those cannot round-trip.
_ENCODABLE = st.characters(exclude_categories=("Cs", "Cc"), max_codepoint=0x3FFFF) | (
    st.sampled_from("\n\t\r\x00\x1b"))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=_ENCODABLE, max_size=80))
def test_round_trip_property(text: str) -> None:
    tok = _smollm_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


_CACHE: dict[str, Tokenizer] = {}


def _smollm_tokenizer() -> Tokenizer:
    # hypothesis tests cannot take function-scoped fixtures; build once per process
    if "smollm" not in _CACHE:
        from kvwise.model.registry import lookup, package_file

        _CACHE["smollm"] = Tokenizer.from_gguf(package_file(lookup("smollm2-135m")))
    return _CACHE["smollm"]


CONVERSATIONS = [
    ([{"role": "user", "content": "What is a KV cache?"}], True),
    ([{"role": "system", "content": "You are terse."},
      {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"},
      {"role": "user", "content": "And 3+3? ünïcödé 🤗"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!\n\nBye"}],
     False),
]


@pytest.mark.parametrize("messages,add_generation_prompt", CONVERSATIONS)
def test_chat_template_matches_hf(ours: Tokenizer, hf_tokenizer, messages,
                                  add_generation_prompt: bool) -> None:
    ref = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == ref
    assert ours.encode(got, add_special_tokens=False) == hf_tokenizer.encode(
        ref, add_special_tokens=False)


@pytest.mark.parametrize("bad", [
    [], "hello", [{"role": "user"}], [{"content": "x"}], [{"role": "user", "content": 3}],
    ["user: hi"], [{"role": None, "content": "x"}],
])
def test_invalid_messages(ours: Tokenizer, bad) -> None:
    with pytest.raises(InvalidRequestError) as e:
        ours.apply_chat_template(bad)
    assert e.value.param == "messages"


def test_fallback_template_and_bos(tiny_gguf) -> None:
    path = tiny_gguf(tokenizer={"add_bos": True})["path"]
    tok = Tokenizer.from_gguf(path)
    assert tok.chat_template is None
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "system: S\nuser: hi\nassistant:"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "system: S\nuser: hi\n"
    assert "assistant" in FALLBACK_CHAT_TEMPLATE
    # add_bos_token true: encode prepends <|im_start|> (id 257 in the tiny vocabulary)
    assert tok.encode("hi") == [257] + tok.encode("hi", add_special_tokens=False)
    assert tok.bos_token_id == 257 and tok.eos_token_ids == (258, 256)


def test_template_raise_exception_is_invalid_request(tiny_gguf) -> None:
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
                "{% endif %}{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}"
                "{% endfor %}")
    tok = Tokenizer.from_gguf(tiny_gguf(tokenizer={"chat_template": template})["path"])
    assert tok.apply_chat_template([{"role": "user", "content": "é\""}]) == '<|im_start|>"é\\""'
    with pytest.raises(InvalidRequestError, match="first must be user") as e:
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    assert e.value.param == "messages"


SPM_PIECES = ["\u2581", "t", "h", "e", "a", "n", "d", "o", "w", "r", "l", "H", "i", "s", "\u2581t",
              "he", "\u2581the", "\u2581a", "nd", "\u2581and", "or", "ld", "\u2581w", "\u2581wor",
              "\u2581world", "el", "lo", "\u2581H", "\u2581Hel", "\u2581Hello", "\u2581i",
              "\u2581is", "\u2581\u2581", "\u2581\u2581\u2581\u2581"]


def test_sentencepiece_gguf_matches_hf(tiny_gguf) -> None:
    """tokenizer.ggml.model == "llama": merges derived from scores, byte fallback, Metaspace."""
    transformers = pytest.importorskip("transformers")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    spm = {"model": "llama", "pre": None, "tokens": tokens, "merges": None,
           "token_types": [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES),
           "scores": [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))],
           "bos": 1, "eos": 2, "unk": 0, "add_bos": True, "add_space_prefix": True}
    path = tiny_gguf(tokenizer=spm, filename="spm.gguf")["path"]
    ours = Tokenizer.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                     gguf_file=os.path.basename(path))
    texts = ["Hello world", "the world and the hello", "Hello  world    is", "héllo 🤗\nthe",
             "tHe", " leading", "<s>Hello</s> world", "", "Hello, world!"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text),
                                                            skip_special_tokens=True), text
    assert ours.encode("Hello world")[0] == 1  # BOS by default for SentencePiece vocabularies
    assert ours.encode("Hello world", add_special_tokens=False) == [259 + 29, 259 + 24]
