"""Fixtures for tests/chain: a fresh chain state per test (see chain_world.py for the accounts)."""

from __future__ import annotations

import pytest
from chain_world import World, make_world


@pytest.fixture(scope="session")
def _template() -> tuple[World, int]:
    world = make_world()
    return world, world.backend.snapshot()


@pytest.fixture
def world(_template: tuple[World, int]) -> World:
    """The deployed world, reverted to the state right after setup: each test starts on a fresh chain
    state (same addresses) without paying ~1 s of deployment and staking again."""
    template, snapshot = _template
    template.backend.revert(snapshot)
    template.extra.clear()
    return template
