"""Hostile nesting in a Stage IR program is refused whatever the interpreter's recursion limit.

msgspec (like any recursive decoder) stops at the recursion limit, and libraries raise it as a side
effect of being imported: py_ecc sets 100,000. A CI run found the nested-arguments tamper test killing
the interpreter once the chain tests had imported it. The loader now bounds JSON nesting natively
before decoding. Each check runs that tamper test in a fresh interpreter with the limit at 100,000."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TAMPER = "tests/ir/test_tamper.py::test_deeply_nested_arguments_are_refused"

SCRIPT = """
import sys
sys.setrecursionlimit(100_000)  # what importing py_ecc leaves behind
{patch}
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "{tamper}"]))
"""


def run(patch: str = "") -> subprocess.CompletedProcess[str]:
    code = SCRIPT.format(patch=patch, tamper=TAMPER)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_nested_program_is_refused_with_a_raised_recursion_limit() -> None:
    done = run()
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert " passed" in done.stdout


def test_control_without_the_depth_bound_the_interpreter_dies() -> None:
    """With the native depth bound lifted, the same input overflows the C stack: the bound is what holds."""
    done = run("import tensorlink.ir.program as p; p.MAX_JSON_DEPTH = 10**9")
    assert done.returncode != 0 and " passed" not in done.stdout
