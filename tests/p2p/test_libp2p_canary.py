"""Canary for a py-libp2p upgrade: every private member ``tensorlink.p2p._libp2p`` relies on still exists with
the parameters it is called with, and ``_libp2p.RELIED_ON`` cannot fall behind the code: a private name
``_libp2p.py`` uses on a libp2p object, and any private access the other p2p modules make to a member of
that list, fails here naming the file and line."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from tensorlink.p2p import _libp2p
from tensorlink.p2p._libp2p import OVERRIDDEN, RELIED_ON, Private

P2P = Path(_libp2p.__file__).parent


def _where(member: Private) -> str:
    owner = member.owner.__name__ if isinstance(member.owner, type) else member.owner.__name__
    return f"{owner}.{member.name} (relied on by {member.used_by})"


@pytest.mark.parametrize("member", RELIED_ON + OVERRIDDEN, ids=lambda m: m.name)
def test_private_member_still_exists(member: Private) -> None:
    owner = member.owner
    if member.params is None:
        found = hasattr(owner, member.name) or (
            isinstance(owner, type)
            and any(f"self.{member.name} =" in inspect.getsource(k) or f"self.{member.name}:" in inspect.getsource(k)
                    for k in owner.__mro__ if k.__module__.startswith("libp2p"))
        )  # fmt: skip
        assert found, f"py-libp2p no longer has {_where(member)}; adapt tensorlink/p2p/_libp2p.py"
        return
    method = getattr(owner, member.name, None)
    assert callable(method), f"py-libp2p no longer has the method {_where(member)}; adapt tensorlink/p2p/_libp2p.py"
    params = list(inspect.signature(method).parameters.values())
    names = tuple(p.name for p in params[: len(member.params)])
    extra = [p.name for p in params[len(member.params) :] if p.default is inspect.Parameter.empty]
    assert names == member.params and not extra, (
        f"py-libp2p's {_where(member)} now takes {tuple(p.name for p in params)}, not {member.params}; "
        "adapt tensorlink/p2p/_libp2p.py"
    )


def _own_names(tree: ast.Module) -> set[str]:
    """Private names _libp2p.py defines itself: its classes' methods and class attributes, and what it assigns
    to ``self``. Overrides of libp2p's private methods are not its own: they must be in RELIED_ON."""
    relied = {m.name for m in RELIED_ON}
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    own.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    own.add(item.target.id)
    return own - relied


def _private_uses(path: Path) -> list[tuple[int, str, str]]:
    """(line, object, name) of every ``<obj>._name`` in ``path``, ``<obj>`` rendered as source text."""
    tree = ast.parse(path.read_text(), str(path))
    return [
        (node.lineno, ast.unparse(node.value), node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
    ]


def test_every_private_use_in_libp2p_module_is_declared() -> None:
    path = P2P / "_libp2p.py"
    tree = ast.parse(path.read_text(), str(path))
    declared = {m.name for m in RELIED_ON} | _own_names(tree)
    overrides = {
        (node.lineno, node.name)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name.startswith("_")
        and not node.name.startswith("__")
    }
    undeclared = [f"_libp2p.py:{line}: {obj}.{name}" for line, obj, name in _private_uses(path) if name not in declared]
    undeclared += [f"_libp2p.py:{line}: def {name}" for line, name in overrides if name not in declared]
    assert not undeclared, (
        "private py-libp2p members used but missing from _libp2p.RELIED_ON (add each, with what relies on it): "
        + ", ".join(undeclared)
    )


def _self_uses_outside_subclasses(path: Path) -> set[int]:
    """Lines of ``self._x`` inside classes with no base class: TensorLink's own objects, whose private names
    may coincide with libp2p's (``_nursery``)."""
    lines: set[int] = set()
    for cls in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(cls, ast.ClassDef) and not cls.bases:
            lines.update(
                node.lineno
                for node in ast.walk(cls)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
            )
    return lines


def test_only_the_libp2p_module_touches_libp2p_privates() -> None:
    """The other p2p modules reach libp2p's private members only through _libp2p's named functions."""
    relied = {m.name for m in RELIED_ON if isinstance(m.owner, type)}
    found = [
        f"{path.name}:{line}: {obj}.{name}"
        for path in sorted(P2P.glob("*.py"))
        if path.name != "_libp2p.py"
        for line, obj, name in _private_uses(path)
        if name in relied and not (obj == "self" and line in _self_uses_outside_subclasses(path))
    ]
    found += [
        f"{path.name}:{node.lineno}: def {node.name}"
        for path in sorted(P2P.glob("*.py"))
        if path.name != "_libp2p.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in relied
    ]
    assert not found, f"move these into tensorlink/p2p/_libp2p.py behind a named function: {', '.join(found)}"


def test_the_yamux_patch_is_installed() -> None:
    """Importing p2p.host makes py-libp2p build our Yamux for every connection (install_yamux)."""
    from libp2p.stream_muxer import muxer_multistream

    import tensorlink.p2p.host  # noqa: F401

    assert muxer_multistream.Yamux is _libp2p.ReadLoopSafeYamux
