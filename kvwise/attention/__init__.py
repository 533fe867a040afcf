"""Attention backends, chosen by name (`--attention-backend`)."""

from kvwise.attention import paged, reference, two_phase  # noqa: F401  (register the backends)
from kvwise.attention.backend import (
    AttentionMetadata,
    PrefillSpan,
    available_backends,
    get_backend,
)

__all__ = ["AttentionMetadata", "PrefillSpan", "available_backends", "get_backend"]
