"""split(): cut one captured program into pipeline stage programs; profile(): what each part of it costs.

The pipeline captures the whole user model once (any model torch.export takes, not hand-wrapped families) and
cuts that one graph, so that stages never have to be separate modules. Placement is a pure function of the
graph and the owner map (parameter -> stage), so a training program and an eval or generation program of the
same model, split with the same owner map, put every parameter in the same part.

Placement rules:
1. A node that depends on a parameter runs at max(owner of the parameters it uses, stages of its inputs).
2. A node that depends on user inputs but on no parameter (label shifting, views of input_ids) runs at the
   earliest stage among its consumers, so each user input goes straight to the part that needs it.
3. A node that depends on neither (sizes and what is built from them only: SymInts, causal masks, positions,
   rotary tables from a buffer) is rebuilt in every part that needs it instead of being sent: sizes cannot
   travel as tensors, and a (B, 1, T, T) mask is as big as an activation. ``sym_size(x, d)`` is re-pointed at
   an input of the part that has a dim of the same size.
4. A value produced at stage i and needed at stage j > i + 1 passes through the parts in between.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as read_safetensors  # the safetensors format: no pickle, no code
from safetensors.torch import save as write_safetensors

from tensorlink.ir import schema as s
from tensorlink.ir.errors import IRError
from tensorlink.ir.interpret import Graph, run_graph
from tensorlink.ir.program import StageProgram
from tensorlink.wire.dtypes import TORCH_BY_NAME

SYM_SIZE = "aten.sym_size.int"
GETITEM = "operator.getitem"
# never rebuilt in several parts: a second copy would draw different random numbers
_RANDOM = frozenset({"aten.dropout.default", "aten.scaled_dot_product_attention.default"})
_MAX_STAGE_INPUTS = 64
# What an op the FLOP counter skips (elementwise, norms, softmax, gathers) costs per output element, in
# matmul FLOPs: such ops are memory-bound, and a CPU core does ~30 GFLOP/s of matmul but touches a few
# G elements/s. Counted as 1, blocks looked cheaper than an LM head and 1F1B's first stage got ~10 % more
# work than the second (benchmarks/pipeline.py, CPU seconds per stage).
ELEMENT_COST = 8.0
# ops that move no data (views, metadata): no cost in profile()
_FREE = frozenset({
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.unsqueeze.default",
    "aten.squeeze.dim", "aten.squeeze.dims", "aten.transpose.int", "aten.permute.default", "aten.t.default",
    "aten.expand.default", "aten.alias.default", "aten.slice.Tensor", "aten.select.int", "aten.detach.default",
    "aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "aten.unbind.int",
    "aten.flatten.using_ints", "aten._assert_tensor_metadata.default", SYM_SIZE, GETITEM,
})  # fmt: skip  # the schema's cap on a signature's inputs


@dataclass(frozen=True)
class Unit:
    """One partitioning unit: the parameters first used together (in graph order), and the work attributed to them."""

    params: tuple[str, ...]  # canonical parameter names (as in program.parameters)
    flops: float  # forward FLOPs of the nodes attributed to this unit, at the given input sizes
    param_bytes: int
    # What one forward of those nodes allocates at the given sizes, counted as a worker counts a stage's forward
    # (tensorlink.ir.memory), with the size-only nodes they need, which the stage holding them rebuilds (rule 3)
    activation_bytes: int
    buffer_bytes: int = 0  # the program's buffers and constants: a stage may hold any of them
    tied: tuple[str, ...] = ()  # parameters of earlier units these nodes use (a tied LM head): a stage copies them
    tied_bytes: int = 0
    boundary_bytes: int = 0  # per micro-batch, values crossing into and out of these nodes: a stage's frames


@dataclass(frozen=True)
class StagePart:
    index: int
    program: StageProgram  # loadable by tensorlink.ir.load(...); inputs positional, output structure "tuple"
    inputs: tuple[str, ...]  # value names, in the program's positional input order
    outputs: tuple[str, ...]  # value names, in the program's output order
    params: tuple[str, ...]  # canonical parameters this part holds


@dataclass(frozen=True)
class Split:
    parts: list[StagePart]
    user_inputs: tuple[str, ...]  # value names of the whole program's user inputs, by input index
    model_outputs: tuple[str, ...]  # value names of the whole program's outputs, in order (= parts[-1].outputs)
    input_stage: dict[str, int]  # user input -> the first part that needs it (inputs no part needs are absent)
    ties: dict[str, tuple[int, ...]]  # parameter held by several parts -> those parts (sum their gradients)


# --- graph analysis ---------------------------------------------------------------------------------------------


def _refs(args: list[s.Arg] | Iterator[s.Arg]) -> Iterator[str]:
    for arg in args:
        if isinstance(arg, s.Ref):
            yield arg.node
        elif isinstance(arg, s.List):
            yield from _refs(arg.items)


def _node_refs(node: s.Node) -> list[str]:
    return list(dict.fromkeys([*_refs(node.args), *_refs(iter(node.kwargs.values()))]))


class _Analysis:
    """Which nodes depend on parameters or user inputs, which can be rebuilt anywhere, who consumes what."""

    def __init__(self, p: s.Program) -> None:
        self.p = p
        self.nodes = p.graph.nodes
        self.placeholders = {ph.name: ph for ph in p.graph.placeholders}
        self.refs = {n.name: _node_refs(n) for n in self.nodes}
        self.mutated = set(p.buffer_mutations.values())
        self.side_effect: set[str] = set(p.buffer_mutations)
        for n in self.nodes:
            op = n.target.split(".")[1]
            if op.endswith("_") and not op.endswith("__"):  # in place (add_ on BatchNorm's counter), not __and__
                self.side_effect.add(n.name)
                first = next(_refs(n.args[:1]), None)
                if first in self.placeholders and self.placeholders[first].kind == "buffer":
                    self.mutated.add(self.placeholders[first].target)  # type: ignore[arg-type]
        self.direct_params: dict[str, list[str]] = {}
        self.param_dep: set[str] = set()
        self.input_dep: set[str] = set()
        self.rebuild: set[str] = set()
        mutated_phs = {
            name for name, ph in self.placeholders.items() if ph.kind == "buffer" and ph.target in self.mutated
        }
        for n in self.nodes:
            refs = self.refs[n.name]
            if n.target == SYM_SIZE:  # a size depends on nothing: its tensor argument is re-pointed in each part
                self.direct_params[n.name] = []
                self.rebuild.add(n.name)
                continue
            phs = [self.placeholders[r] for r in refs if r in self.placeholders]
            params = [ph.target for ph in phs if ph.kind == "parameter"]
            self.direct_params[n.name] = list(dict.fromkeys(params))  # type: ignore[arg-type]
            if params or any(r in self.param_dep for r in refs):
                self.param_dep.add(n.name)
            if any(ph.kind == "input" for ph in phs) or any(r in self.input_dep for r in refs):
                self.input_dep.add(n.name)
            if (
                n.name not in self.param_dep
                and n.name not in self.input_dep
                and n.name not in self.side_effect
                and n.target not in _RANDOM
                and all(r in self.rebuild or (r in self.placeholders and r not in mutated_phs) for r in refs)
            ):
                self.rebuild.add(n.name)
        self.consumers: dict[str, list[str]] = {}
        for n in self.nodes:
            if n.name in self.rebuild:
                continue  # rebuilt nodes use only rebuilt values and state (sym_size is re-pointed)
            for r in self.refs[n.name]:
                self.consumers.setdefault(r, []).append(n.name)
        self.outputs: list[str] = []
        for arg in p.graph.outputs:
            if not isinstance(arg, s.Ref) or (
                arg.node in self.placeholders and self.placeholders[arg.node].kind != "input"
            ):
                raise IRError("split: every model output must be a computed tensor or a user input")
            self.outputs.append(arg.node)


def _place(a: _Analysis, owner: Mapping[str, int], n_stages: int) -> dict[str, int]:
    """Stage of every node that runs in exactly one part (rules 1 and 2); rebuilt and unneeded nodes are absent."""
    last = n_stages - 1
    stage: dict[str, int] = {}
    # A buffer update that uses no parameter (BatchNorm's num_batches_tracked += 1) runs with the next node that
    # does (the batch_norm it precedes), or with the last one when nothing follows.
    pinned: dict[str, int] = {}
    pending: list[str] = []
    for n in a.nodes:
        name = n.name
        if name in a.rebuild:
            continue
        if name in a.param_dep:
            stage[name] = max(
                [owner[p] for p in a.direct_params[name]] + [stage[r] for r in a.refs[name] if r in stage]
            )
            pinned.update(dict.fromkeys(pending, stage[name]))
            pending.clear()
        elif name in a.side_effect:
            pending.append(name)
    pinned.update(dict.fromkeys(pending, max(stage.values(), default=0)))
    outputs = set(a.outputs)
    for n in reversed(a.nodes):
        name = n.name
        if name in a.rebuild or name in a.param_dep:
            continue
        if name in pinned:
            stage[name] = pinned[name]
            continue
        needed_at = [stage[c] for c in a.consumers.get(name, ()) if c in stage] + ([last] if name in outputs else [])
        if needed_at:
            stage[name] = min(needed_at)  # else nobody needs it (an assertion on a dead value): not computed
    for n in a.nodes:  # a tuple stays with its producer: getitem runs where the tuple is made
        if n.target == GETITEM and n.name in stage and n.name not in a.param_dep:
            stage[n.name] = stage.get(a.refs[n.name][0], stage[n.name])
    for n in a.nodes:
        for r in a.refs[n.name]:
            if n.name in stage and r in stage and stage[r] > stage[n.name]:
                raise IRError(f"split: node {n.name} at stage {stage[n.name]} uses {r} from a later stage {stage[r]}")
    return stage


# --- split ------------------------------------------------------------------------------------------------------


def _check_owner(p: s.Program, owner: Mapping[str, int], n_stages: int) -> None:
    if n_stages < 1:
        raise ValueError(f"split: n_stages must be at least 1, got {n_stages}")
    missing = [name for name in p.parameters if name not in owner]
    unknown = [name for name in owner if name not in set(p.parameters)]
    if missing or unknown:
        aliases = {alias: g[0] for g in p.tie_groups for alias in g[1:]}
        hint = "".join(f"; {u!r} is tied to {aliases[u]!r}: use that name" for u in unknown if u in aliases)
        raise IRError(
            f"split: the owner map must give a stage to exactly the program's parameters: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unknown {unknown[:5]}{hint}"
        )
    bad = {name: st for name, st in owner.items() if not (isinstance(st, int) and 0 <= st < n_stages)}
    if bad:
        raise IRError(f"split: stages must be integers in 0..{n_stages - 1}; got {dict(list(bad.items())[:5])}")


def split(program: StageProgram, owner: Mapping[str, int], n_stages: int) -> Split:
    """Cut ``program`` (a whole model from capture()) into ``n_stages`` stage programs, parameter ``p`` in part
    ``owner[p]``; see the module docstring for where every other node goes."""
    p = program.program
    _check_owner(p, owner, n_stages)
    if not p.values:
        raise IRError("split: the program carries no value metadata; capture it with this version of capture()")
    a = _Analysis(p)
    stage = _place(a, owner, n_stages)
    last = n_stages - 1
    placed: list[list[s.Node]] = [[] for _ in range(n_stages)]
    for n in a.nodes:
        if n.name in stage:
            placed[stage[n.name]].append(n)
    empty = [k for k in range(n_stages) if not placed[k]]
    if empty:
        raise IRError(f"split: stage(s) {empty} would run nothing; give each stage at least one used parameter")

    user_inputs = tuple(ph.name for ph in sorted(
        (ph for ph in p.graph.placeholders if ph.kind == "input"), key=lambda ph: ph.index or 0
    ))  # fmt: skip
    # where each crossing value first exists, and the last stage that needs it
    first: dict[str, int] = {}
    need: dict[str, int] = {}
    for n in a.nodes:
        if n.name not in stage:
            continue
        for r in a.refs[n.name]:
            if r in stage or r in user_inputs:
                need[r] = max(need.get(r, 0), stage[n.name])
                if r in user_inputs:
                    first[r] = min(first.get(r, last), stage[n.name])
    for out in a.outputs:
        if out in stage or out in user_inputs:
            need[out] = last
            if out in user_inputs:
                first.setdefault(out, last)
    first.update({name: st for name, st in stage.items() if name in need})
    order = {name: i for i, name in enumerate([*user_inputs, *(n.name for n in a.nodes)])}
    crossing = sorted(need, key=order.__getitem__)

    weights = read_safetensors(program.weights)
    parts: list[StagePart] = []
    holders: dict[str, list[int]] = {}
    buffer_users: dict[str, list[int]] = {}
    for k in range(n_stages):
        inputs = [v for v in crossing if (first[v] < k or (v in user_inputs and first[v] == k)) and k <= need[v]]
        if k < last:
            outputs = [v for v in crossing if first[v] <= k < need[v]]
        else:
            outputs = list(a.outputs)
        part = _build_part(p, a, k, placed[k], inputs, outputs, owner, weights)
        for name in part.params:
            holders.setdefault(name, []).append(k)
        for name in part.program.program.buffers:
            buffer_users.setdefault(name, []).append(k)
        parts.append(part)
    shared = {b: ks for b, ks in buffer_users.items() if b in a.mutated and len(ks) > 1}
    if shared:
        raise IRError(f"split: buffers {sorted(shared)} are updated in place but used by parts {shared}; "
                      "put the parameters around them in one stage")  # fmt: skip
    return Split(
        parts=parts,
        user_inputs=user_inputs,
        model_outputs=tuple(a.outputs),
        input_stage={v: first[v] for v in user_inputs if v in first},
        ties={name: tuple(ks) for name, ks in holders.items() if len(ks) > 1},
    )


def _build_part(
    p: s.Program,
    a: _Analysis,
    k: int,
    placed: list[s.Node],
    inputs: list[str],
    outputs: list[str],
    owner: Mapping[str, int],
    weights: dict[str, torch.Tensor],
) -> StagePart:
    if len(inputs) > _MAX_STAGE_INPUTS:
        raise IRError(f"split: part {k} would take {len(inputs)} inputs (cap {_MAX_STAGE_INPUTS}); cut elsewhere")
    have = set(inputs) | {n.name for n in placed}
    by_name = {n.name: n for n in a.nodes}
    # the rebuilt values this part needs, with sym_size re-pointed at a tensor the part has
    rebuilt: dict[str, s.Node] = {}
    todo = [r for n in placed for r in a.refs[n.name] if r in a.rebuild] + [o for o in outputs if o in a.rebuild]
    while todo:
        name = todo.pop()
        if name in rebuilt:
            continue
        node = by_name[name]
        if node.target == SYM_SIZE:
            source = next(_refs(node.args[:1]))
            if source in a.rebuild:
                todo.append(source)
            elif source not in have:
                node = _repoint_size(p, k, node, inputs)
        else:
            todo.extend(r for r in a.refs[name] if r in a.rebuild)
        rebuilt[name] = node
    mine = {n.name for n in placed}
    nodes = [rebuilt.get(n.name, n) for n in a.nodes if n.name in rebuilt or n.name in mine]
    used = {r for n in nodes for r in _node_refs(n)}
    state = [ph for ph in p.graph.placeholders if ph.kind != "input" and ph.name in used]
    targets = {ph.target for ph in state}
    params = [n for n in p.parameters if n in targets or (owner[n] == k and not _is_used(a, n))]
    buffers = [n for n in p.buffers if n in targets]
    constants = [n for n in p.constants if n in targets]
    symbols: dict[str, list[int]] = {}
    specs = [_input_spec(p, v, symbols) for v in inputs]
    node_names = {n.name for n in nodes}
    program = s.Program(
        ops_version=p.ops_version,
        captured_train=p.captured_train,
        signature=s.Signature(
            positional=len(inputs), keywords=[], inputs=specs, symbols=symbols, output="tuple", output_keys=[]
        ),
        graph=s.Graph(
            placeholders=[*state, *(s.Placeholder(name=v, kind="input", index=i) for i, v in enumerate(inputs))],
            nodes=nodes,
            outputs=[s.Ref(v) for v in outputs],
        ),
        subgraphs={n.subgraph: p.subgraphs[n.subgraph] for n in nodes if n.subgraph is not None},
        parameters=params,
        buffers=buffers,
        persistent_buffers=[n for n in p.persistent_buffers if n in buffers],
        constants=constants,
        buffer_mutations={node: buf for node, buf in p.buffer_mutations.items() if node in node_names},
        tie_groups=[g for g in p.tie_groups if g[0] in params],
        storage_keys={n: key for n, key in p.storage_keys.items() if n in params},
    )
    blob = write_safetensors({n: weights[n] for n in [*params, *buffers, *constants]})
    return StagePart(k, StageProgram(program, blob), tuple(inputs), tuple(outputs), tuple(params))


def _is_used(a: _Analysis, param: str) -> bool:
    return any(param in ps for ps in a.direct_params.values())


def _repoint_size(p: s.Program, k: int, node: s.Node, inputs: list[str]) -> s.Node:
    """sym_size(x, d) where x is not in this part: take the same size from an input that has it."""
    want = p.values[node.name].sym if node.name in p.values else None
    for v in inputs:
        meta = p.values.get(v)
        if want is not None and meta is not None and want in meta.shape:
            return s.Node(name=node.name, target=SYM_SIZE, args=[s.Ref(v), s.Lit(meta.shape.index(want))])
    raise IRError(
        f"split: part {k} needs the size {want} ({node.name}) but none of its inputs has a dim of that size; "
        "move the cut so that an activation carrying it crosses into this part"
    )


def _input_spec(p: s.Program, value: str, symbols: dict[str, list[int]]) -> s.InputSpec:
    """A stage input's spec from capture metadata. A plain symbol keeps its name and range; an expression dim
    (s0*s1, s1 + 1) becomes a fresh symbol whose range is the expression's range at capture (its value at its
    symbols' minima and maxima: every size expression the IR allows grows with its symbols, so the loader's dry
    run at the maxima still bounds every smaller shape)."""
    meta = p.values.get(value)
    if meta is None or meta.dtype is None:
        raise IRError(f"split: value {value} crosses between stages but is not a tensor")
    shape: list[int | str] = []
    for dim in meta.shape:
        if isinstance(dim, int):
            shape.append(dim)
            continue
        if dim in p.signature.symbols:
            name, bounds = dim, p.signature.symbols[dim]
        elif dim in p.dim_ranges:
            name, bounds = "x" + hashlib.sha256(dim.encode()).hexdigest()[:12], p.dim_ranges[dim]
        else:
            raise IRError(f"split: value {value} has a dim {dim!r} whose range capture did not record")
        symbols[name] = list(bounds)
        shape.append(name)
    return s.InputSpec(dtype=meta.dtype, shape=shape)


# --- profile ----------------------------------------------------------------------------------------------------


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _meta_state(weights: bytes) -> dict[str, torch.Tensor]:
    """Meta tensors shaped like the weights, read from the safetensors header alone (no copy of the data)."""
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + length])
    header.pop("__metadata__", None)
    meta = torch.device("meta")
    return {k: torch.empty(v["shape"], dtype=_ST_DTYPES[v["dtype"]], device=meta) for k, v in header.items()}


def profile(program: StageProgram, sizes: Mapping[str, int]) -> list[Unit]:
    """Partitioning units in first-use order, each with the forward cost of the nodes attributed to it.

    A unit is the set of parameters a node uses for the first time (a Linear's weight and bias, a LayerNorm's);
    every node is attributed to the unit of the most recently first-used parameter, so reused weights (a tied LM
    head) count where they are used, not where they were first seen. Parameters no node uses form a last unit.
    FLOPs are counted by torch.utils.flop_counter on the meta device at ``sizes`` (symbol -> size), plus one FLOP
    ELEMENT_COST per output element for ops it does not count (elementwise, norms, embedding gathers); memory by
    the worker's allocation counter in the same run, so a stage's units add up to what its worker charges."""
    from torch.utils.flop_counter import FlopCounterMode

    from tensorlink.ir.memory import AllocationCounter

    p = program.program
    a = _Analysis(p)
    state = _meta_state(program.weights)
    missing = sorted({d for spec in p.signature.inputs for d in spec.shape if isinstance(d, str)} - set(sizes))
    if missing:
        raise ValueError(f"profile: give a size for the dynamic dims {missing}")
    meta = torch.device("meta")
    inputs = [
        torch.empty(
            [d if isinstance(d, int) else sizes[d] for d in spec.shape], dtype=TORCH_BY_NAME[spec.dtype], device=meta
        )
        for spec in p.signature.inputs
    ]
    known = set(state)
    subgraphs = {name: Graph(g, None, known, 64) for name, g in p.subgraphs.items()}
    graph = Graph(p.graph, subgraphs, known, len(inputs))

    flops: dict[str, float] = {}
    nbytes: dict[str, int] = {}
    value_bytes = {
        ph.name: _tensor_bytes(inputs[ph.index])
        for ph in graph.placeholders
        if ph.kind == "input" and ph.index is not None
    }
    outer = [step.name for step in graph.steps]
    targets = {n.name: n.target for n in p.graph.nodes}
    cursor, seen, allocated = 0, 0.0, 0
    counter = FlopCounterMode(display=False)
    allocations = AllocationCounter(1 << 62)

    def on_value(name: str, value: object) -> None:
        nonlocal cursor, seen, allocated
        if cursor >= len(outer) or name != outer[cursor]:
            return  # a node inside a grad region: counted with the region node
        cursor += 1
        total = float(counter.get_total_flops())
        counted = total - seen
        seen = total
        elements = _tensor_bytes(value) // max(1, _elem_size(value))
        flops[name] = counted if counted > 0 or targets[name] in _FREE else ELEMENT_COST * elements
        nbytes[name] = allocations.total - allocated
        allocated = allocations.total
        value_bytes[name] = _tensor_bytes(value)

    with torch.no_grad(), counter, allocations:
        run_graph(p, graph, inputs, state, meta, p.captured_train, on_value)

    units: list[list[str]] = []
    work: list[list[float]] = []
    rebuilt: list[set[str]] = []  # per unit: the size-only nodes its nodes need, which its stage rebuilds (rule 3)
    starts: list[int] = []  # per unit: its first node
    tied: list[dict[str, None]] = []  # per unit: parameters of earlier units its nodes use
    needs: dict[str, set[str]] = {}  # a rebuilt node -> the rebuilt nodes it is built from, itself included
    seen_params: set[str] = set()
    for i, n in enumerate(a.nodes):
        new = [q for q in a.direct_params[n.name] if q not in seen_params]
        if new:
            seen_params.update(new)
            units.append(new)
            work.append([0.0, 0.0])
            rebuilt.append(set())
            tied.append({})
            starts.append(i)
        if not work:
            work.append([0.0, 0.0])  # nodes before any parameter: unit 0, created now and filled in later
            units.append([])
            rebuilt.append(set())
            tied.append({})
            starts.append(0)
        tied[-1].update(dict.fromkeys(q for q in a.direct_params[n.name] if q not in units[-1]))
        work[-1][0] += flops.get(n.name, 0.0)
        built = set().union(*(needs[r] for r in a.refs[n.name] if r in needs))
        if n.name in a.rebuild:
            needs[n.name] = built | {n.name}
        else:
            work[-1][1] += nbytes.get(n.name, 0)
            rebuilt[-1] |= built
    if units and not units[0] and len(units) > 1:  # fold the leading parameterless work into the first real unit
        units.pop(0)
        lead = work.pop(0)
        work[0] = [work[0][0] + lead[0], work[0][1] + lead[1]]
        rebuilt[1] |= rebuilt.pop(0)
        tied.pop(0)  # a unit without parameters uses none
        starts.pop(1)
    cut = _cuts(a, value_bytes)
    boundary = [cut[start] + cut[end] for start, end in zip(starts, [*starts[1:], len(a.nodes)], strict=True)]
    unused = [q for q in p.parameters if q not in seen_params]
    if unused:
        units.append(unused)
        work.append([0.0, 0.0])
        rebuilt.append(set())
        tied.append({})
        boundary.append(0)

    def pbytes(names: list[str]) -> int:
        return sum(state[q].numel() * state[q].element_size() for q in names)

    buffers = pbytes([*p.buffers, *p.constants])
    return [
        Unit((*u,), w[0], pbytes(u), int(w[1]) + sum(nbytes.get(r, 0) for r in made), buffers, (*t,), pbytes([*t]), b)
        for u, w, made, t, b in zip(units, work, rebuilt, tied, boundary, strict=True)
    ]


def _cuts(a: _Analysis, value_bytes: Mapping[str, int]) -> list[int]:
    """``cut[i]``: bytes of the values made before node ``i`` (user inputs: before node 0) that node ``i`` or a later
    one uses, or the model returns: what a stage starting at node ``i`` receives per micro-batch (rebuilt values
    never travel), and the gradients a stage ending there receives back."""
    index = {node.name: i for i, node in enumerate(a.nodes)}
    last: dict[str, int] = {}
    for i, node in enumerate(a.nodes):
        for ref in a.refs[node.name]:
            last[ref] = i
    for name in a.outputs:
        last[name] = len(a.nodes)
    delta = [0] * (len(a.nodes) + 2)
    for name, end in last.items():
        if name in value_bytes and name not in a.rebuild:
            delta[index.get(name, -1) + 1] += value_bytes[name]
            delta[end + 1] -= value_bytes[name]
    return list(itertools.accumulate(delta))


def _tensor_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _elem_size(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.element_size()
    if isinstance(value, list | tuple) and value:
        return _elem_size(value[0])
    return 1
