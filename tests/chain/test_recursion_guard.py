"""Importing the chain package must not make nested peer input crash the process.

py_ecc and py-evm raise the interpreter's recursion limit when imported; msgspec relies on that limit to
stop recursing through nested input before the C stack overflows. A CI run caught it: the Stage IR
tamper test for deeply nested arguments segfaulted once the chain tests had run in the same process.
Each check runs that tamper test in a fresh interpreter that first imports and uses tensorlink.chain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TAMPER = "tests/ir/test_tamper.py::test_deeply_nested_arguments_are_refused"

SCRIPT = """
import sys
before = sys.getrecursionlimit()
import tensorlink.chain
tensorlink.chain.EmbeddedBackend()  # imports eth-tester and the rest of py-evm
assert sys.getrecursionlimit() == before, f"recursion limit {{before}} -> {{sys.getrecursionlimit()}}"
{raise_limit}
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "{tamper}"]))
"""


def run(raise_limit: str = "") -> subprocess.CompletedProcess[str]:
    code = SCRIPT.format(raise_limit=raise_limit, tamper=TAMPER)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_nested_ir_is_refused_after_importing_chain() -> None:
    done = run()
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert " passed" in done.stdout


def test_control_with_the_limit_py_ecc_leaves_the_process_dies() -> None:
    """Without the guard (the limit py_ecc sets), the same tamper test kills the interpreter."""
    done = run("sys.setrecursionlimit(100_000)")
    assert done.returncode != 0 and " passed" not in done.stdout
