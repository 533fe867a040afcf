"""Typed exceptions raised at kvwise's boundaries (CLI, API, config, loaders).

Invariants:
- Bad user input raises an `InvalidRequestError` naming the offending field in `param`;
  the engine state is untouched when it is raised.
- A refused export/import raises a `TransferError` naming what differs in `field`; neither
  engine is changed when it is raised.
- Internal invariants use `assert`, never these classes.
"""

from __future__ import annotations

from typing import Optional


class KvwiseError(Exception):
    """Base class of every error kvwise raises on purpose."""


class InvalidRequestError(KvwiseError, ValueError):
    """A request (prompt or sampling parameters) is invalid; `param` names the field."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(KvwiseError, ValueError):
    """An engine or model configuration value is invalid; `param` names the field."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ModelNotFoundError(KvwiseError, FileNotFoundError):
    """The model name, path or hub id could not be resolved to weights."""


class WeightLoadError(KvwiseError, RuntimeError):
    """A weight file exists but is corrupt, truncated or of an unsupported format."""


class OutOfBlocksError(KvwiseError, RuntimeError):
    """A request can never fit in the KV block pool, even running alone."""


class TransferError(KvwiseError, ValueError):
    """A request cannot leave or enter an engine (export/import): unknown or unexportable
    request, unreadable bytes, or data from an incompatible engine. `field` names what differs
    (e.g. "kv_format", "model", "block_size", "kv_blocks"); the engine is unchanged (an export
    past a held request's lease finds that request expired, as the next step would have)."""

    def __init__(self, message: str, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
