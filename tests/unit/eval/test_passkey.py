"""`kvwise eval passkey`: prompts of exact token length with the passkey line once at the asked
depth, identical trials for one seed, the scoring rule, and `measure`'s plumbing (a fake LLM)."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest

from kvwise.errors import InvalidRequestError
from kvwise.eval.passkey import (
    ANSWER_START,
    FILLER_SENTENCES,
    INSTRUCTION,
    KEY_LINE,
    MAX_TOKENS,
    QUESTION,
    RESULT_KEYS,
    PasskeyResult,
    first_integer,
    format_line,
    make_trials,
    measure,
    passes,
)
from kvwise.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(gguf_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


def _line(tok: Tokenizer, key: int) -> list[int]:
    return tok.encode(" " + KEY_LINE.format(key=key), add_special_tokens=False)


@pytest.mark.parametrize("style", ["plain", "chat"])
@pytest.mark.parametrize("context_len", [120, 256, 2048, 7168])
def test_prompt_has_exact_length_and_the_key_once(tok, style, context_len):
    trials = make_trials(tok, context_len, 5, seed=0, style=style)
    assert len(trials) == 5
    for t in trials:
        assert len(t.token_ids) == context_len
        assert 10000 <= t.passkey <= 99999
        line = _line(tok, t.passkey)
        assert t.token_ids[t.key_start:t.key_start + len(line)] == line
        text = tok.decode(t.token_ids, skip_special_tokens=False)
        assert text.count(KEY_LINE.format(key=t.passkey)) == 1
        assert re.findall(r"\d+", text) == [str(t.passkey)] * 2  # no other digit anywhere
        assert text.endswith(ANSWER_START)


def test_plain_prompt_reads_as_the_classic_text(tok):
    (t,) = make_trials(tok, 300, 1, seed=3)
    text = tok.decode(t.token_ids)
    assert text.startswith(INSTRUCTION + " " + " ".join(FILLER_SENTENCES[:2]))
    assert text.endswith(f" {QUESTION} {ANSWER_START}")


def test_chat_prompt_is_one_user_turn_and_the_answer_started(tok):
    (t,) = make_trials(tok, 300, 1, seed=3, style="chat")
    text = tok.decode(t.token_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")
    assert f"<|im_start|>user\n{INSTRUCTION} The grass is green." in text
    assert text.endswith(f" {QUESTION}<|im_end|>\n<|im_start|>assistant\n{ANSWER_START}")


def test_key_sits_at_the_sentence_boundary_nearest_its_depth(tok):
    head = len(tok.encode(INSTRUCTION))
    longest = max(len(tok.encode(" " + s, add_special_tokens=False)) for s in FILLER_SENTENCES)
    trials = make_trials(tok, 4096, 20, seed=1)
    for t in trials:
        cut = t.key_start - head  # filler ids before the key line
        assert abs(cut - t.depth * t.num_filler_tokens) <= longest / 2 + 1
        before = tok.decode(t.token_ids[:t.key_start])
        assert before.endswith(".")  # a whole sentence ends right before the key line
    depths = sorted(t.depth for t in trials)
    assert depths[0] < 0.2 and depths[-1] > 0.8  # spread over the context, not bunched


def test_key_at_depth_zero_follows_the_instruction(tok, monkeypatch):
    import random

    monkeypatch.setattr(random.Random, "random", lambda self: 0.0)
    (t,) = make_trials(tok, 256, 1, seed=0)
    assert t.depth == 0.0 and t.key_start == len(tok.encode(INSTRUCTION))


def test_same_seed_same_trials_other_seed_or_length_other_trials(tok):
    a = make_trials(tok, 1024, 20, seed=0)
    assert make_trials(tok, 1024, 20, seed=0) == a
    b = make_trials(tok, 1024, 20, seed=1)
    assert [t.passkey for t in b] != [t.passkey for t in a]
    c = make_trials(tok, 2048, 20, seed=0)
    assert [t.passkey for t in c] != [t.passkey for t in a]
    assert len({t.passkey for t in a}) == 20


def test_too_short_context_and_bad_arguments_are_refused(tok):
    with pytest.raises(InvalidRequestError, match="shorter than the prompt without filler") as e:
        make_trials(tok, 40, 1, seed=0)
    assert e.value.param == "context_lens"
    with pytest.raises(InvalidRequestError, match="prompt_style"):
        make_trials(tok, 256, 1, seed=0, style="markdown")
    with pytest.raises(InvalidRequestError, match="trials"):
        make_trials(tok, 256, 0, seed=0)


@pytest.mark.parametrize("output, expect", [
    (" 68437.", True), ("68437", True), (" 68437 is the pass key.", True),
    ("\n\nThe pass key is 68437.", True), (" -68437", True),
    (" 6843", False), (" 684370", False), (" 68438.", False), (" 1. 68437", False),
    (" 68 437", False), (" 68,437", False), ("", False), (" the grass is green", False),
])
def test_passes_when_the_first_integer_is_the_key(output, expect):
    assert passes(output, 68437) is expect


def test_first_integer():
    assert first_integer("abc 0012 34") == 12
    assert first_integer("no digits") is None


def test_result_json_keys_and_accuracy():
    r = PasskeyResult("kvwise/kv=float16", 2048, 17, 20, 1.5, [])
    assert r.accuracy == 0.85
    assert list(r.as_json()) == list(RESULT_KEYS)


class _FakeLLM:
    """Answers with the prompt's passkey, or with it + 1 when `wrong`; records prompts."""

    def __init__(self, tok: Tokenizer, kv_cache_dtype: str, seen: dict[str, list[Any]]) -> None:
        self.tok, self.wrong = tok, kv_cache_dtype == "int2"
        self.engine = SimpleNamespace(max_model_len=1024, num_blocks=64,
                                      config=SimpleNamespace(block_size=16))
        self.seen = seen.setdefault(kv_cache_dtype, [])

    def get_tokenizer(self) -> Tokenizer:
        return self.tok

    def generate(self, prompts, params, use_tqdm=True):
        assert params.temperature == 0.0 and params.max_tokens in (3, MAX_TOKENS)
        outs = []
        for ids in prompts:
            key = first_integer(self.tok.decode(ids)) or 0
            self.seen.append(ids)
            text = f" {key + 1 if self.wrong else key}."
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=text)]))
        return outs


def test_measure_runs_every_dtype_on_the_same_prompts(tok):
    seen: dict[str, list[Any]] = {}
    reported = []
    results = measure(lambda d: _FakeLLM(tok, d, seen), ["float16", "int2"], [256, 512], 3,
                      seed=0, style="plain", report=reported.append)
    assert reported == results
    assert [(r.setting, r.context_len) for r in results] == [  # length-major
        ("kvwise/kv=float16", 256), ("kvwise/kv=int2", 256),
        ("kvwise/kv=float16", 512), ("kvwise/kv=int2", 512)]
    assert [(r.passed, r.trials) for r in results] == [(3, 3), (0, 3), (3, 3), (0, 3)]
    assert [f["trial"] for f in results[1].failed] == [0, 1, 2]
    assert results[1].failed[0]["output"] == f" {results[1].failed[0]['passkey'] + 1}."
    assert seen["float16"][1:] == seen["int2"][1:]  # after the warm-up prompt: identical trials
    assert [len(p) for p in seen["float16"][1:]] == [256] * 3 + [512] * 3


def test_measure_refuses_a_length_over_max_model_len_before_any_trial(tok):
    seen: dict[str, list[Any]] = {}
    with pytest.raises(InvalidRequestError, match="exceeds max_model_len=1024"):
        measure(lambda d: _FakeLLM(tok, d, seen), ["float16", "int2"], [256, 1024], 1, 0,
                "plain")
    assert seen == {"float16": []}  # nothing ran, and the second engine was never built


def test_format_line_is_key_value_fields():
    line = format_line(PasskeyResult("kvwise/kv=nuq3-1%", 4096, 19, 20, 83.25, []))
    assert line.split()[0] == "kvwise/kv=nuq3-1%"
    assert dict(f.split("=", 1) for f in line.split()[1:]) == {
        "context_len": "4096", "accuracy": "0.9500", "passed": "19", "trials": "20",
        "seconds": "83.2"}
