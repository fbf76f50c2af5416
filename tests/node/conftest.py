"""Fixtures for tests that run real node processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nodes import NodeProcess


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start nodes with `start_node("name", *flags)`; every node still running is killed at the end."""
    started: list[NodeProcess] = []

    def start(
        name: str, *args: str, data_dir: Path | None = None, wait: bool = True, config: str | None = None
    ) -> NodeProcess:
        """wait=False returns at once (call .wait_ready() later), so several nodes can boot in parallel;
        config is written to the node's config.toml first."""
        data_dir = data_dir or tmp_path / name
        if config is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            (data_dir / "config.toml").write_text(config)
        node = NodeProcess(data_dir, *args)
        started.append(node)
        return node.wait_ready() if wait else node

    yield start
    for node in started:
        node.kill()
