"""Compiled contract artifacts (ABI + bytecode) from `contracts/build/`, reached through the package's
`build` symlink so that checkouts, editable installs and wheels all find the same files."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import msgspec

BUILD_DIR = Path(__file__).resolve().parent / "build"

# Names are ours (never a peer's), but keep them to plain identifiers so no path can escape BUILD_DIR.
_NAME = re.compile(r"^(test/)?[A-Za-z_][A-Za-z0-9_]*$")


class ArtifactMissing(FileNotFoundError):
    """A contract's build output is absent: the Solidity sources have not been compiled."""


class Artifact(msgspec.Struct, frozen=True):
    """What Python needs of one compiled contract."""

    contract_name: str = msgspec.field(name="contractName")
    abi: list[dict[str, Any]] = msgspec.field(default_factory=list)
    bytecode: str = ""


@functools.cache
def load(name: str) -> Artifact:
    """`load("Settlement")` or `load("test/ReentrantToken")`."""
    if not _NAME.match(name):
        raise ValueError(f"bad artifact name {name!r}")
    path = BUILD_DIR / f"{name}.json"
    if not path.is_file():
        raise ArtifactMissing(f"contract artifact {path} is missing: run `make contracts` to compile contracts/src")
    artifact = msgspec.json.decode(path.read_bytes(), type=Artifact)
    if not artifact.bytecode.startswith("0x"):
        artifact = msgspec.structs.replace(artifact, bytecode="0x" + artifact.bytecode)
    return artifact


def names() -> list[str]:
    """Every artifact present, production contracts first, then `test/...` ones."""
    if not BUILD_DIR.is_dir():
        raise ArtifactMissing(f"{BUILD_DIR} is missing: run `make contracts` to compile contracts/src")
    found = sorted(p.stem for p in BUILD_DIR.glob("*.json"))
    found += sorted(f"test/{p.stem}" for p in (BUILD_DIR / "test").glob("*.json"))
    return found
