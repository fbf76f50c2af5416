"""Nothing in src/ may run a peer's code: no pickle, exec, eval, torch.load, torch.export.load or
import-by-name. The scan is on the syntax tree, so prose in docstrings does not trip it but any call,
import or alias does; a failure prints the offending file, line and source text."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
FORBIDDEN_BUILTINS = {"exec", "eval", "compile", "__import__"}
FORBIDDEN_CALLS = {
    ("torch", "load"),
    ("export", "load"),  # torch.export.load
    ("importlib", "import_module"),
    ("importlib", "__import__"),
    ("pydoc", "locate"),
    ("runpy", "run_path"),
    ("runpy", "run_module"),
    ("numpy", "load"),  # allow_pickle paths
    ("np", "load"),
}


def _dotted(node: ast.AST) -> list[str]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1]


def find_unsafe(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, reason) for every construct that could execute or deserialize foreign code."""
    hits: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    hits.append((node.lineno, f"imports {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in FORBIDDEN_MODULES:
                hits.append((node.lineno, f"imports from {node.module}"))
            for alias in node.names:
                if alias.name in FORBIDDEN_BUILTINS or (module, alias.name) in FORBIDDEN_CALLS:
                    hits.append((node.lineno, f"imports {alias.name} from {node.module}"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if len(name) == 1 and name[0] in FORBIDDEN_BUILTINS:
                hits.append((node.lineno, f"calls {name[0]}()"))
            elif name[-3:] == ["safetensors", "torch", "load"]:
                continue  # the safe weights format, not torch.load
            elif len(name) >= 2 and (name[-2], name[-1]) in FORBIDDEN_CALLS:
                hits.append((node.lineno, f"calls {'.'.join(name)}()"))
            elif name[-2:] == ["builtins", "getattr"] or (
                name == ["getattr"] and node.args and _dotted(node.args[0]) in (["builtins"], ["__builtins__"])
            ):
                hits.append((node.lineno, "looks up a builtin by name"))
        elif isinstance(node, ast.Attribute) and node.attr in {"__reduce__", "__reduce_ex__", "__setstate__"}:
            hits.append((node.lineno, f"uses {node.attr}"))
    return hits


def test_src_has_no_unsafe_calls() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for lineno, reason in find_unsafe(text, str(path)):
            offenders.append(f"{path.relative_to(SRC.parent)}:{lineno}: {reason}: {lines[lineno - 1].strip()}")
    assert not offenders, "code that could run a peer's bytes:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import cloudpickle as cp",
        "from pickle import loads",
        "from marshal import loads",
        "exec(data)",
        "eval('1+1')",
        "compile(src, 'x', 'exec')",
        "__import__(name)",
        "torch.load(buf)",
        "torch.load(buf, weights_only=True)",
        "torch.export.load(f)",
        "from torch.export import load",
        "importlib.import_module(peer_name)",
        "from importlib import import_module",
        "getattr(builtins, name)(x)",
        "np.load(f, allow_pickle=True)",
    ],
)
def test_scanner_catches(snippet: str) -> None:
    """The scanner itself must be able to fail: each construct is reported."""
    assert find_unsafe(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        '"""we never pickle peer bytes"""',
        "re.compile('x')",
        "json.loads(s)",
        "safetensors.torch.load(b)",
        "x.evaluate()",
    ],
)
def test_scanner_ignores_safe_code(snippet: str) -> None:
    assert not find_unsafe(snippet), snippet
