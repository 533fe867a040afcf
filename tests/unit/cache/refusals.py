"""Shared check of the KV manager state machines: an operation its `can_*` query refused must
raise OutOfBlocksError and leave the manager exactly as it was."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvwise.errors import OutOfBlocksError


def assert_refused_unchanged(snapshot: Callable[[], Any], op: Callable[[], Any],
                             name: str) -> None:
    """`op()` (the manager's `name`, which `can_<name>` refused) raises OutOfBlocksError and
    `snapshot()` is the same before and after."""
    before = snapshot()
    try:
        op()
    except OutOfBlocksError:
        pass
    else:
        raise AssertionError(f"{name} succeeded although can_{name} said no")
    assert snapshot() == before
