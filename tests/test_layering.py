"""The layering DESIGN.md promises, as tests: only ``tensorlink.p2p`` imports libp2p or multiaddr, imports
between packages point one way (no cycle), and the owner side (``pipeline``) and the worker never import
each other (what both need lives in ``stage``). The scan is on the syntax tree of every file in src/, lazy
imports inside functions included; a failure names the file and line of each offending import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "tensorlink"
LIBP2P = {"libp2p", "multiaddr"}
APART = [("pipeline", "worker"), ("worker", "pipeline")]


def imports(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def package_of(path: Path) -> str:
    """The tensorlink subpackage a file belongs to (a top-level module counts as its own)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def edges(files: dict[str, str]) -> dict[tuple[str, str], list[str]]:
    """(from package, to package) -> ["file:line", ...] for imports between tensorlink's packages;
    ``files`` maps a path below src/tensorlink to its text."""
    packages = {Path(name).parts[0] for name in files if len(Path(name).parts) > 1}
    out: dict[tuple[str, str], list[str]] = {}
    for name, text in files.items():
        src = package_of(PACKAGE / name)
        for line, module in imports(text, name):
            parts = module.split(".")
            if parts[0] == "tensorlink" and len(parts) > 1 and parts[1] in packages and parts[1] != src:
                if src in packages:
                    out.setdefault((src, parts[1]), []).append(f"{name}:{line}")
    return out


def find_cycle(graph: dict[tuple[str, str], list[str]]) -> list[str] | None:
    """One cycle of packages (first package repeated at the end), or None."""
    succ: dict[str, set[str]] = {}
    for a, b in graph:
        succ.setdefault(a, set()).add(b)
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for nxt in sorted(succ.get(node, ())):
            cycle = walk(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(succ):
        cycle = walk(start, [])
        if cycle:
            return cycle
    return None


def source_files() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_only_p2p_imports_libp2p() -> None:
    offenders = [
        f"src/tensorlink/{name}:{line} imports {module}"
        for name, text in source_files().items()
        if package_of(PACKAGE / name) != "p2p"
        for line, module in imports(text, name)
        if module.split(".")[0] in LIBP2P
    ]
    assert not offenders, "libp2p outside tensorlink/p2p (add a function to p2p instead):\n" + "\n".join(offenders)


def test_only_p2p_uses_its_libp2p_internals() -> None:
    """``p2p/_libp2p.py`` (py-libp2p's patches and private members) is p2p's own; others use PeerHost."""
    offenders = [
        f"src/tensorlink/{name}:{line} imports {module}"
        for name, text in source_files().items()
        if package_of(PACKAGE / name) != "p2p"
        for line, module in imports(text, name)
        if module == "tensorlink.p2p._libp2p"
    ]
    assert not offenders, "tensorlink.p2p._libp2p outside tensorlink/p2p:\n" + "\n".join(offenders)


# py-libp2p's host and stream API; outside p2p the same operations go through PeerHost and p2p.streams.
LIBP2P_CALLS = {"get_addrs", "new_stream", "set_stream_handler", "get_connected_peers", "get_peerstore", "get_network",
                "get_id", "muxed_conn"}  # fmt: skip


def libp2p_calls(files: dict[str, str]) -> list[str]:
    """``file:line uses .name`` for each LIBP2P_CALLS use outside p2p; ``files``: path below src/tensorlink -> text."""
    return [
        f"src/tensorlink/{name}:{node.lineno} uses .{node.attr}"
        for name, text in files.items()
        if package_of(PACKAGE / name) != "p2p"
        for node in ast.walk(ast.parse(text, name))
        if isinstance(node, ast.Attribute) and node.attr in LIBP2P_CALLS
    ]


def test_only_p2p_drives_a_libp2p_host() -> None:
    offenders = libp2p_calls(source_files())
    assert not offenders, "libp2p host or stream API outside tensorlink/p2p (use PeerHost):\n" + "\n".join(offenders)


def test_packages_import_each_other_one_way_only() -> None:
    graph = edges(source_files())
    cycle = find_cycle(graph)
    if cycle:
        where = [f"{a} -> {b}: {', '.join(graph[(a, b)][:3])}" for a, b in zip(cycle, cycle[1:], strict=False)]
        pytest.fail("import cycle between packages:\n" + "\n".join(where))


@pytest.mark.parametrize(("src", "dst"), APART)
def test_owner_and_worker_never_import_each_other(src: str, dst: str) -> None:
    found = edges(source_files()).get((src, dst), [])
    assert not found, f"{src} imports {dst} (shared code belongs in tensorlink.stage): {', '.join(found)}"


def test_the_rules_can_fail() -> None:
    """The scanner sees what the rules forbid: a cycle, and a lazy libp2p import inside a function."""
    files = {
        "pipeline/a.py": "from tensorlink.worker.b import x\n",
        "worker/b.py": "def f():\n    import tensorlink.pipeline.a\n",
    }
    graph = edges(files)
    assert graph == {("pipeline", "worker"): ["pipeline/a.py:1"], ("worker", "pipeline"): ["worker/b.py:2"]}
    assert find_cycle(graph) in (["pipeline", "worker", "pipeline"], ["worker", "pipeline", "worker"])
    assert imports("def g():\n    from multiaddr import Multiaddr\n") == [(2, "multiaddr")]
    assert libp2p_calls({"node/x.py": "h.get_addrs()\n", "p2p/y.py": "h.get_addrs()\n"}) == [
        "src/tensorlink/node/x.py:1 uses .get_addrs"
    ]
