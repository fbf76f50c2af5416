"""Fixtures for the data-plane tests: real libp2p hosts on 127.0.0.1 with ChannelServices, in one trio
process (the machinery is in channel_helpers.py, so test modules can name its types)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from channel_helpers import KINDS, MeshFactory, open_mesh


@pytest.fixture
def channel_mesh(tmp_path: Path) -> MeshFactory:
    """``async with channel_mesh(n, config) as mesh:`` starts n hosts with ChannelServices and connects
    every pair on the control plane (see open_mesh)."""
    return partial(open_mesh, tmp_path)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Runs a test once over direct TCP channels and once over the libp2p-stream fallback."""
    return str(request.param)
