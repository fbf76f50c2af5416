"""capture(): on the user's machine, turn a module into a StageProgram with torch.export.

The user's code runs here, once, under torch.export; what leaves this machine is only the graph of
allow-listed operators and the weights.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import safetensors.torch
import torch
from torch.export import Dim, export
from torch.export.graph_signature import InputKind, OutputKind

from tensorlink.ir import schema as s
from tensorlink.ir.errors import CaptureError
from tensorlink.ir.ops import ATEN_OPS, OPS_VERSION, PY_OPS, SET_GRAD_REGION, target_name
from tensorlink.ir.program import StageProgram
from tensorlink.wire.dtype_names import DTypeName
from tensorlink.wire.dtypes import NAME_BY_TORCH

DEFAULT_MAX_BATCH = 64
UNBOUNDED_DIM_CAP = 4096  # a dynamic dim the user left unbounded is capped here, so the worker can bound memory
_SESSION_SALT = os.urandom(16)  # storage keys mean something only within one capturing process
_FORMATS: dict[torch.memory_format, Literal["contiguous_format", "preserve_format", "channels_last"]] = {
    torch.contiguous_format: "contiguous_format",
    torch.preserve_format: "preserve_format",
    torch.channels_last: "channels_last",
}


def capture(
    module: torch.nn.Module,
    example_args: tuple[Any, ...],
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    max_seq_len: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    train: bool = True,
) -> StageProgram:
    """Export ``module`` on the examples (batch of 2 or more: a batch of 1 is specialised away) and
    convert it. Default dynamic shapes: dim 0 of every tensor input (1..max_batch) and, with
    ``max_seq_len``, dim 1 of inputs with two or more dims (2..max_seq_len). The maxima matter: a worker
    dry-runs the stage at them to bound its memory, and refuses inputs beyond them."""
    name = type(module).__name__
    kwargs = dict(example_kwargs or {})
    for key, value in [*enumerate(example_args), *kwargs.items()]:
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"{name}: input {key!r} is a {type(value).__name__}; stage inputs must be tensors")
    defaults = dynamic_shapes is None
    if defaults:
        dynamic_shapes = _default_dynamic_shapes(example_args, kwargs, max_seq_len, max_batch)
    was_training = module.training
    module.train(train)
    try:
        ep = export(module, tuple(example_args), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        retry = defaults and _violated(exc)
        auto = _export_auto(module, example_args, kwargs, max_seq_len, max_batch) if retry else None
        if auto is None:
            raise CaptureError(
                f"{name} cannot be captured by torch.export: {type(exc).__name__}: {_first_line(exc)}{_where(exc)}"
            ) from exc
        ep = auto
    finally:
        module.train(was_training)
    return _convert(ep, name, train, len(example_args), list(kwargs))


def _violated(exc: BaseException) -> bool:
    """Did export refuse the default dynamic dims because the model constrains them (a length it specialises, a
    batch it compares with another size)?"""
    return "Constraints violated" in str(exc)


def _export_auto(
    module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], max_seq_len: int | None, max_batch: int
) -> torch.export.ExportedProgram | None:
    """The default dims as Dim.AUTO within the same bounds: export keeps each as dynamic as the model allows (a dim
    the model specialises becomes static, a constrained one gets the narrower range), and the program declares
    what export found, so a worker refuses what the model cannot take. None if export still fails."""
    auto = _default_dynamic_shapes(args, kwargs, max_seq_len, max_batch, auto=True)
    try:
        return export(module, tuple(args), kwargs, dynamic_shapes=auto, strict=False)
    except Exception:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else ""


_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+)[^\n]*\n\s*(\S[^\n]*)')


def _where(exc: BaseException) -> str:
    """The user's line torch names in its message (outside torch itself), and the usual remedy for
    Python control flow on a tensor's value, which is what most capture failures are."""
    text = str(exc)
    hint = ""
    for path, line, source in _USER_FRAME.findall(text):
        if f"{os.sep}torch{os.sep}" not in path:
            hint = f"\n  at {path}:{line}: {source.strip()}"
            break
    if "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__:
        hint += (
            "\n  Python control flow on a tensor's value cannot be captured: use torch.where (or torch.cond) "
            "instead of `if`/`while` on tensor values"
        )
    return hint


def _default_dynamic_shapes(
    args: tuple[Any, ...], kwargs: dict[str, Any], max_seq_len: int | None, max_batch: int, auto: bool = False
) -> Any:
    """Dim 0 of every input one dynamic batch, dim 1 of inputs of 2+ dims one dynamic sequence (with
    ``max_seq_len``); with ``auto``, each as Dim.AUTO in the same bounds (see _export_auto)."""
    batch: Any = Dim.AUTO(min=1, max=max_batch) if auto else Dim("batch", min=1, max=max_batch)
    seq: Any = None
    if max_seq_len:
        seq = Dim.AUTO(min=2, max=max_seq_len) if auto else Dim("seq", min=2, max=max_seq_len)

    def spec(t: torch.Tensor) -> dict[int, Any]:
        dims: dict[int, Any] = {0: batch} if t.dim() >= 1 else {}
        if seq is not None and t.dim() >= 2:
            dims[1] = seq
        return dims

    return tuple(spec(a) for a in args) + tuple(spec(v) for v in kwargs.values())


class _Converter:
    def __init__(self, module_name: str) -> None:
        self.module_name = module_name
        self.subgraphs: dict[str, s.Graph] = {}
        self.gm: torch.fx.GraphModule | None = None

    def fail(self, node: torch.fx.Node, why: str) -> CaptureError:
        return CaptureError(f"{self.module_name}: node {node.name} ({node.target}) {why}")

    def arg(self, node: torch.fx.Node, value: Any) -> s.Arg:
        if isinstance(value, torch.fx.Node):
            return s.Ref(value.name)
        if isinstance(value, bool | int | str) or value is None:
            return s.Lit(value)
        if isinstance(value, float):
            return s.Float(repr(value))
        if isinstance(value, list | tuple):
            return s.List([self.arg(node, v) for v in value])
        if isinstance(value, torch.dtype):
            if value not in NAME_BY_TORCH:
                raise self.fail(node, f"uses dtype {value}, which stage programs do not carry")
            return s.DType(_dtype_name(value))
        if isinstance(value, torch.device):
            return s.Device()
        if isinstance(value, torch.layout):
            if value is not torch.strided:
                raise self.fail(node, f"uses layout {value}")
            return s.Layout("strided")
        if isinstance(value, torch.memory_format):
            return s.MemoryFormat(_FORMATS[value])
        raise self.fail(node, f"has an argument of type {type(value).__name__}, which the IR cannot express")

    def graph(self, graph: torch.fx.Graph, placeholders: list[s.Placeholder]) -> s.Graph:
        nodes: list[s.Node] = []
        outputs: list[s.Arg] = []
        for node in graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                continue  # subgraph modules, consumed by the region node below
            if node.op == "output":
                outputs = [self.arg(node, v) for v in node.args[0]]
                continue
            if node.op != "call_function":
                raise self.fail(node, f"is a {node.op} node; stage programs hold operator calls only")
            nodes.append(self.call(node))
        return s.Graph(placeholders=placeholders, nodes=nodes, outputs=outputs)

    def call(self, node: torch.fx.Node) -> s.Node:
        target = node.target
        if getattr(target, "__name__", "") == "wrap_with_set_grad_enabled":
            enabled, sub, *rest = node.args
            if not isinstance(sub, torch.fx.Node) or not isinstance(sub.target, str):
                raise self.fail(node, "runs a region that is not a submodule of the graph")
            submodule = getattr(self.gm, sub.target)
            inner = [
                s.Placeholder(name=p.name, kind="input", index=i)
                for i, p in enumerate(n for n in submodule.graph.nodes if n.op == "placeholder")
            ]
            self.subgraphs[sub.target] = self.graph(submodule.graph, inner)
            args = [self.arg(node, bool(enabled)), *(self.arg(node, a) for a in rest)]
            return s.Node(name=node.name, target=SET_GRAD_REGION, args=args, subgraph=sub.target)
        name = target_name(target)
        if name is None and isinstance(target, torch._ops.OpOverload):
            raise self.fail(
                node,
                f"is a custom operator of library {target.namespace!r}: Python code of this machine, which no worker "
                "runs (for transformers' MoE experts, build the model with experts_implementation='batched_mm')",
            )
        if name is None or (name not in ATEN_OPS and name not in PY_OPS):
            raise self.fail(node, "is not in the stage operator allow-list (tensorlink.ir.ops)")
        return s.Node(
            name=node.name,
            target=name,
            args=[self.arg(node, a) for a in node.args],
            kwargs={k: self.arg(node, v) for k, v in node.kwargs.items()},
        )


def _convert(
    ep: torch.export.ExportedProgram, name: str, train: bool, positional: int, keywords: list[str]
) -> StageProgram:
    conv = _Converter(name)
    conv.gm = ep.graph_module
    sig = ep.graph_signature
    state = {**ep.state_dict, **ep.constants}
    placeholders: list[s.Placeholder] = []
    canonical: dict[int, str] = {}  # storage identity -> the first state name holding it (ties)
    ties: dict[str, list[str]] = {}
    weights: dict[str, torch.Tensor] = {}
    parameters, buffers, persistent, constants = [], [], [], []
    user_index = 0
    inputs: list[s.InputSpec] = []
    symbols: dict[str, list[int]] = {}
    graph_placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    for spec, node in zip(sig.input_specs, graph_placeholders, strict=True):
        if spec.kind is InputKind.USER_INPUT:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise CaptureError(f"{name}: user input {node.name} is not a tensor")
            inputs.append(_input_spec(name, val, symbols, ep.range_constraints))
            placeholders.append(s.Placeholder(name=node.name, kind="input", index=user_index))
            user_index += 1
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise CaptureError(f"{name}: input {node.name} of kind {spec.kind.name} cannot be shipped")
        tensor = state[spec.target]
        key = id(tensor)
        if key in canonical:  # a tied tensor: one weight, one parameter, several names
            first = canonical[key]
            ties.setdefault(first, [first]).append(spec.target)
        else:
            canonical[key] = spec.target
            weights[spec.target] = tensor.detach().contiguous().clone()
            if spec.kind is InputKind.PARAMETER:
                parameters.append(spec.target)
            elif spec.kind is InputKind.BUFFER:
                buffers.append(spec.target)
                if spec.persistent:
                    persistent.append(spec.target)
            else:
                constants.append(spec.target)
        placeholders.append(s.Placeholder(name=node.name, kind=_STATE_KIND[spec.kind], target=canonical[key]))
    graph = conv.graph(ep.graph, placeholders)
    mutations: dict[str, str] = {}
    output_nodes = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    user_outputs = 0
    for spec, out in zip(sig.output_specs, output_nodes, strict=True):
        if spec.kind is OutputKind.BUFFER_MUTATION:
            mutations[out.name] = canonical[id(state[spec.target])]
        elif spec.kind is OutputKind.USER_OUTPUT:
            user_outputs += 1
        else:
            raise CaptureError(
                f"{name}: output of kind {spec.kind.name} (e.g. an input mutated in place) is not supported"
            )
    graph.outputs = graph.outputs[len(mutations) :] if mutations else graph.outputs
    kind, keys = _output_structure(name, ep.call_spec.out_spec, user_outputs)
    signature = s.Signature(
        positional=positional, keywords=keywords, inputs=inputs, symbols=symbols, output=kind, output_keys=keys
    )
    values, dim_ranges = _value_metas(ep)
    program = s.Program(
        ops_version=OPS_VERSION,
        captured_train=train,
        signature=signature,
        graph=graph,
        subgraphs=conv.subgraphs,
        parameters=parameters,
        buffers=buffers,
        persistent_buffers=persistent,
        constants=constants,
        buffer_mutations={node: buf for node, buf in mutations.items()},
        tie_groups=list(ties.values()),
        storage_keys={n: _storage_key(state[n]) for n in parameters},
        values=values,
        dim_ranges=dim_ranges,
    )
    return StageProgram(program, safetensors.torch.save(weights), out_spec=ep.call_spec.out_spec)


def _value_metas(ep: torch.export.ExportedProgram) -> tuple[dict[str, s.ValueMeta], dict[str, list[int]]]:
    """dtype and symbolic shape of every tensor, and the expression of every size (SymInt), that the top-level
    graph's user inputs and nodes produce, with the range of each size expression. split() needs them to give
    stage inputs their InputSpecs and to re-derive sizes inside each stage instead of sending them."""
    from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

    ranges = {sym: ValueRanges(int(r.lower), _cap(r.upper)) for sym, r in ep.range_constraints.items() if r is not None}
    dim_ranges: dict[str, list[int]] = {}

    def expr(value: torch.SymInt | int) -> int | str:
        if isinstance(value, int):
            return value
        e = value.node.expr
        if e.is_number:
            return int(e)
        key = str(e)
        if key not in dim_ranges:
            bounds = bound_sympy(e, {k: v for k, v in ranges.items() if k in e.free_symbols})
            low = int(bounds.lower) if bounds.lower.is_finite else 0
            dim_ranges[key] = [max(low, 0), _cap(bounds.upper)]
        return key

    user_inputs = {spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind is InputKind.USER_INPUT}
    values: dict[str, s.ValueMeta] = {}
    for node in ep.graph.nodes:
        if node.op not in ("placeholder", "call_function") or (
            node.op == "placeholder" and node.name not in user_inputs
        ):
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype in NAME_BY_TORCH:
            values[node.name] = s.ValueMeta(dtype=_dtype_name(val.dtype), shape=[expr(d) for d in val.shape])
        elif isinstance(val, torch.SymInt):
            values[node.name] = s.ValueMeta(sym=str(expr(val)))
    return values, dim_ranges


def _cap(high: Any) -> int:
    """A range's upper end as an int, with an unbounded one capped so that workers can bound memory."""
    return UNBOUNDED_DIM_CAP if not getattr(high, "is_finite", True) or high > 2**31 else int(high)


def _storage_key(tensor: torch.Tensor) -> str:
    storage = tensor.untyped_storage()
    ident = f"{storage.data_ptr()}:{tensor.storage_offset()}:{tuple(tensor.shape)}".encode()
    return hashlib.sha256(_SESSION_SALT + ident).hexdigest()[:32]


def cross_stage_ties(programs: Sequence[StageProgram]) -> list[list[tuple[int, str]]]:
    """Parameters that are one tensor split across stages, as (stage index, parameter name) groups. The
    stages must come from one capturing process (the partitioner's); within a stage ties are already a
    single parameter (``tie_groups``)."""
    by_key: dict[str, list[tuple[int, str]]] = {}
    for index, program in enumerate(programs):
        for name, key in program.program.storage_keys.items():
            by_key.setdefault(key, []).append((index, name))
    return [group for group in by_key.values() if len({i for i, _ in group}) > 1]


def _input_spec(name: str, val: torch.Tensor, symbols: dict[str, list[int]], ranges: dict[Any, Any]) -> s.InputSpec:
    if val.dtype not in NAME_BY_TORCH:
        raise CaptureError(f"{name}: input dtype {val.dtype} is not supported")
    shape: list[int | str] = []
    for dim in val.shape:
        if isinstance(dim, int):
            shape.append(dim)
            continue
        expr = dim.node.expr
        if expr.is_number:  # a dim export specialised (see _export_auto)
            shape.append(int(expr))
            continue
        if not expr.is_Symbol:
            raise CaptureError(f"{name}: input dimension {expr} is an expression, not a plain dynamic dim")
        bounds = ranges.get(expr)
        low = int(bounds.lower) if bounds is not None else 0
        high = bounds.upper if bounds is not None else UNBOUNDED_DIM_CAP
        high = UNBOUNDED_DIM_CAP if not getattr(high, "is_finite", True) or high > 2**31 else int(high)
        symbols[str(expr)] = [low, high]
        shape.append(str(expr))
    return s.InputSpec(dtype=_dtype_name(val.dtype), shape=shape)


def _dtype_name(dtype: torch.dtype) -> DTypeName:
    """The wire's name of a dtype from the fixed table (callers check membership first)."""
    return cast(DTypeName, NAME_BY_TORCH[dtype])


_STATE_KIND: dict[InputKind, Literal["parameter", "buffer", "constant"]] = {
    InputKind.PARAMETER: "parameter",
    InputKind.BUFFER: "buffer",
    InputKind.CONSTANT_TENSOR: "constant",
}


def _output_structure(name: str, spec: Any, count: int) -> tuple[Literal["tensor", "tuple", "dict"], list[str]]:
    """tensor, tuple, or dict (dicts and HF ModelOutputs, whose leaves are named by their keys)."""
    if spec.is_leaf():
        return "tensor", []
    children = spec.children()
    if not all(c.is_leaf() for c in children):
        raise CaptureError(f"{name}: nested outputs are not supported; return tensors, a tuple or a dict of tensors")
    if spec.type in (tuple, list):
        return "tuple", []
    if isinstance(spec.context, list | tuple) and len(spec.context) == count:
        return "dict", [str(k) for k in spec.context]
    raise CaptureError(f"{name}: output of type {getattr(spec.type, '__name__', spec.type)} is not supported")
