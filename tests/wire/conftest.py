"""Reporting for the wire tests: how many cases each hypothesis property ran, in the terminal summary."""

from __future__ import annotations

from collections import Counter

import pytest

CASE_COUNTS = pytest.StashKey[Counter[str]]()


@pytest.fixture(scope="session")
def case_counts(pytestconfig: pytest.Config) -> Counter[str]:
    """Session-wide tally, property name -> cases run; test modules add their module counters to it."""
    return pytestconfig.stash.setdefault(CASE_COUNTS, Counter())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """A fuzz run that silently ran few cases would look like a pass, so say how many ran."""
    counts = config.stash.get(CASE_COUNTS, None)
    if not counts:
        return
    terminalreporter.section("hypothesis cases run")
    for name, n in sorted(counts.items()):
        terminalreporter.write_line(f"{name}: {n}")
