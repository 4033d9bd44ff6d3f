"""Prefect Block types of the project (escalation) and their registration."""

from __future__ import annotations

from typing import TypeVar, cast

from prefect.blocks.core import Block

B = TypeVar("B", bound=Block)


def load_block(block_type: type[B], name: str) -> B:
    """The block document `name` of `block_type`, loaded synchronously even from an async context."""
    # Prefect's async_dispatch wrapper reads `_sync` and hides it from load()'s signature.
    return cast(B, block_type.load(name, _sync=True))  # type: ignore[call-arg]
