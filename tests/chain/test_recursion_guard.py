"""Importing the chain package leaves the interpreter's recursion limit alone.

py_ecc and py-evm raise it when imported (to 100,000 and 12,288); recursive decoders (msgspec, json)
rely on it to refuse hostile nesting before the C stack overflows. tensorlink.chain imports both first
and puts the limit back. Checked in a fresh interpreter: this test process imported them long ago."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
before = sys.getrecursionlimit()
import tensorlink.chain
tensorlink.chain.EmbeddedBackend()  # imports eth-tester and the rest of py-evm
print(before, sys.getrecursionlimit())
"""


def test_importing_chain_keeps_the_recursion_limit() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = map(int, done.stdout.split())
    assert after == before


def test_control_importing_py_ecc_alone_raises_it() -> None:
    """What the guard undoes: without it, importing py_ecc leaves the limit at 100,000."""
    code = "import sys; import py_ecc; print(sys.getrecursionlimit())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert int(done.stdout) >= 100_000
