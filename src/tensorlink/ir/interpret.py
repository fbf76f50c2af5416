"""The one interpreter of stage programs: a validated graph (every target from the allow-list, every reference
to an earlier node, constants compiled once) and the loop that runs it over pre-resolved operator calls.

The loader (ir/loader.py) runs it for a worker's forward and its dry run; split's profile (ir/split.py) runs it
on the meta device to count each node's cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tensorlink.ir import schema as s
from tensorlink.ir.argcheck import ANY, SEQ, TENSOR, Kind, bounded, check_call
from tensorlink.ir.errors import IRError
from tensorlink.ir.ops import ATEN_OPS, MODE_DEPENDENT, PY_OPS, SET_GRAD_REGION, resolve_for_run
from tensorlink.wire.dtypes import TORCH_BY_NAME

_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last,
}

# A compiled argument: ("c", constant) | ("r", node name) | ("l", [compiled...]) | ("d", None) for a device.
Compiled = tuple[str, Any]


class _Step:
    __slots__ = ("name", "fn", "args", "kwargs", "mode", "subgraph", "train_only")

    def __init__(self, name: str, fn: Callable[..., Any] | None, args: list[Compiled], kwargs: dict[str, Compiled]):
        self.name = name
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.mode: tuple[int, str, Any] | None = None  # (position, keyword, captured value)
        self.subgraph: Graph | None = None
        # An in-place update of a buffer (BatchNorm's num_batches_tracked += 1): state changes only while
        # training, as in eager, so in eval mode the step passes its input through.
        self.train_only = False


class Graph:
    """A validated graph: placeholders, steps in order, outputs, when each value can be dropped, and what one
    run of it costs the dry run (tensorlink.ir.argcheck)."""

    def __init__(self, graph: s.Graph, subgraphs: dict[str, Graph] | None, known_state: set[str], n_inputs: int):
        self.placeholders = graph.placeholders
        buffers = {p.name for p in graph.placeholders if p.kind == "buffer"}
        defined: set[str] = set()
        # the kind of every value so far; a grad region's inputs (subgraphs is None) may be sizes as well as tensors
        kinds: dict[str, Kind] = {}
        self.cost = 0
        for p in graph.placeholders:
            if p.name in defined:
                raise IRError(f"placeholder {p.name} is defined twice")
            if p.kind == "input":
                if p.index is None or p.index >= n_inputs:
                    raise IRError(f"placeholder {p.name} refers to user input {p.index}, which does not exist")
            elif p.target not in known_state:
                raise IRError(f"placeholder {p.name} refers to state {p.target!r}, which the weights do not hold")
            defined.add(p.name)
            kinds[p.name] = ANY if p.kind == "input" and subgraphs is None else TENSOR
        self.steps: list[_Step] = []
        for node in graph.nodes:
            if node.name in defined:
                raise IRError(f"node {node.name} is defined twice")
            step = _Step(
                node.name,
                None,
                [_compile(a, defined, node.name) for a in node.args],
                {k: _compile(v, defined, node.name) for k, v in node.kwargs.items()},
            )
            if node.target == SET_GRAD_REGION:
                if subgraphs is None or node.subgraph not in subgraphs:
                    raise IRError(f"node {node.name} runs subgraph {node.subgraph!r}, which is not defined here")
                if not step.args or step.args[0][0] != "c" or not isinstance(step.args[0][1], bool):
                    raise IRError(f"node {node.name}: a grad region starts with a literal true or false")
                step.subgraph = subgraphs[node.subgraph]
                kinds[node.name] = SEQ
                self.cost += 1 + step.subgraph.cost
            elif node.target in ATEN_OPS or node.target in PY_OPS:
                try:
                    step.fn = bounded(node.target, resolve_for_run(node.target))
                except (AttributeError, TypeError, ValueError) as exc:
                    raise IRError(f"node {node.name}: {node.target} does not resolve in this torch ({exc})") from None
                checked = check_call(node, kinds)
                kinds[node.name] = checked.kind
                self.cost += checked.cost
                if checked.force_device:  # creation ops: never a device the program chose, nor torch's default
                    step.kwargs["device"] = ("d", None)
                if node.target in MODE_DEPENDENT:
                    pos, kw = MODE_DEPENDENT[node.target]
                    captured = _const_at(step, pos, kw)
                    step.mode = (pos, kw, captured)
                op_name = node.target.split(".")[1]
                if op_name.endswith("_") and step.args and step.args[0][0] == "r":
                    step.train_only = step.args[0][1] in buffers
            else:
                raise IRError(f"node {node.name}: target {node.target!r} is not in the stage operator allow-list")
            self.steps.append(step)
            defined.add(node.name)
        self.outputs = [_compile(a, defined, "output") for a in graph.outputs]
        # last use of every value, so that intermediates are freed as soon as they are consumed
        self.last_use: dict[int, list[str]] = {}
        seen: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for ref in _refs(step.args) + _refs(list(step.kwargs.values())):
                seen[ref] = i
        keep = set(_refs(self.outputs))
        for name, i in seen.items():
            if name not in keep:
                self.last_use.setdefault(i, []).append(name)


def _const_at(step: _Step, pos: int, kw: str) -> Any:
    arg = step.args[pos] if pos < len(step.args) else step.kwargs.get(kw)
    if arg is None:
        return None
    if arg[0] != "c":
        raise IRError(f"node {step.name}: its mode argument {kw} must be a literal")
    return arg[1]


def _refs(args: list[Compiled]) -> list[str]:
    out: list[str] = []
    for kind, value in args:
        if kind == "r":
            out.append(value)
        elif kind == "l":
            out.extend(_refs(value))
    return out


def _compile(arg: s.Arg, defined: set[str], where: str) -> Compiled:
    if isinstance(arg, s.Ref):
        if arg.node not in defined:
            raise IRError(
                f"{where} refers to {arg.node}, which is not defined before it (forward or dangling reference)"
            )
        return ("r", arg.node)
    if isinstance(arg, s.Lit):
        return ("c", arg.value)
    if isinstance(arg, s.Float):
        try:
            return ("c", float(arg.value))
        except ValueError:
            raise IRError(f"{where}: {arg.value!r} is not a float") from None
    if isinstance(arg, s.DType):
        return ("c", TORCH_BY_NAME[arg.name])
    if isinstance(arg, s.Device):
        return ("d", None)
    if isinstance(arg, s.Layout):
        return ("c", torch.strided)
    if isinstance(arg, s.MemoryFormat):
        return ("c", _FORMATS[arg.name])
    items = [_compile(a, defined, where) for a in arg.items]
    if all(kind == "c" for kind, _ in items):
        return ("c", [v for _, v in items])
    return ("l", items)


def _ev(arg: Compiled, env: dict[str, Any], device: torch.device) -> Any:
    kind, value = arg
    if kind == "c":
        return value
    if kind == "r":
        return env[value]
    if kind == "d":
        return device
    return [_ev(a, env, device) for a in value]


def run_graph(
    program: s.Program,
    graph: Graph,
    inputs: list[Any],
    state: dict[str, torch.Tensor],
    device: torch.device,
    training: bool,
    on_value: Callable[[str, Any], None] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """The one interpreter: run a validated ``graph`` of ``program`` on ``inputs`` and ``state`` (name -> tensor)
    on ``device``, in training mode or not, calling ``on_value(node, value)`` after each node. Returns the
    outputs and the values still held (the sources of the program's buffer mutations among them)."""
    env: dict[str, Any] = {}
    for p in graph.placeholders:
        env[p.name] = inputs[p.index] if p.kind == "input" else state[p.target]  # type: ignore[index]
    keep = set(program.buffer_mutations)
    for i, step in enumerate(graph.steps):
        args = [_ev(a, env, device) for a in step.args]
        kwargs = {k: _ev(v, env, device) for k, v in step.kwargs.items()}
        if step.mode is not None:
            _apply_mode(step, args, kwargs, training)
        try:
            if step.subgraph is not None:
                with torch.set_grad_enabled(bool(args[0]) and torch.is_grad_enabled()):
                    sub = run_graph(program, step.subgraph, args[1:], state, device, training, on_value)[0]
                env[step.name] = tuple(sub)
            elif step.train_only and not training and program.captured_train:
                env[step.name] = args[0]
            else:
                env[step.name] = step.fn(*args, **kwargs)  # type: ignore[misc]
        except IRError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, OverflowError) as exc:
            raise IRError(f"node {step.name} failed: {exc}") from None
        if on_value is not None:
            on_value(step.name, env[step.name])
        for name in graph.last_use.get(i, ()):
            if name not in keep:
                env.pop(name, None)
    return [_ev(a, env, device) for a in graph.outputs], env


def _apply_mode(step: _Step, args: list[Any], kwargs: dict[str, Any], training: bool) -> None:
    pos, kw, captured = step.mode  # type: ignore[misc]
    value = (captured if training else 0.0) if kw == "dropout_p" else training
    if kw == "dropout_p" and captured is None:
        return
    if pos < len(args):
        args[pos] = value
    else:
        kwargs[kw] = value
