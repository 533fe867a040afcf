"""Real text available without downloads, by name: for perplexity and benchmarks.

Invariants:
- A dataset name always yields the same text (sorted keys, fixed joins), so figures repeat.
"""

from __future__ import annotations

import os

from kvwise.errors import InvalidRequestError

BIBLE_DIR = "/usr/share/bible-kjv-text"


def pydoc_topics() -> str:
    """The Python reference's help topics (ships with every CPython as pydoc_data.topics)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def bible_kjv() -> str:
    """Debian's bible-kjv-text package (apt-get install bible-kjv-text)."""
    if not os.path.isdir(BIBLE_DIR):
        raise InvalidRequestError(
            f"dataset: bible-kjv needs Debian's bible-kjv-text ({BIBLE_DIR} not found)", "dataset")
    parts = []
    for name in sorted(os.listdir(BIBLE_DIR)):
        with open(os.path.join(BIBLE_DIR, name), encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    return "\n".join(parts)


DATASETS = {"pydoc-topics": pydoc_topics, "bible-kjv": bible_kjv}


def load_text(name: str) -> str:
    if name not in DATASETS:
        raise InvalidRequestError(f"dataset: unknown {name!r}; known: {sorted(DATASETS)}",
                                  "dataset")
    return DATASETS[name]()
