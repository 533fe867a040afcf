"""Build pydoc_cloze.jsonl: a last-word cloze task from Python's own docs (ships offline).

Each item is one sentence of `pydoc_data.topics` (the text `help()` shows): the context is the
sentence without its last word, the choices are that word and 3 last words of other sentences
(distinct, seeded). lm-eval scores each choice's loglikelihood after the context (`acc`).

Run from the repository root: python bench/lm_eval_tasks/make_pydoc_cloze.py
"""

from __future__ import annotations

import json
import pydoc_data.topics
import random
import re
from pathlib import Path

NUM_ITEMS = 300
SEED = 0
OUT = Path(__file__).with_name("pydoc_cloze.jsonl")


def sentences() -> list[tuple[str, str]]:
    """(context, last word) of every plain prose sentence of 8..30 words ending in a word."""
    out = []
    for key in sorted(pydoc_data.topics.topics):
        text = re.sub(r"\s+", " ", pydoc_data.topics.topics[key])
        for sent in re.split(r"(?<=[.!?])\s+", text):
            words = sent.rstrip(".").split(" ")
            if not 8 <= len(words) <= 30 or not sent.endswith("."):
                continue
            last = words[-1]
            if not re.fullmatch(r"[a-z]{3,}", last) or not sent[0].isupper():
                continue
            out.append((" ".join(words[:-1]), last))
    return list(dict.fromkeys(out))


def main() -> None:
    rng = random.Random(SEED)
    pool = sentences()
    items = rng.sample(pool, NUM_ITEMS)
    words = sorted({w for _, w in pool})
    with OUT.open("w") as f:
        for context, answer in items:
            distractors = rng.sample([w for w in words if w != answer], 3)
            choices = [answer, *distractors]
            rng.shuffle(choices)
            f.write(json.dumps({"context": context, "choices": choices,
                                "label": choices.index(answer)}) + "\n")
    print(f"{len(items)} items of {len(pool)} sentences -> {OUT}")


if __name__ == "__main__":
    main()
