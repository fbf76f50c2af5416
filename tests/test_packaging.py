"""What pyproject.toml and the Makefile promise: the torch range is the one we test, the chain and HF
libraries are extras, and `make bench` runs every benchmark."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Scripts in benchmarks/ that another benchmark runs, not `make bench` itself.
HELPERS = {"hivemind_remote_expert.py": "inference.py"}


def requirements(group: list[str]) -> dict[str, Requirement]:
    return {(req := Requirement(text)).name: req for text in group}


def test_the_torch_we_test_is_inside_the_declared_range() -> None:
    torch_req = requirements(PROJECT["dependencies"])["torch"]
    assert torch.__version__ in torch_req.specifier, (torch.__version__, str(torch_req.specifier))
    assert "2.14.0" not in torch_req.specifier  # an untested minor release is not promised


def test_chain_and_hf_libraries_are_extras() -> None:
    base = requirements(PROJECT["dependencies"])
    extras = PROJECT["optional-dependencies"]
    assert {"web3", "eth-tester", "eth-account"} <= requirements(extras["chain"]).keys()
    assert "transformers" in requirements(extras["hf"])
    assert not {"web3", "eth-tester", "eth-account", "transformers"} & base.keys()


def test_make_bench_runs_every_benchmark() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^bench:.*?\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe is not None, "no bench target in the Makefile"
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if script.name in HELPERS:
            assert script.name in (ROOT / "benchmarks" / HELPERS[script.name]).read_text()
            continue
        assert f"benchmarks/{script.name}" in recipe.group(1), f"make bench does not run benchmarks/{script.name}"
