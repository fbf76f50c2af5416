"""Schema-typed checks of every argument of every operator call in a stage program, before anything runs.

ATen's C++ trusts its callers: an integer given where the schema wants a ScalarType, Layout or MemoryFormat is
cast to that enum as it is (out of range it crashed the worker in the dry run, and small ones got around the
fixed dtype table), and a ``"cpu"`` string for a device made the meta dry run allocate and compute for real. So
each argument is matched against the op's own schema (``torch.ops.aten.<op>.<overload>._schema``): enumerations
only from the fixed tables of tensorlink.ir.schema, a device only as the worker's own, tensors only as references
to earlier nodes, integers in range (dims within MAX_RANK, nothing past int64), strings only from an op's known
choices, and references only to values of the right kind (a tensor where a tensor goes, a size where a size goes).

The same pass prices the dry run (``Checked.cost``, tensorlink.ir.ops.DRY_RUN_WEIGHT) so that the loader can refuse
a program that would take too long to validate before it starts: see MAX_COST.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from tensorlink.ir import schema as s
from tensorlink.ir.errors import IRError
from tensorlink.ir.ops import DRY_RUN_WEIGHT, PY_OPS, resolve

# What a node yields, as far as its users are concerned.
TENSOR, TENSORS, INT, SEQ, ANY, NONE = "tensor", "tensors", "int", "seq", "any", "none"
Kind = str

# Dims of any tensor (a dim argument lies in [-MAX_RANK, MAX_RANK), a size list holds at most MAX_RANK): meta
# kernels written in Python slow down with the rank (clamp at rank 64 takes 10x its time at rank 4).
MAX_RANK = 16
MAX_OUTPUTS = 1024  # tensors one split/chunk/unbind may return
# Dry-run cost a program may use: the cost of one run of its graph (grad regions counted each time they run) times
# the number of dry runs load() makes (one per corner of the declared input ranges, tensorlink.ir.memory). A unit
# is 0.25-0.8 ms of meta work on a 2-core VM (idle to busy), so validation takes at most 10-35 s there: see
# tests/ir/test_tamper.py, the worst program within the caps. Captured with batch and sequence dynamic (4 runs)
# and their LM loss, a 12-layer GPT-2 uses 6,000 and a 12-layer Llama 3,900: stages of 80 and 120 such layers fit.
MAX_COST = 40_000
INT64 = (-(2**63), 2**63 - 1)
_ITEMS_PER_UNIT = 16  # list items (cat's inputs) or outputs (split's) that cost one unit

# Integer arguments whose meaning needs a narrower range than int64, by (op, argument) or by argument name.
_INT_RANGES: dict[str | tuple[str, str], tuple[int, int]] = {
    ("aten.diff.default", "n"): (0, 8),  # diff's order: the meta kernel loops n times
    **dict.fromkeys(("dim", "dims", "dim0", "dim1", "start_dim", "end_dim"), (-MAX_RANK, MAX_RANK - 1)),
    "reduction": (0, 2),  # none, mean, sum: an enum in C++
    "groups": (1, 2**31),
    "num_groups": (1, 2**31),
    "chunks": (1, MAX_OUTPUTS),
    "split_size": (1, INT64[1]),
    "step": (1, INT64[1]),
    "padding_idx": (-(2**31), 2**31),
    "ignore_index": (-(2**31), 2**31),
    "sections": (1, MAX_OUTPUTS),  # tensor_split: one output per section
    "num_classes": (1, 2**31),  # one_hot: the default -1 sizes the output by the data, which the dry run cannot
}
_LIST_LENGTHS: dict[str, int] = {"split_sizes": MAX_OUTPUTS, "pad": 2 * MAX_RANK}  # pad: two ints per dim

# String arguments: the values each op accepts (anything else is refused, whatever ATen would do with it).
_STR_CHOICES: dict[tuple[str, str], frozenset[str]] = {
    ("aten.gelu.default", "approximate"): frozenset({"none", "tanh"}),
    ("aten.pad.default", "mode"): frozenset({"constant", "reflect", "replicate", "circular"}),
    ("aten.div.Tensor_mode", "rounding_mode"): frozenset({"trunc", "floor"}),
    ("aten.scatter_reduce.two", "reduce"): frozenset({"sum", "prod", "mean", "amax", "amin"}),
}
# String arguments of a grammar rather than a list: einsum's equation (subscript letters, commas, an arrow, ellipses;
# ATen parses it and refuses what does not fit the operands).
_STR_PATTERNS: dict[tuple[str, str], re.Pattern[str]] = {
    ("aten.einsum.default", "equation"): re.compile(r"[A-Za-z,. ]{1,128}(->[A-Za-z. ]{0,64})?"),
}
# Arguments that must be absent or null: einsum's path is a contraction order ATen trusts.
_MUST_BE_NULL = frozenset({("aten.einsum.default", "path")})

_PY_LITERAL = (0, 2**40)  # literals of size arithmetic: non-negative
_BY_LITERAL = frozenset({"operator.floordiv", "operator.mod"})  # ops whose second argument must be a literal >= 1


class Checked(NamedTuple):
    kind: Kind  # what the node yields
    cost: int  # dry-run cost units
    force_device: bool  # the op takes a device keyword: the loader sets it to the worker's device


class _Call:
    """One node being checked: where errors point, and the kinds of the values it may refer to."""

    def __init__(self, node: s.Node, kinds: Mapping[str, Kind]) -> None:
        self.node = node
        self.kinds = kinds

    def fail(self, arg: str, expected: str, got: s.Arg | None) -> IRError:
        shown = "nothing" if got is None else _describe(got, self.kinds)
        return IRError(f"node {self.node.name}: {self.node.target} argument {arg!r} must be {expected}, got {shown}")


def check_call(node: s.Node, kinds: Mapping[str, Kind]) -> Checked:
    """Check ``node`` (an allow-listed aten or Python op whose references are all defined in ``kinds``) against
    its schema; raise IRError naming the node, op, argument and what was expected."""
    call = _Call(node, kinds)
    if node.target in PY_OPS:
        return _check_py(call)
    schema = _schema(node.target)
    params = {a.name: a for a in schema.arguments}
    positional = [a for a in schema.arguments if not a.kwarg_only]
    if len(node.args) > len(positional):
        raise IRError(
            f"node {node.name}: {node.target} takes at most {len(positional)} positional arguments "
            f"({', '.join(a.name for a in positional)}), got {len(node.args)}"
        )
    bound: dict[str, s.Arg] = {a.name: v for a, v in zip(positional, node.args, strict=False)}
    for name, value in node.kwargs.items():
        if name not in params:
            raise IRError(f"node {node.name}: {node.target} has no argument {name!r} (it takes {', '.join(params)})")
        if name in bound:
            raise IRError(f"node {node.name}: {node.target} argument {name!r} is given twice")
        bound[name] = value
    cost = DRY_RUN_WEIGHT.get(node.target, 1)
    for name, param in params.items():
        if name not in bound:
            if not param.has_default_value():
                raise IRError(f"node {node.name}: {node.target} argument {name!r} is missing")
            continue
        if (node.target, name) in _MUST_BE_NULL and not _is_none(bound[name]):
            raise call.fail(name, "null (stage programs may not set it)", bound[name])
        cost += _check(call, name, param.real_type, bound[name], getattr(param, "N", None))
    if node.target in _COUNTED_OUTPUTS:
        cost += math.ceil(MAX_OUTPUTS / _ITEMS_PER_UNIT)
    return Checked(_returns(schema), cost, _takes_device(schema))


def bounded(target: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, refusing (ValueError, an IRError once in the interpreter) a call that would return more than
    MAX_OUTPUTS tensors (unbind and split by a size return as many as the input's dim allows, and on meta a
    million of them cost a minute of validation), a call with an index outside the dim it indexes (_INDEX_BOUNDS),
    or a tensor of more than MAX_RANK dims from the ops that add dims whatever their literal arguments say."""
    count = _COUNTED_OUTPUTS.get(target)
    if count is not None:
        inner = fn

        def counted(*args: Any, **kwargs: Any) -> Any:
            n = count(*args, **kwargs)
            if n > MAX_OUTPUTS:
                raise ValueError(f"{target} would return {n} tensors; the cap is {MAX_OUTPUTS}")
            return inner(*args, **kwargs)

        fn = counted
    index_bounds = _INDEX_BOUNDS.get(target)
    if index_bounds is not None:
        unchecked = fn

        def in_bounds(*args: Any, **kwargs: Any) -> Any:
            for index, low, high in index_bounds(*args, **kwargs):
                _check_index(target, index, low, high)
            return unchecked(*args, **kwargs)

        fn = in_bounds
    if target == "aten.repeat_interleave.self_int":
        unsized = fn

        def sized(t: Any, repeats: Any, dim: Any = None, *, output_size: Any = None) -> Any:
            _check_output_size(t, repeats, dim, output_size)
            return unsized(t, repeats, dim, output_size=output_size)

        fn = sized
    if target in _ADDS_DIMS:
        unranked = fn

        def ranked(*args: Any, **kwargs: Any) -> Any:
            out = unranked(*args, **kwargs)
            if out.dim() > MAX_RANK:
                raise ValueError(f"{target} made a tensor of {out.dim()} dims; the cap is {MAX_RANK}")
            return out

        fn = ranked
    return fn


def _check_output_size(t: Any, repeats: Any, dim: Any, output_size: Any) -> None:
    """repeat_interleave's output_size is trusted by the kernel (a wrong one made the real output differ in size from
    the dry run's, or the CUDA kernel write past its output): it must be what the shapes give."""
    if output_size is None or not isinstance(t, torch.Tensor) or not isinstance(repeats, int):
        return
    size = t.numel() if dim is None else _dim_size(t, dim)
    if size is not None and output_size != size * repeats:
        raise ValueError(f"repeat_interleave output_size {output_size} is not {size} x {repeats}")


def check_state_rank(name: str, tensor: torch.Tensor) -> None:
    """Weights are tensors too: a program's state may not bring in more dims than its nodes could make."""
    if tensor.dim() > MAX_RANK:
        raise IRError(f"state tensor {name!r} has {tensor.dim()} dims; the cap is {MAX_RANK}")


def _unbind_outputs(t: Any, dim: Any = 0) -> int:
    return t.shape[dim] if isinstance(t, torch.Tensor) and isinstance(dim, int) and -t.dim() <= dim < t.dim() else 0


def _split_outputs(t: Any, split_size: Any, dim: Any = 0) -> int:
    if not isinstance(split_size, int) or split_size < 1:
        return 0  # ATen refuses it
    return -(-_unbind_outputs(t, dim) // split_size)


def _sections_outputs(t: Any, sections: Any, dim: Any = 0) -> int:
    return sections if isinstance(sections, int) else 0


def _indices_outputs(t: Any, indices: Any, dim: Any = 0) -> int:
    return len(indices) + 1 if isinstance(indices, list) else 0


_COUNTED_OUTPUTS: dict[str, Callable[..., int]] = {
    "aten.unbind.int": _unbind_outputs,
    "aten.split.Tensor": _split_outputs,
    "aten.tensor_split.sections": _sections_outputs,
    "aten.tensor_split.indices": _indices_outputs,
}
# Ops whose result can have more dims than any input and any size list: the rest stay within MAX_RANK because
# their inputs and size lists do.
_ADDS_DIMS = frozenset(
    {
        "aten.unsqueeze.default", "aten.stack.default", "aten.index.Tensor", "aten.embedding.default",
        "aten.unflatten.int", "aten.one_hot.default",
    }
)  # fmt: skip

# -- index bounds: every index an op takes lies in the indexed dim, checked before the op runs -----------------------
# ATen's CPU kernels check most of these, but its CUDA kernels only assert on the device, which poisons the worker's
# CUDA context for every job on it: so each index-taking op gets its indices' range checked here (one min/max each;
# not on meta, where indices hold no values). Each entry yields (index tensor, lowest allowed, one past highest).
IndexBounds = Callable[..., list[tuple[Any, int, int]]]


def _dim_size(t: Any, dim: Any) -> int | None:
    """t.shape[dim], or None where ATen will refuse the call anyway (not a tensor, dim out of range)."""
    if not isinstance(t, torch.Tensor) or not isinstance(dim, int) or not -max(t.dim(), 1) <= dim < max(t.dim(), 1):
        return None
    return t.shape[dim] if t.dim() else 1


def _along_dim(self: Any, dim: Any, index: Any, *_: Any, **__: Any) -> list[tuple[Any, int, int]]:
    """gather, scatter, index_select, index_add, index_copy: one index into ``self``'s dim, non-negative."""
    size = _dim_size(self, dim)
    return [] if size is None else [(index, 0, size)]


def _advanced(self: Any, indices: Any, *_: Any, **__: Any) -> list[tuple[Any, int, int]]:
    """index.Tensor and index_put: each integer index lies in its dim (negatives count from the end); a boolean
    mask covers as many dims as it has, and ATen checks its shape."""
    out: list[tuple[Any, int, int]] = []
    if not isinstance(self, torch.Tensor) or not isinstance(indices, list | tuple):
        return out
    dim = 0
    for index in indices:
        if isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8):
            dim += index.dim()
            continue
        if isinstance(index, torch.Tensor) and dim < self.dim():
            out.append((index, -self.shape[dim], self.shape[dim]))
        dim += 1
    return out


def _take_along_dim(self: Any, indices: Any, dim: Any = None) -> list[tuple[Any, int, int]]:
    size = self.numel() if dim is None and isinstance(self, torch.Tensor) else _dim_size(self, dim)
    return [] if size is None else [(indices, 0, size)]


def _embedding(weight: Any, indices: Any, *_: Any, **__: Any) -> list[tuple[Any, int, int]]:
    size = _dim_size(weight, 0)
    return [] if size is None else [(indices, 0, size)]


def _one_hot(self: Any, num_classes: Any = -1) -> list[tuple[Any, int, int]]:
    return [(self, 0, num_classes)] if isinstance(num_classes, int) and num_classes > 0 else []


_INDEX_BOUNDS: dict[str, IndexBounds] = {
    **dict.fromkeys(
        ("aten.gather.default", "aten.scatter.src", "aten.scatter.value", "aten.scatter_add.default",
         "aten.scatter_.src", "aten.scatter_.value", "aten.scatter_add_.default",
         "aten.scatter_reduce.two", "aten.index_add.default", "aten.index_copy.default", "aten.index_copy_.default"),
        _along_dim,
    ),
    "aten.index_select.default": _along_dim,
    "aten.index.Tensor": _advanced,
    "aten.index_put.default": _advanced,
    "aten.index_put_.default": _advanced,
    "aten.take_along_dim.default": _take_along_dim,
    "aten.embedding.default": _embedding,
    "aten.one_hot.default": _one_hot,
}  # fmt: skip


def _check_index(target: str, index: Any, low: int, high: int) -> None:
    """ValueError (an IRError in the interpreter) if an integer ``index`` has a value outside [low, high)."""
    if not isinstance(index, torch.Tensor) or index.is_meta or index.numel() == 0 or index.is_floating_point():
        return  # ATen refuses floating indices itself; meta tensors hold no values
    if index.dtype is torch.bool:
        return
    smallest, largest = (int(v) for v in torch.stack(torch.aminmax(index)).tolist())
    if smallest < low or largest >= high:
        raise ValueError(f"{target}: index values span [{smallest}, {largest}], outside [{low}, {high}) of the dim")


@functools.cache
def _schema(target: str) -> torch.FunctionSchema:
    return resolve(target)._schema  # type: ignore[attr-defined]


def _returns(schema: torch.FunctionSchema) -> Kind:
    kinds = [r.real_type.kind() for r in schema.returns]
    if not kinds:
        return NONE
    if kinds == ["TensorType"]:
        return TENSOR
    if kinds in (["IntType"], ["SymIntType"]):
        return INT
    return TENSORS  # a Tensor[] or a tuple of tensors (every multi-output op in the allow-list)


def _takes_device(schema: torch.FunctionSchema) -> bool:
    return any(a.name == "device" and a.kwarg_only for a in schema.arguments)


def _check(call: _Call, name: str, t: Any, arg: s.Arg, n: int | None) -> int:
    """Check one argument against schema type ``t``; return its extra dry-run cost (long lists)."""
    kind = t.kind()
    if kind == "OptionalType":
        if _is_none(arg):
            return 0
        return _check(call, name, t.getElementType(), arg, n)
    if kind == "TensorType":
        if isinstance(arg, s.Ref):  # export passes sizes, and number literals, where a 0-dim tensor goes
            _expect_ref(call, name, arg, (TENSOR, INT, ANY), "a reference to a tensor or a size")
        else:
            _check_scalar(call, name, arg, "a reference to a tensor, or a number literal")
        return 0
    if kind == "ListType":
        return _check_list(call, name, t.getElementType(), arg, n)
    if kind in ("IntType", "SymIntType"):
        _check_int(call, name, arg, symbolic=kind == "SymIntType")
        return 0
    if kind == "FloatType":
        if not (isinstance(arg, s.Float) or _is_int_lit(arg)):
            raise call.fail(name, "a float", arg)
        _int_in(call, name, arg, INT64)
        return 0
    if kind == "NumberType":
        _check_scalar(call, name, arg)
        return 0
    if kind == "BoolType":
        if not (isinstance(arg, s.Lit) and isinstance(arg.value, bool)):
            raise call.fail(name, "a literal true or false", arg)
        if name == "pin_memory" and arg.value:
            raise call.fail(name, "false or null (page-locked memory is outside the stage's reservation)", arg)
        return 0
    if kind == "StringType":
        pattern = _STR_PATTERNS.get((call.node.target, name))
        if pattern is not None:
            if not (isinstance(arg, s.Lit) and isinstance(arg.value, str) and pattern.fullmatch(arg.value)):
                raise call.fail(name, f"a string matching {pattern.pattern}", arg)
            return 0
        choices = _STR_CHOICES.get((call.node.target, name), frozenset())
        if not (isinstance(arg, s.Lit) and isinstance(arg.value, str) and arg.value in choices):
            raise call.fail(name, f"one of {sorted(choices)}", arg)
        return 0
    tag = _ENUM_TAGS.get(kind)
    if tag is None:
        raise IRError(f"node {call.node.name}: {call.node.target} argument {name!r} has type {t}, which stage "
                      "programs cannot pass")  # fmt: skip
    if not isinstance(arg, tag[0]):
        raise call.fail(name, tag[1], arg)
    return 0


_ENUM_TAGS: dict[str, tuple[type, str]] = {
    "ScalarTypeType": (s.DType, "a dtype tag from the fixed table"),
    "LayoutType": (s.Layout, "a layout tag"),
    "MemoryFormatType": (s.MemoryFormat, "a memory_format tag"),
    "DeviceObjType": (s.Device, "the device tag (the worker's own device; a program cannot name one)"),
}


def _check_list(call: _Call, name: str, elem: Any, arg: s.Arg, n: int | None) -> int:
    tensors = elem.kind() == "TensorType" or (
        elem.kind() == "OptionalType" and elem.getElementType().kind() == "TensorType"
    )
    if tensors:
        if isinstance(arg, s.Ref):
            _expect_ref(call, name, arg, (TENSORS, SEQ, ANY), "a list of tensors")
            return 0
        if not isinstance(arg, s.List):
            raise call.fail(name, "a list of tensor references", arg)
        for item in arg.items:
            _check(call, name, elem, item, None)
        return len(arg.items) // _ITEMS_PER_UNIT
    if n is not None and _is_int_lit(arg):  # int[2] padding=1: one int for every dim
        _check(call, name, elem, arg, None)
        return 0
    if not isinstance(arg, s.List):
        raise call.fail(name, "a list of integers", arg)
    limit = _LIST_LENGTHS.get(name, MAX_RANK)
    if len(arg.items) > limit:
        raise call.fail(name, f"a list of at most {limit} integers", arg)
    for item in arg.items:
        _check(call, name, elem, item, None)
    return len(arg.items) // _ITEMS_PER_UNIT


def _check_int(call: _Call, name: str, arg: s.Arg, *, symbolic: bool) -> None:
    if symbolic and isinstance(arg, s.Ref):
        _expect_ref(call, name, arg, (INT, ANY), "an integer or a reference to a size")
        return
    if not _is_int_lit(arg):
        raise call.fail(name, "an integer literal" + (" or a reference to a size" if symbolic else ""), arg)
    _int_in(call, name, arg, _INT_RANGES.get((call.node.target, name)) or _INT_RANGES.get(name, INT64))


def _check_scalar(call: _Call, name: str, arg: s.Arg, expected: str = "a number or a reference to a size") -> None:
    if isinstance(arg, s.Ref):
        _expect_ref(call, name, arg, (INT, ANY), expected)
    elif not (isinstance(arg, s.Float) or (isinstance(arg, s.Lit) and isinstance(arg.value, int))):
        raise call.fail(name, expected, arg)
    _int_in(call, name, arg, INT64)


def _int_in(call: _Call, name: str, arg: s.Arg, bounds: tuple[int, int]) -> None:
    if _is_int_lit(arg) and not bounds[0] <= arg.value <= bounds[1]:  # type: ignore[union-attr, operator]
        raise call.fail(name, f"an integer in [{bounds[0]}, {bounds[1]}]", arg)


def _expect_ref(call: _Call, name: str, arg: s.Arg, kinds: tuple[Kind, ...], expected: str) -> None:
    if not (isinstance(arg, s.Ref) and call.kinds.get(arg.node) in kinds):
        raise call.fail(name, expected, arg)


def _check_py(call: _Call) -> Checked:
    """operator.getitem on an op's outputs, and arithmetic on sizes (see PY_OPS): a divisor or modulus is a literal
    of 1 or more."""
    node = call.node
    if node.kwargs or len(node.args) != 2:
        raise IRError(f"node {node.name}: {node.target} takes exactly two positional arguments")
    a, b = node.args
    if node.target == "operator.getitem":
        _expect_ref(call, "a", a, (TENSORS, SEQ, ANY), "a reference to an op's list of outputs")
        if not _is_int_lit(b):
            raise call.fail("b", "an integer literal", b)
        _int_in(call, "b", b, (-MAX_OUTPUTS, MAX_OUTPUTS - 1))
        return Checked(TENSOR if call.kinds[a.node] == TENSORS else ANY, 1, False)  # type: ignore[union-attr]
    for arg_name, arg in (("a", a), ("b", b)):
        if isinstance(arg, s.Ref):
            if node.target in _BY_LITERAL and arg_name == "b":
                raise call.fail("b", "an integer literal (a size may only be divided by a constant)", arg)
            _expect_ref(call, arg_name, arg, (INT, ANY), "a reference to a size")
        elif _is_int_lit(arg):
            low = 1 if node.target in _BY_LITERAL and arg_name == "b" else _PY_LITERAL[0]
            _int_in(call, arg_name, arg, (low, _PY_LITERAL[1]))
        else:
            raise call.fail(arg_name, "an integer literal or a reference to a size", arg)
    return Checked(INT, 1, False)


def _is_none(arg: s.Arg) -> bool:
    return isinstance(arg, s.Lit) and arg.value is None


def _is_int_lit(arg: s.Arg) -> bool:
    return isinstance(arg, s.Lit) and isinstance(arg.value, int) and not isinstance(arg.value, bool)


def _describe(arg: s.Arg, kinds: Mapping[str, Kind]) -> str:
    if isinstance(arg, s.Ref):
        return f"a reference to {arg.node} (a value of kind {kinds.get(arg.node, 'unknown')})"
    if isinstance(arg, s.Lit):
        return f"the literal {arg.value!r}"[:80]
    if isinstance(arg, s.List):
        return f"a list of {len(arg.items)} items"
    return f"a {type(arg).__name__} tag"
