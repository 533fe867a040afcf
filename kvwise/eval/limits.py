"""What an eval request may ask of an engine, checked before it runs (no torch here: the CLI
imports it to answer --help and bad flags at once)."""

from __future__ import annotations

from typing import Any

from kvwise.errors import InvalidRequestError


def check_fits(engine: Any, total: int, what: str, field: str) -> None:
    """Refuse, naming `field`, an eval request of `total` tokens (`what`, e.g. "a window of
    1024 tokens") that the engine's max_model_len or KV pool cannot hold."""
    if total > engine.max_model_len:
        raise InvalidRequestError(f"{what} exceeds max_model_len={engine.max_model_len}",
                                  field)
    need = -(-total // engine.config.block_size)
    if need > engine.num_blocks:
        raise InvalidRequestError(f"{what} needs {need} KV blocks, the pool has "
                                  f"{engine.num_blocks}; raise --kv-cache-memory", field)
