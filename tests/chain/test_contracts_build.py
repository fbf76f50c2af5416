"""The committed contract artifacts (contracts/build/) are exactly what the pinned compiler makes of the
sources, and every contract fits the EIP-170 code size limit.

Python loads ABIs and bytecode from contracts/build/ without Node, so a source edit that was not
recompiled (or a compile with another solc/OpenZeppelin) would otherwise go unnoticed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ROOT / "contracts"
BUILD = CONTRACTS / "build"
EIP170_LIMIT = 24_576  # bytes of runtime code a contract may have (EIP-170)
RECOMPILE = "run `make contracts && node contracts/compile.js` and commit contracts/build/"


def _artifacts(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.json"))}


def test_artifacts_present_and_fit_eip170() -> None:
    artifacts = _artifacts(BUILD)
    for name in ("SNOToken.json", "Staking.json", "Settlement.json", "test/ReentrantToken.json"):
        assert name in artifacts, f"contracts/build/{name} is missing; {RECOMPILE}"
    for name, raw in artifacts.items():
        artifact = json.loads(raw)
        assert artifact["compiler"]["solc"].startswith("0.8.28+"), name
        assert artifact["compiler"]["openzeppelin"] == "5.4.0", name
        runtime = len(artifact["deployedBytecode"].removeprefix("0x")) // 2
        assert 0 < runtime < EIP170_LIMIT, f"{name}: runtime code is {runtime} bytes, EIP-170 allows {EIP170_LIMIT}"


@pytest.mark.slow
def test_committed_artifacts_match_a_fresh_compile(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node is not on PATH; the contract build check needs Node 20 (and `make contracts`)"
    assert (CONTRACTS / "node_modules" / "solc").is_dir(), (
        "contracts/node_modules is missing: run `make contracts` (npm ci in contracts/)"
    )
    proc = subprocess.run(
        [node, str(CONTRACTS / "compile.js"), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"compile.js failed:\n{proc.stderr}{proc.stdout}"

    committed, fresh = _artifacts(BUILD), _artifacts(tmp_path)
    assert sorted(committed) == sorted(fresh), (
        f"contracts/build/ holds {sorted(committed)} but the sources compile to {sorted(fresh)}; {RECOMPILE}"
    )
    stale = [name for name in fresh if committed[name] != fresh[name]]
    assert not stale, f"contracts/build/ is out of date with the sources for {stale}; {RECOMPILE}"
