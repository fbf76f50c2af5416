"""The type stub of the native core (src/tensorlink/_C.pyi) names what the built module has: mypy reads only
the stub, so a binding added, renamed or removed in csrc/module.cpp without it would be checked against
stale types. (pybind11 gives no signatures to inspect, so stubtest compares names, not parameters.)"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from tensorlink import _C

SRC = Path(__file__).resolve().parents[2] / "src"
ALLOWED = [
    # pybind11 classes have their own metaclass, which a stub cannot name.
    r"tensorlink\._C\.(BufferPool|FrameHeader|HostMemory|PooledBuffer|SealedSocket)",
    # Buffer-protocol classes: Python 3.12 exposes __buffer__; the stub declares it so they type as buffers.
    r"tensorlink\._C\.(HostMemory|PooledBuffer)\.__buffer__",
    # No constructor is bound (pybind11 makes one that raises); the stub leaves object's.
    r"tensorlink\._C\.(HostMemory|PooledBuffer)\.__init__",
]
# Bound only in a CUDA build (TENSORLINK_WITH_CUDA); the stub declares them for the code that calls them.
CUDA_ONLY = [r"tensorlink\._C\.cuda_(de)?quantize_int8"]


def test_stub_names_what_the_native_module_has(tmp_path: Path) -> None:
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text("\n".join(ALLOWED + ([] if _C.cuda_compiled() else CUDA_ONLY)) + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "tensorlink._C", "--concise", "--allowlist", str(allowlist)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MYPYPATH": str(SRC)},  # the package has no py.typed: point mypy at the stub
    )
    assert run.returncode == 0, f"_C.pyi disagrees with the built tensorlink._C:\n{run.stdout}{run.stderr}"


def _params(fn: ast.FunctionDef) -> list[tuple[str | None, bool]]:
    """(name, has a default) per parameter after self; None for a positional-only one (pybind11 calls a
    parameter bound without py::arg ``argN``, and it cannot be passed by keyword)."""
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults = [False] * (len(positional) - len(args.defaults)) + [True] * len(args.defaults)
    out: list[tuple[str | None, bool]] = []
    for arg, has_default in zip(positional, defaults, strict=True):
        if arg.arg != "self":
            positional_only = arg in args.posonlyargs or re.fullmatch(r"arg\d+", arg.arg) is not None
            out.append((None if positional_only else arg.arg, has_default))
    keyword_only = zip(args.kwonlyargs, args.kw_defaults, strict=True)
    out += [(f"*{arg.arg}", default is not None) for arg, default in keyword_only]
    return out


def _stub_functions() -> list[tuple[str, ast.FunctionDef]]:
    """Every function and method the stub declares, properties and Python-side protocol methods aside."""
    found: list[tuple[str, ast.FunctionDef]] = []
    for node in ast.parse((SRC / "tensorlink" / "_C.pyi").read_text()).body:
        if isinstance(node, ast.FunctionDef):
            found.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                is_property = isinstance(item, ast.FunctionDef) and any(
                    isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list
                )
                if isinstance(item, ast.FunctionDef) and not is_property and item.name != "__buffer__":
                    found.append((f"{node.name}.{item.name}", item))
    return found


def test_stub_parameters_match_the_bindings() -> None:
    """pybind11 writes each binding's signature as the first line of its docstring: compare the stub's
    parameter names, order, keyword-only-ness and defaults with it."""
    checked, wrong = 0, []
    for path, stub in _stub_functions():
        runtime: object = _C
        for part in path.split("."):
            runtime = getattr(runtime, part, None)
        if runtime is None and path.startswith("cuda_") and not _C.cuda_compiled():
            continue
        signature = (getattr(runtime, "__doc__", None) or "").lstrip().splitlines()[0]
        bound = ast.parse(f"def {signature}: ...").body[0]
        assert isinstance(bound, ast.FunctionDef)
        if _params(stub) != _params(bound):
            wrong.append(f"{path}: stub {_params(stub)} but the binding is {signature}")
        checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked >= 28  # every binding the stub declares (30, the two CUDA ones only in a CUDA build)
