"""load(): on the worker, validate a stage program and build a module that runs it.

Nothing in the program is executed as code. Every target is looked up in the allow-list, every node
reference must point to an earlier node, dtypes and enums come from fixed tables, the device is the
worker's, the weights are safetensors, and a dry run on the meta device at the declared maximum input
shapes bounds the memory of one forward pass before any real tensor is allocated. The graph then runs
in the interpreter of ir/interpret.py over these validated nodes (a loop over pre-resolved operator calls), with
parameters as ``nn.Parameter`` so autograd and any optimizer work unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as read_safetensors  # the safetensors format: no pickle, no code

from tensorlink.ir import memory
from tensorlink.ir import schema as s
from tensorlink.ir.argcheck import MAX_COST, check_state_rank
from tensorlink.ir.errors import IRError
from tensorlink.ir.interpret import Graph, run_graph
from tensorlink.ir.ops import OPS_VERSION
from tensorlink.ir.program import StageProgram
from tensorlink.wire.dtypes import TORCH_BY_NAME

DEFAULT_MAX_MEMORY = 8 << 30
_RESERVED = frozenset(dir(torch.nn.Module)) | {"training"}


def load(
    data: bytes, *, device: str | torch.device = "cpu", train: bool = True, max_memory_bytes: int = DEFAULT_MAX_MEMORY
) -> StageModule:
    """Validate ``data`` (bytes from StageProgram.to_bytes) and return a module that runs it on ``device``."""
    program = StageProgram.from_bytes(data)
    return StageModule(program, device=torch.device(device), train=train, max_memory_bytes=max_memory_bytes)


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
        subgraphs = {name: Graph(g, None, known, 64) for name, g in p.subgraphs.items()}
        self._graph = Graph(p.graph, subgraphs, known, n_inputs)
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
        results = run_graph(self._program, self._graph, inputs, state, self._device, self.training)
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
            return memory.count(lambda: run_graph(self._program, self._graph, inputs, state, meta, mode), limit)

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
