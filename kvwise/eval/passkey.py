"""Passkey retrieval (`kvwise eval passkey`): a 5-digit number hidden at a random depth in
repeated filler text, asked for at the end; does a KV format keep long-context retrieval?

The prompt is the classic construction of Mohtashami & Jaggi 2023 ("Landmark Attention", arXiv
2305.16300), as LongLoRA (arXiv 2309.12307) and KVQuant (arXiv 2401.18079) use it: the
instruction, the filler sentences repeated, the passkey line inserted between two filler
sentences at a seeded random depth, then the question, which ends in "The pass key is" so that
the answer is the next tokens.
Prompts are built in token ids with the engine's tokenizer, so a prompt is exactly
`context_len` tokens: the filler is cut to the length left after the instruction, the passkey
line and the question (its last sentence cut mid-way). Style `plain` is that text as is; `chat`
wraps instruction + haystack + "What is the pass key?" in the model's chat template as one user
turn and starts the assistant's turn with "The pass key is". `plain` is the default: on the
bundled SmolLM2-135M-Instruct with a float16 cache both found 6 of 6 keys at 2048 tokens, but at
7168 plain found 3 of 3 and chat 1 of 3 (it answered "a magical key that allows you to ...").

A trial passes when the first integer in the greedy continuation (`MAX_TOKENS` tokens) equals
its passkey. A setting is one (kv_cache_dtype, context_len); per setting: `accuracy` = passed /
trials, and `seconds`, the wall time of its trials (engine loading and a short warm-up per
engine excluded). One engine is built per KV format, all of them before the first trial, and
each runs every length; settings run length by length, every format at one length before the
next length. Trials run one at a time, in order, through `LLM.generate`, i.e. the engine's own
scheduler, chunked prefill and (when enabled) prefix cache: all prompts share the tokens before
their passkey, so a trial's prefill can hit blocks an earlier trial left in the cache.

What a lossy format is tested on: a prefill chunk attends to its own fresh K/V and reads the
earlier chunks (and cached blocks) through the format; every decode step reads the whole history
through it. The key's digits are decode tokens (the first answer token is the space before them
for the bundled model), so every format reads the passkey line from its own storage whatever
the chunk size; with chunks of `max_num_batched_tokens` the question's prefill reads it from
there too unless both sit in the last chunk.

Invariants:
- Trials depend only on (tokenizer, context_len, num_trials, seed, style): every KV format is
  scored on identical prompts.
- A prompt holds the passkey line exactly once; instruction, filler and question hold no digit.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from kvwise.errors import InvalidRequestError
from kvwise.eval.limits import check_fits
from kvwise.sampling_params import SamplingParams

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about the important information there.")
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.",
                    "Here we go.", "There and back again.")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_START = "The pass key is"
PROMPT_STYLES = ("plain", "chat")
MAX_TOKENS = 8  # greedy tokens decoded per trial: a 5-digit key and its period, with slack
RESULT_KEYS = ("setting", "context_len", "accuracy", "passed", "trials", "seconds", "failed")
_CONTENT = "\ue000"  # a private-use character standing for the user turn's content


@dataclass(frozen=True)
class PasskeyTrial:
    passkey: int  # 5 digits
    depth: float  # requested position of the passkey line in the filler, in [0, 1)
    token_ids: list[int]  # the prompt, exactly context_len ids
    key_start: int  # index in token_ids where the passkey line starts
    num_filler_tokens: int  # filler ids in the prompt (before + after the passkey line)


def make_trials(tokenizer: Any, context_len: int, num_trials: int, seed: int,
                style: str = "plain") -> list[PasskeyTrial]:
    """`num_trials` prompts of exactly `context_len` token ids; passkey and depth per trial from
    a generator seeded by (seed, context_len)."""
    if num_trials < 1:
        raise InvalidRequestError(f"trials must be >= 1, got {num_trials}", "trials")
    head, tail = _frame(tokenizer, style)
    rng = random.Random(f"passkey:{seed}:{context_len}")
    trials = []
    for _ in range(num_trials):
        key, depth = rng.randint(10000, 99999), rng.random()
        line = _encode(tokenizer, " " + KEY_LINE.format(key=key))
        num_filler = context_len - len(head) - len(line) - len(tail)
        if num_filler < 0:
            raise InvalidRequestError(
                f"context_len {context_len} is shorter than the prompt without filler "
                f"({context_len - num_filler} tokens)", "context_lens")
        filler, boundaries = _filler(tokenizer, num_filler)
        cut = min(boundaries, key=lambda b: abs(b - depth * num_filler))
        ids = head + filler[:cut] + line + filler[cut:] + tail
        assert len(ids) == context_len, (len(ids), context_len)
        trials.append(PasskeyTrial(key, depth, ids, len(head) + cut, num_filler))
    return trials


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _frame(tokenizer: Any, style: str) -> tuple[list[int], list[int]]:
    """-> (ids before the filler, ids after it) for `style`."""
    if style == "plain":
        # special tokens as the engine adds them to a text prompt (BOS where the model asks)
        head = tokenizer.encode(INSTRUCTION)
        return head, _encode(tokenizer, f" {QUESTION} {ANSWER_START}")
    if style == "chat":
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _CONTENT}],
                                                 add_generation_prompt=True)
        if rendered.count(_CONTENT) != 1:
            raise InvalidRequestError("the model's chat template does not hold the user's "
                                      "content verbatim; use --prompt-style plain", "prompt_style")
        before, after = rendered.split(_CONTENT)
        return (_encode(tokenizer, before + INSTRUCTION),
                _encode(tokenizer, f" {QUESTION}{after}{ANSWER_START}"))
    raise InvalidRequestError(f"prompt_style must be one of {PROMPT_STYLES}, got {style!r}",
                              "prompt_style")


def _filler(tokenizer: Any, num_tokens: int) -> tuple[list[int], list[int]]:
    """-> (`num_tokens` ids of the filler sentences repeated, the indices in it where a whole
    sentence ends, 0 included). Each sentence is encoded alone with a leading space (the ids a
    tokenizer gives that sentence inside the running text)."""
    sentences = [_encode(tokenizer, " " + s) for s in FILLER_SENTENCES]
    ids: list[int] = []
    boundaries = [0]
    i = 0
    while len(ids) < num_tokens:
        ids += sentences[i % len(sentences)]
        i += 1
        if len(ids) <= num_tokens:
            boundaries.append(len(ids))
    return ids[:num_tokens], boundaries


_INTEGER = re.compile(r"\d+")


def first_integer(text: str) -> Optional[int]:
    """The first run of digits in `text` as an int; None when there is none."""
    m = _INTEGER.search(text)
    return int(m.group()) if m else None


def passes(output: str, passkey: int) -> bool:
    return first_integer(output) == passkey


@dataclass(frozen=True)
class PasskeyResult:
    setting: str
    context_len: int
    passed: int
    trials: int
    seconds: float
    failed: list[dict[str, Any]]  # one per failed trial: trial, passkey, depth, output

    @property
    def accuracy(self) -> float:
        return self.passed / self.trials

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RESULT_KEYS}


def setting_name(kv_cache_dtype: str) -> str:
    return f"kvwise/kv={kv_cache_dtype}"


def run_trials(llm: Any, setting: str, context_len: int, trials: Sequence[PasskeyTrial]
               ) -> PasskeyResult:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    failed = []
    t0 = time.perf_counter()
    for i, trial in enumerate(trials):
        (out,) = llm.generate([trial.token_ids], params, use_tqdm=False)
        text = out.outputs[0].text
        if not passes(text, trial.passkey):
            failed.append({"trial": i, "passkey": trial.passkey, "depth": round(trial.depth, 4),
                           "output": text})
    seconds = time.perf_counter() - t0
    return PasskeyResult(setting, context_len, len(trials) - len(failed), len(trials), seconds,
                         failed)


def measure(make_llm: Callable[[str], Any], kv_cache_dtypes: Sequence[str],
            context_lens: Sequence[int], num_trials: int, seed: int, style: str,
            report: Optional[Callable[[PasskeyResult], None]] = None) -> list[PasskeyResult]:
    """One result per (length, dtype), length-major, so that a run stopped early still compares
    every format at the lengths it finished. `make_llm(kv_cache_dtype)` builds an LLM; one is
    built per dtype, up front, and kept for every length (each holds its own KV pool). Lengths
    are checked against every engine and trials built (first engine's tokenizer) before any
    trial runs. `report` gets each result as soon as it is measured."""
    llms = {}
    for dtype in dict.fromkeys(kv_cache_dtypes):
        llms[dtype] = make_llm(dtype)
        for n in context_lens:  # each format's pool holds its own number of blocks
            check_fits(llms[dtype].engine, n + MAX_TOKENS,
                       f"a trial of {n} context + {MAX_TOKENS} answer tokens", "context_lens")
    tokenizer = next(iter(llms.values())).get_tokenizer()
    trials = {n: make_trials(tokenizer, n, num_trials, seed, style) for n in context_lens}
    for llm in llms.values():
        _warm_up(llm)
    results = []
    for n in context_lens:
        for dtype, llm in llms.items():
            results.append(run_trials(llm, setting_name(dtype), n, trials[n]))
            if report is not None:
                report(results[-1])
    return results


def _warm_up(llm: Any) -> None:
    """A short prompt through a prefill and a few decode steps, so that kernels compiled on
    first use (numba) are not timed as the first setting's seconds. Its ids hold no filler
    sentence in order, so it leaves no prefix in the cache that a trial could hit."""
    ids = list(reversed(make_trials(llm.get_tokenizer(), 96, 1, 0)[0].token_ids))
    llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)


def format_line(r: PasskeyResult) -> str:
    return (f"{r.setting:<24} context_len={r.context_len} accuracy={r.accuracy:.4f} "
            f"passed={r.passed} trials={r.trials} seconds={r.seconds:.1f}")
