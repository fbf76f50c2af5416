"""Every allow-listed operator, fuzzed with random arguments of every kind, each case loaded and run in a child
process (tests/ir/op_fuzz.py): no case may kill its process, hang, or end in anything but a module or an IRError.

Without the schema checks of tensorlink.ir.argcheck, this seed's 1,144 cases killed six children by SIGSEGV
(plain integers given as the ScalarType of log_softmax, ones, zeros, zeros_like and to.dtype_layout), and
other seeds killed them through to.dtype, cumsum and full_like. ``benchmarks/ir_fuzz.py`` runs many more cases.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import op_fuzz
import pytest

from tensorlink.ir.ops import ATEN_OPS, PY_OPS

CASES_PER_OP = 8
SEED = 12


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_op_fuzzed_in_child_processes_without_a_death() -> None:
    report = op_fuzz.run(SEED, dict.fromkeys(op_fuzz.OPS, CASES_PER_OP), chunk_s=240.0, jobs=2)
    print(f"op fuzz: {report.ran} cases, {dict(report.outcomes)}, {report.children} children")
    assert set(op_fuzz.OPS) == ATEN_OPS | set(PY_OPS)
    assert report.deaths == [], "cases killed their process"
    assert report.hangs == [], "cases hung their process"
    assert report.bad == [], "cases ended in something other than a module or an IRError"
    assert report.ran == CASES_PER_OP * len(op_fuzz.OPS)
    # the cases reach both ends: some load and run, most are refused
    assert report.outcomes["loaded"] >= report.ran // 20
    assert report.outcomes["refused"] >= report.ran // 2


def test_a_child_killed_by_a_signal_is_reported_with_its_case_and_the_rest_still_run() -> None:
    """The harness itself: a child that dies mid-case names that case, and a new child runs the cases after it."""
    report = op_fuzz.Report()
    out = "start aten.relu.default 0\nend aten.relu.default 0 loaded\nstart aten.relu.default 1\n"
    left = op_fuzz._account(report, out, [("aten.relu.default", 0, 4), ("aten.tanh.default", 0, 2)], -11, False)
    assert report.deaths == ["aten.relu.default#1: exit -11 (signal 11)"]
    assert report.ran == 2 and report.outcomes["loaded"] == 1
    assert left == [("aten.relu.default", 2, 2), ("aten.tanh.default", 0, 2)]


KILLERS = {
    # ScalarType 1000 as a plain integer: ATen's enum cast read past its tables (SIGSEGV in load()'s dry run)
    "to.dtype 1000": ("aten.to.dtype", [{"type": "ref", "node": "x"}, {"type": "lit", "value": 1000}], {}),
    "zeros dtype 1000": (
        "aten.zeros.default",
        [{"type": "list", "items": [{"type": "lit", "value": 2}]}],
        {"dtype": {"type": "lit", "value": 1000}},
    ),
}


@pytest.mark.parametrize("name", list(KILLERS))
def test_the_integer_enums_that_crashed_the_worker_are_refused(name: str, tmp_path: Path) -> None:
    """Loaded in a child process, so that a regression fails this test instead of killing the test run."""
    target, args, kwargs = KILLERS[name]
    doc = op_fuzz.case(0, "aten.relu.default", 0)
    doc["graph"]["nodes"][-1] = {"name": "out", "target": target, "args": args, "kwargs": kwargs}
    path = tmp_path / "program.bin"
    path.write_bytes(op_fuzz.program_bytes(doc))
    script = (
        "import sys; from tensorlink.ir import IRError, load\n"
        "try:\n    load(open(sys.argv[1], 'rb').read())\nexcept IRError as exc:\n    print('refused:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the child exited with {done.returncode}: {done.stderr[-2000:]}"
    assert "refused: node out:" in done.stdout and "'dtype'" in done.stdout and "1000" in done.stdout, done.stdout
