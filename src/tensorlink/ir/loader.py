"""load(): on the worker, validate a stage program and build a module that runs it.

Nothing in the program is executed as code. Every target is looked up in the allow-list, every node
reference must point to an earlier node, dtypes and enums come from fixed tables, the device is the
worker's, the weights are safetensors, and a dry run on the meta device at the declared maximum input
shapes bounds the memory of one forward pass before any real tensor is allocated. The graph then runs
in a small interpreter over these validated nodes (a loop over pre-resolved operator calls), with
parameters as ``nn.Parameter`` so autograd and any optimizer work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load as read_safetensors  # the safetensors format: no pickle, no code

from tensorlink.ir import memory
from tensorlink.ir import schema as s
from tensorlink.ir.argcheck import ANY, MAX_COST, SEQ, TENSOR, Kind, bounded, check_call, check_state_rank
from tensorlink.ir.errors import IRError
from tensorlink.ir.ops import (
    ATEN_OPS,
    MODE_DEPENDENT,
    OPS_VERSION,
    PY_OPS,
    SET_GRAD_REGION,
    resolve,
)
from tensorlink.ir.program import StageProgram
from tensorlink.wire.dtypes import TORCH_BY_NAME

DEFAULT_MAX_MEMORY = 8 << 30
_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last,
}

_RESERVED = frozenset(dir(torch.nn.Module)) | {"training"}

# A compiled argument: ("c", constant) | ("r", node name) | ("l", [compiled...]) | ("d", None) for a device.
Compiled = tuple[str, Any]


def load(
    data: bytes, *, device: str | torch.device = "cpu", train: bool = True, max_memory_bytes: int = DEFAULT_MAX_MEMORY
) -> StageModule:
    """Validate ``data`` (bytes from StageProgram.to_bytes) and return a module that runs it on ``device``."""
    program = StageProgram.from_bytes(data)
    return StageModule(program, device=torch.device(device), train=train, max_memory_bytes=max_memory_bytes)


class _Step:
    __slots__ = ("name", "fn", "args", "kwargs", "mode", "subgraph", "train_only")

    def __init__(self, name: str, fn: Callable[..., Any] | None, args: list[Compiled], kwargs: dict[str, Compiled]):
        self.name = name
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.mode: tuple[int, str, Any] | None = None  # (position, keyword, captured value)
        self.subgraph: _Graph | None = None
        # An in-place update of a buffer (BatchNorm's num_batches_tracked += 1): state changes only while
        # training, as in eager, so in eval mode the step passes its input through.
        self.train_only = False


class _Graph:
    """A validated graph: placeholders, steps in order, outputs, when each value can be dropped, and what one
    run of it costs the dry run (tensorlink.ir.argcheck)."""

    def __init__(self, graph: s.Graph, subgraphs: dict[str, _Graph] | None, known_state: set[str], n_inputs: int):
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
                    step.fn = bounded(node.target, resolve(node.target))
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


class StageModule(torch.nn.Module):
    """Runs a validated stage program. Parameters and buffers keep their original names."""

    def __init__(self, program: StageProgram, *, device: torch.device, train: bool, max_memory_bytes: int) -> None:
        super().__init__()
        p = program.program
        if p.ops_version > OPS_VERSION:
            raise IRError(f"program uses operator set {p.ops_version}; this worker knows up to {OPS_VERSION}")
        self._program = p
        self._device = device
        try:
            tensors = read_safetensors(program.weights)
        except Exception as exc:
            raise IRError(f"weights are not valid safetensors: {exc}") from None
        declared = [*p.parameters, *p.buffers, *p.constants]
        if len(set(declared)) != len(declared) or set(declared) != set(tensors):
            raise IRError("the weights do not hold exactly the declared parameters, buffers and constants")
        for name, tensor in tensors.items():
            check_state_rank(name, tensor)
        if not set(p.storage_keys) <= set(p.parameters):
            raise IRError("storage keys name parameters the program does not declare")
        for group in p.tie_groups:  # one tensor under several names (a tied weight, a buffer also lifted as a constant)
            if not group or group[0] not in declared:
                raise IRError(f"tie group {group[:3]} does not start with a declared parameter, buffer or constant")
        n_inputs = len(p.signature.inputs)
        if n_inputs != p.signature.positional + len(p.signature.keywords):
            raise IRError("the signature's inputs do not match its positional and keyword counts")
        for name, (low, high) in p.signature.symbols.items():
            if low > high:
                raise IRError(f"dynamic dim {name} has an empty range {low}..{high}")
        for spec in p.signature.inputs:
            for dim in spec.shape:
                if isinstance(dim, str) and dim not in p.signature.symbols:
                    raise IRError(f"input dimension {dim!r} has no declared range")
        known = set(declared)
        n_nodes = len(p.graph.nodes) + sum(len(g.nodes) for g in p.subgraphs.values())
        if n_nodes > s.MAX_NODES:
            raise IRError(f"the program has {n_nodes} nodes in all its graphs; the cap is {s.MAX_NODES}")
        subgraphs = {name: _Graph(g, None, known, 64) for name, g in p.subgraphs.items()}
        self._graph = _Graph(p.graph, subgraphs, known, n_inputs)
        runs = len(memory.corners(p.signature.symbols))
        if self._graph.cost * runs > MAX_COST:
            raise IRError(
                f"validating this program would cost {self._graph.cost} units of dry run (grad regions counted each "
                f"time they run) x {runs} runs (corners of the declared input ranges); the cap is {MAX_COST}: "
                "split the model into more stages or declare fewer dynamic dims"
            )
        for node_name, buffer in p.buffer_mutations.items():
            if buffer not in p.buffers or node_name not in {step.name for step in self._graph.steps}:
                raise IRError(f"buffer mutation {node_name} -> {buffer} names an unknown node or buffer")
        self._dry_run(tensors, max_memory_bytes)
        self._state: dict[str, torch.Tensor] = {}
        for name in p.parameters:
            self._register(name, torch.nn.Parameter(tensors[name].to(device)), "parameter")
        for name in p.buffers:
            self._register(name, tensors[name].to(device), "buffer", persistent=name in p.persistent_buffers)
        for name in p.constants:
            self._register(name, tensors[name].to(device), "buffer", persistent=False)
        self._captured_train = p.captured_train
        self.train(train)

    # -- state -------------------------------------------------------------------------------------

    def _register(self, name: str, tensor: torch.Tensor, kind: str, persistent: bool = True) -> None:
        """Place the tensor at its dotted original name, creating empty container modules on the way."""
        *path, leaf = name.split(".")
        for part in (*path, leaf):
            if not (part.isidentifier() or part.isdigit()) or part.startswith("_") or part in _RESERVED:
                raise IRError(f"state name {name!r} has an unusable part {part!r} (it would shadow a module attribute)")
        owner: torch.nn.Module = self
        try:
            for part in path:
                child = owner._modules.get(part)
                if child is None:
                    child = torch.nn.Module()
                    owner.add_module(part, child)
                owner = child
            if kind == "parameter":
                owner.register_parameter(leaf, tensor)  # type: ignore[arg-type]
            else:
                owner.register_buffer(leaf, tensor, persistent=persistent)
        except (KeyError, AttributeError, TypeError) as exc:
            raise IRError(f"state name {name!r} conflicts with another state name: {exc}") from None
        self._state[name] = tensor

    def _live_state(self, name: str) -> torch.Tensor:
        *path, leaf = name.split(".")
        owner: torch.nn.Module = self
        for part in path:
            owner = owner._modules[part]  # type: ignore[assignment]
        return getattr(owner, leaf)

    def train(self, mode: bool = True) -> StageModule:
        if mode and not self._captured_train and any(step.mode is not None for step in self._graph.steps):
            raise IRError("this program was captured in eval mode; capture it with train=True to train it")
        return super().train(mode)

    # -- running -----------------------------------------------------------------------------------

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        sig = self._program.signature
        if len(args) != sig.positional or set(kwargs) != set(sig.keywords):
            raise TypeError(
                f"this stage takes {sig.positional} positional tensors and keywords {sig.keywords}, "
                f"got {len(args)} and {sorted(kwargs)}"
            )
        inputs = [*args, *(kwargs[k] for k in sig.keywords)]
        self._check_inputs(inputs)
        self._shape_guard.check([list(t.shape) for t in inputs])
        state = {name: self._live_state(name) for name in self._state}
        results = self._run(self._graph, inputs, state, self._device, self.training)
        outputs, env = results
        for node_name, buffer in self._program.buffer_mutations.items():
            with torch.no_grad():
                self._live_state(buffer).copy_(env[node_name])
        if sig.output == "tensor":
            return outputs[0]
        if sig.output == "tuple":
            return tuple(outputs)
        return dict(zip(sig.output_keys, outputs, strict=True))

    def _check_inputs(self, inputs: list[torch.Tensor]) -> None:
        sig = self._program.signature
        bound: dict[str, int] = {}
        for i, (tensor, spec) in enumerate(zip(inputs, sig.inputs, strict=True)):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != TORCH_BY_NAME[spec.dtype]:
                raise TypeError(f"input {i} must be a {spec.dtype} tensor")
            if tensor.dim() != len(spec.shape):
                raise ValueError(f"input {i} must have {len(spec.shape)} dims, got shape {tuple(tensor.shape)}")
            for size, dim in zip(tensor.shape, spec.shape, strict=True):
                if isinstance(dim, int):
                    if size != dim:
                        raise ValueError(f"input {i} has shape {tuple(tensor.shape)}, expected {spec.shape}")
                    continue
                low, high = sig.symbols[dim]
                if not low <= size <= high or bound.setdefault(dim, size) != size:
                    raise ValueError(
                        f"input {i} dim {dim}={size} is outside its declared range {low}..{high} "
                        "or disagrees with another input"
                    )

    def _run(
        self,
        graph: _Graph,
        inputs: list[Any],
        state: dict[str, torch.Tensor],
        device: torch.device,
        training: bool,
        on_value: Callable[[str, Any], None] | None = None,
    ) -> tuple[list[Any], dict[str, Any]]:
        env: dict[str, Any] = {}
        for p in graph.placeholders:
            env[p.name] = inputs[p.index] if p.kind == "input" else state[p.target]  # type: ignore[index]
        keep = set(self._program.buffer_mutations)
        for i, step in enumerate(graph.steps):
            args = [_ev(a, env, device) for a in step.args]
            kwargs = {k: _ev(v, env, device) for k, v in step.kwargs.items()}
            if step.mode is not None:
                _apply_mode(step, args, kwargs, training)
            try:
                if step.subgraph is not None:
                    with torch.set_grad_enabled(bool(args[0]) and torch.is_grad_enabled()):
                        sub = self._run(step.subgraph, args[1:], state, device, training, on_value)[0]
                    env[step.name] = tuple(sub)
                elif step.train_only and not training and self._program.captured_train:
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

    def _dry_run(self, tensors: dict[str, torch.Tensor], max_memory_bytes: int) -> None:
        """Count what one forward allocates on the meta device (tensorlink.ir.memory: every storage the aten
        calls create, kernels' workspace, grad regions included) at every corner of the declared input ranges,
        before anything real is allocated. The largest count is ``memory_bound``; ``_shape_guard`` refuses a
        later forward at shapes that need more (sizes need not grow with the inputs)."""
        sig = self._program.signature
        meta = torch.device("meta")
        state = {k: torch.empty(v.shape, dtype=v.dtype, device=meta) for k, v in tensors.items()}

        def count_at(shapes: list[list[int]], limit: int) -> int:
            dtypes = [TORCH_BY_NAME[spec.dtype] for spec in sig.inputs]
            inputs = [torch.empty(s, dtype=d, device=meta) for s, d in zip(shapes, dtypes, strict=True)]
            mode = self._program.captured_train
            return memory.count(lambda: self._run(self._graph, inputs, state, meta, mode), limit)

        bound = 0
        for i, point in enumerate(memory.corners(sig.symbols)):
            shapes = [[d if isinstance(d, int) else point[d] for d in spec.shape] for spec in sig.inputs]
            try:
                bound = max(bound, count_at(shapes, max_memory_bytes))
            except memory.OverBound as exc:
                raise memory.OverBound(
                    f"dry run at input shapes {shapes} needs more than {max_memory_bytes / 2**30:.2f} GiB "
                    f"({exc}): refused"
                ) from None
            except IRError as exc:
                if i == 0:  # at the declared maximum shapes the program must run; elsewhere it may fail (and stop)
                    raise IRError(f"dry run: {exc}") from None
            except Exception as exc:
                if i == 0:
                    raise IRError(f"dry run failed: {type(exc).__name__}: {exc}") from None
        self.memory_bound = bound
        self._shape_guard = memory.ShapeGuard(bound, count_at)
        self.memory_at = self._shape_guard.check  # bytes a forward at given input shapes allocates; IRError past bound


def _apply_mode(step: _Step, args: list[Any], kwargs: dict[str, Any], training: bool) -> None:
    pos, kw, captured = step.mode  # type: ignore[misc]
    value = (captured if training else 0.0) if kw == "dropout_p" else training
    if kw == "dropout_p" and captured is None:
        return
    if pos < len(args):
        args[pos] = value
    else:
        kwargs[kw] = value
