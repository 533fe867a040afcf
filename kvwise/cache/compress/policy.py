"""Eviction policies over a request's kept KV slots.

`streaming` (StreamingLLM, Xiao et al. 2024, "Efficient Streaming Language Models with
Attention Sinks", Sec. 3.2): keep the first `sink_tokens` tokens (the attention sinks) and the
most recent `window_tokens`; evict the ones in between. Every layer and KV head evicts the same
tokens, so a streaming request has one KV group. Keys keep their original positions (they are
stored after RoPE and never rewritten) and queries use their true positions; the paper instead
re-indexes positions inside the cache, which would mean re-rotating every kept key per step.

Eviction runs only when it frees a whole block: when the kept slots reach sink + window + S,
the oldest S of the window go (S = block size), so the window is window..window+S-1 recent
tokens, compaction copies the window once per S tokens (not every token), and a request never
holds more than ceil((sink + window) / S) + 1 blocks, whatever its output length.

Invariants:
- A policy is stateless and pure: `evict_slots(num_kept)` depends only on its arguments; the
  slots it returns are a contiguous range of kept slots, never a sink slot, never one of the
  `window_tokens` most recent.
- The neutral setting (a window larger than anything the request will hold) evicts nothing, so
  the request runs exactly as without compression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from kvwise.config import KV_COMPRESSIONS


class CompressionPolicy(Protocol):
    name: str
    # True: the request gets one KV group per (layer, KV head), so its heads can keep
    # different tokens (FastGen); False: one group, every plane evicts the same tokens
    per_head: bool

    def evict_slots(self, num_kept: int) -> Optional[range]:
        """The kept slots (of the request's one group, in table order) to evict after a step
        that left `num_kept` of them; None: nothing."""
        ...

    def max_blocks(self) -> int:
        """Blocks one request can hold under this policy (after its prompt is prefilled)."""
        ...


@dataclass(frozen=True)
class StreamingPolicy:
    sink_tokens: int
    window_tokens: int
    block_size: int
    name: str = "streaming"
    per_head: bool = False

    def __post_init__(self) -> None:
        assert self.sink_tokens >= 0 and self.window_tokens >= 1 and self.block_size >= 1

    def evict_slots(self, num_kept: int) -> Optional[range]:
        keep = self.sink_tokens + self.window_tokens
        if num_kept < keep + self.block_size:
            return None
        return range(self.sink_tokens, num_kept - self.window_tokens)

    def max_blocks(self) -> int:
        keep = self.sink_tokens + self.window_tokens
        return -(-keep // self.block_size) + 1


def make_policy(name: str, sink_tokens: int, window_tokens: Optional[int],
                block_size: int) -> Optional[CompressionPolicy]:
    """The policy for these (already validated) settings; None for "none"."""
    if name == "none":
        return None
    if name == "streaming":
        assert window_tokens is not None
        return StreamingPolicy(sink_tokens, window_tokens, block_size)
    raise ValueError(f"kv_compression: unknown {name!r}; known: {KV_COMPRESSIONS}")
