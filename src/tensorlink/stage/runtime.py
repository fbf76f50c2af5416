"""StageRuntime: one pipeline stage of one job, its whole state explicit.

State: the loaded stage programs (a training one, and an eval one for generation that shares its
weights by name), the optimizer and its state, the activations kept for backward, and the gradients
of a fused step waiting for the owner's backward. Compute runs in a worker thread so the event loop
keeps moving frames while a micro-batch computes (a small inference forward alone in its step, a decode
step, runs on the loop: see INLINE_BYTES); sends go out from tasks of their own, so a stage never waits on
a slow neighbour before starting its next micro-batch.

Randomness is seeded per (job, step, micro-batch, stage), so recomputing a micro-batch (proof of
learning) or handing the stage to another worker (fault tolerance) gives the same result.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import trio

from tensorlink.ir import StageModule, load
from tensorlink.ir.charge import forward_bytes, optimizer_bytes
from tensorlink.ir.memory import OverBound
from tensorlink.stage.links import NONE_MARKER, Lane, Link, from_marker
from tensorlink.stage.schedule import actions
from tensorlink.wire.stage import InputSlot, OutputSlot, RunBackward, RunStep

# The KV cache of a generation program: transformers' static-cache export wrapper names its buffers so (one key and
# one value tensor per layer, batch first); a beam search reorders their rows.
KV_CACHE = re.compile(r"(?:^|\.)(?:key|value)_cache_\d+$")

# An inference forward of a one-micro-batch step (nothing to overlap it with here) at input shapes already counted
# that allocates at most this much (a decode step) runs on the event loop: handing it to a thread and back costs
# more than it computes on a loaded machine (0.3-1 ms each way).
INLINE_BYTES = 4 << 20

# Optimizers a job may name, each with the parameter-sized state tensors ("slots") the owner declares for it, and
# the hyper-parameters each may set: no user code reaches a worker.
_ALLOWED: tuple[tuple[type[torch.optim.Optimizer], int], ...] = (
    (torch.optim.SGD, 1),
    (torch.optim.Adam, 2),
    (torch.optim.AdamW, 2),
    (torch.optim.Adagrad, 1),
    (torch.optim.Adadelta, 2),
    (torch.optim.Adamax, 2),
    (torch.optim.NAdam, 2),
    (torch.optim.RAdam, 2),
    (torch.optim.RMSprop, 2),
)
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {cls.__name__: cls for cls, _ in _ALLOWED}
OPTIMIZER_SLOTS: dict[str, int] = {cls.__name__: slots for cls, slots in _ALLOWED}
HYPER_KEYS = frozenset(
    {"lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "amsgrad", "alpha", "centered",
     "maximize", "lr_decay", "initial_accumulator_value", "rho", "momentum_decay", "decoupled_weight_decay"}
)  # fmt: skip


def optimizer_copies(name: str, hyper: dict[str, Any]) -> int:
    """How many parameter-sized tensors the allow-listed optimizer ``name`` keeps per parameter with ``hyper``."""
    if name == "SGD":
        return 1 if hyper.get("momentum", 0) else 0
    if name in ("Adam", "AdamW"):
        return 3 if hyper.get("amsgrad") else 2
    if name == "RMSprop":
        return 1 + bool(hyper.get("momentum", 0)) + bool(hyper.get("centered"))
    return {"Adagrad": 1, "Adadelta": 2, "Adamax": 2, "NAdam": 2, "RAdam": 2}[name]


class Reservation(Protocol):
    """The memory a stage holds on its worker: ``held()`` now; ``grow(needed)`` raises it to ``needed`` where
    the worker still has that much unreserved and returns what is held after; ``ceiling()`` is the most it
    could reach now."""

    def held(self) -> int: ...

    def grow(self, needed: int) -> int: ...

    def ceiling(self) -> int: ...


@dataclass
class FixedReservation:
    """A reservation that never grows (a runtime outside a worker's registry, tests)."""

    size: int

    def held(self) -> int:
        return self.size

    def grow(self, needed: int) -> int:
        return self.size

    def ceiling(self) -> int:
        return self.size


class StageError(Exception):
    """A command this stage cannot carry out; ``code`` is machine-readable, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class LoadedProgram:
    module: StageModule
    inputs: list[InputSlot]
    outputs: list[OutputSlot]


@dataclass
class FusedGrads:
    """Gradients of a fused step, kept apart until the owner's backward says how to scale them."""

    step: int
    before: dict[str, torch.Tensor | None] = field(default_factory=dict)


def seed_of(job: bytes, step: int, micro_batch: int, stage: int) -> int:
    digest = hashlib.sha256(job + step.to_bytes(8, "little") + micro_batch.to_bytes(4, "little")).digest()
    return int.from_bytes(digest[:8], "little") ^ stage


def check_hyper(name: str, hyper: dict[str, Any]) -> type[torch.optim.Optimizer]:
    """The optimizer class for ``name`` if it and every hyper-parameter are allowed."""
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise StageError(
            "optimizer_not_allowed", f"optimizer {name!r} is not allowed; use one of {', '.join(sorted(OPTIMIZERS))}"
        )
    unknown = sorted(set(hyper) - HYPER_KEYS)
    if unknown:
        raise StageError("bad_hyper", f"{name} hyper-parameters not allowed here: {', '.join(unknown)}")
    return cls


class StageRuntime:
    """Runs stage ``stage`` of ``n_stages`` for ``job``. ``links`` maps "prev", "next" and "user" to
    the links this stage talks on (missing: that neighbour does not exist)."""

    def __init__(
        self,
        job: bytes,
        stage: int,
        n_stages: int,
        links: dict[str, Link],
        *,
        device: str = "cpu",
        reservation: Reservation | None = None,
    ) -> None:
        self.job = job
        self.stage = stage
        self.n_stages = n_stages
        self.links = links
        self.device = torch.device(device)
        self.reservation: Reservation = reservation or FixedReservation(8 << 30)
        self.programs: dict[str, LoadedProgram] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_copies = 0
        self.stash: dict[tuple[int, int], tuple[list[torch.Tensor], list[Any]]] = {}
        self.stash_bytes: dict[tuple[int, int], int] = {}  # what each kept micro-batch is charged (see _forward)
        self.running = 0  # what the forward running now, kept for no backward, is charged
        self.peak_charged = 0  # the most this stage has been charged (/status: does its reservation cover it?)
        self.fused: FusedGrads | None = None
        self.steps_run = 0
        self.micro_batches_run = 0  # /status: the dashboard's micro-batches per second
        self._sends: trio.Nursery | None = None
        # What the loaded programs hold, per program left out (see needed): walking every parameter and buffer
        # takes long, and a stage asks on every frame and forward; only a load changes it.
        self._held: dict[str | None, _Held] = {}
        self._inline: set[tuple[str, tuple[tuple[int, ...], ...]]] = set()  # (program, input shapes): see INLINE_BYTES

    # -- state -----------------------------------------------------------------------------------------

    @property
    def train_module(self) -> StageModule:
        if "train" not in self.programs:
            raise StageError("no_program", "no training program is loaded on this stage")
        return self.programs["train"].module

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.train_module.named_parameters())

    def load(self, key: str, data: bytes, inputs: list[InputSlot], outputs: list[OutputSlot], prefix: str = "") -> None:
        """Validate and build a stage program (IR load: no user code). A second program takes the first
        one's live parameters (and buffers of the same name) by name, its names being the training
        program's with ``prefix``, so generation sees the trained weights; its own buffers (a KV cache)
        stay its own. The program's weights and its memory bound must fit this stage's reservation with
        everything else the stage holds (``needed``); its dry run may use what the reservation could grow to."""
        held, ceiling = self.needed(without=key), self.reservation.ceiling()
        if held + len(data) > ceiling:  # refused before parsing; the reservation grows only for a program that loads
            raise StageError(
                "over_reservation",
                f"the {key} program's {len(data)} bytes would bring this stage to {held + len(data)} bytes (it holds "
                f"{held} already), over the {ceiling} bytes its reservation could grow to on this worker",
            )
        try:
            module = load(data, device=self.device, train=key == "train", max_memory_bytes=ceiling - held)
        except OverBound as exc:
            raise StageError(
                "over_reservation", f"the {key} program does not fit this stage's reservation: {exc}"
            ) from None
        if key != "train" and "train" in self.programs:
            _share_state(self.programs["train"].module, module, prefix)
        previous = self.programs.get(key)
        self.programs[key] = LoadedProgram(module, inputs, outputs)
        self._held.clear()
        self._inline.clear()
        try:
            self._require(self.needed(), f"the {key} program (weights, gradients, optimizer state, activations)")
        except StageError:
            if previous is None:
                del self.programs[key]
            else:
                self.programs[key] = previous
            self._held.clear()
            raise

    # -- memory: everything the stage holds counts against its reservation ---------------------------------

    def needed(self, *, without: str | None = None, copies: int | None = None, reserve: bool = True) -> int:
        """Bytes this stage needs with its programs (less ``without``): their weights and buffers (shared ones
        once), gradients and ``copies`` (default: the optimizer's) optimizer copies of the training parameters,
        what is charged for kept micro-batches, and with ``reserve`` room for one forward at the declared maximum
        shapes (the largest program's memory bound; twice for training: each value's gradient is its size)."""
        held = self._held.get(without)
        if held is None:
            held = self._held[without] = _walk({k: p.module for k, p in self.programs.items() if k != without})
        copies = self.optimizer_copies if copies is None else copies
        optimizer = optimizer_bytes(held.param_bytes, held.params, copies)
        activations = held.activations if reserve else 0
        return held.storage_bytes + held.param_bytes + optimizer + activations + sum(self.stash_bytes.values())

    def _require(self, needed: int, what: str) -> None:
        """Grow the reservation to ``needed`` where the worker has room (all or nothing), else refuse with
        over_reservation."""
        self.peak_charged = max(self.peak_charged, needed)
        reserved = self.reservation.held()
        if needed > reserved:
            reserved = self.reservation.grow(needed)
        if needed > reserved:
            raise StageError(
                "over_reservation",
                f"{what} would bring this stage to {needed} bytes, over its reservation of {reserved} bytes, and the "
                "worker has no room to grow it",
            )

    def state_tensors(self, names: list[str]) -> list[tuple[str, torch.Tensor]]:
        state = self.train_module.state_dict(keep_vars=False)
        if not names:
            return list(state.items())
        missing = [n for n in names if n not in state]
        if missing:
            raise StageError("unknown_tensor", f"this stage holds no tensor named {missing[0]!r}")
        return [(n, state[n]) for n in names]

    def grad_tensors(self, names: list[str]) -> list[tuple[str, torch.Tensor]]:
        params = self.parameters()
        out = []
        for name in names:
            if name not in params:
                raise StageError("unknown_tensor", f"this stage holds no parameter named {name!r}")
            grad = params[name].grad
            out.append((name, grad if grad is not None else torch.zeros_like(params[name])))
        return out

    def set_grads(self, named: list[tuple[str, torch.Tensor]]) -> None:
        params = self.parameters()
        for name, grad in named:
            param = params.get(name)
            if param is None or grad.shape != param.shape or grad.dtype != param.dtype:
                raise StageError("bad_tensor", f"gradient for {name!r} does not match the parameter")
            param.grad = grad.to(param.device)

    # -- optimizer -------------------------------------------------------------------------------------

    def make_optimizer(self, name: str, hyper: dict[str, Any]) -> None:
        cls = check_hyper(name, hyper)
        params = list(self.parameters().values())
        copies = optimizer_copies(name, hyper)
        self._require(self.needed(copies=copies), f"a {name} optimizer ({copies} copies of the parameters)")
        try:
            self.optimizer = cls(params, **_hyper_values(hyper))
        except (TypeError, ValueError) as exc:
            raise StageError("bad_hyper", f"{name}: {exc}") from None
        self.optimizer_copies = copies

    def optimizer_step(self, hyper: dict[str, Any]) -> None:
        if self.optimizer is None:
            raise StageError("no_optimizer", "no optimizer on this stage: create one with model.optimizer(...)")
        check_hyper(type(self.optimizer).__name__, hyper)
        for group in self.optimizer.param_groups:
            group.update(_hyper_values(hyper))
        self._settle_fused()
        self.optimizer.step()

    def zero_grad(self) -> None:
        self._settle_fused()
        for param in self.parameters().values():
            param.grad = None

    def optimizer_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The optimizer's per-parameter state as ``<parameter>:<key>`` tensors (empty before a step)."""
        if self.optimizer is None:
            return []
        out = []
        for name, param in self.parameters().items():
            for key, value in self.optimizer.state.get(param, {}).items():
                out.append((f"{name}:{key}", value if isinstance(value, torch.Tensor) else torch.tensor(value)))
        return out

    def grad_squares(self, exclude: list[str]) -> float:
        total = 0.0
        for name, param in self.parameters().items():
            if param.grad is not None and name not in exclude:
                total += float(param.grad.detach().double().pow(2).sum())
        return total

    def scale_grads(self, factor: float) -> None:
        for param in self.parameters().values():
            if param.grad is not None:
                param.grad.mul_(factor)

    # -- fused steps: gradients computed before the owner's backward ---------------------------------

    def _begin_fused(self, step: int) -> None:
        self._settle_fused()
        params = self.parameters()
        self.fused = FusedGrads(step, {name: p.grad for name, p in params.items()})
        for p in params.values():
            p.grad = None

    def commit(self, step: int, scale: float) -> None:
        """Add ``scale`` × this step's fused gradients to what the parameters had before the step."""
        fused = self.fused
        if fused is None or fused.step != step:
            raise StageError("no_fused_step", f"no fused gradients of step {step} wait here")
        for name, p in self.parameters().items():
            contribution = p.grad
            if contribution is not None and scale != 1.0:
                contribution = contribution * scale
            before = fused.before.get(name)
            p.grad = before if contribution is None else contribution if before is None else before + contribution
        self.fused = None

    def _settle_fused(self) -> None:
        """A fused step the owner never back-propagated (it only looked at the loss): drop its
        gradients and restore the earlier ones."""
        if self.fused is None:
            return
        for name, p in self.parameters().items():
            p.grad = self.fused.before.get(name)
        self.fused = None

    # -- generation ------------------------------------------------------------------------------------

    def reorder_cache(self, key: str, index: list[int]) -> None:
        """Beam search: rows ``index`` of every KV-cache buffer of program ``key`` become its rows, in place. The
        index is checked against the cache first (as long as its batch, each entry below it): a wrong one is
        refused with nothing changed. One buffer's copy at a time is the only memory it takes."""
        caches = [b for name, b in self._program(key).module.named_buffers() if KV_CACHE.search(name)]
        if not caches:
            return  # a stage with no attention layer holds no cache
        batch = caches[0].shape[0] if caches[0].dim() else 0
        if any(b.dim() == 0 or b.shape[0] != batch for b in caches):
            raise StageError("bad_cache", f"the {key} program's KV-cache buffers do not share one batch dimension")
        outside = [i for i in index if not 0 <= i < batch]
        if len(index) != batch or outside:
            raise StageError(
                "bad_index",
                f"a cache reorder needs {batch} row indices, each in 0..{batch - 1}; got {len(index)}"
                + (f", {outside[0]} among them" if outside else ""),
            )
        rows = torch.tensor(index, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for buffer in caches:
                buffer.copy_(buffer.index_select(0, rows))

    # -- running micro-batches -------------------------------------------------------------------------

    async def run_step(self, cmd: RunStep) -> None:
        program = self._program(cmd.key)
        backward = cmd.backward != "none"
        for key in [k for k in self.stash if k[0] < cmd.step]:
            del self.stash[key]  # a "later" step the owner never back-propagated
            self.stash_bytes.pop(key, None)
        for link in {id(x): x for x in self.links.values()}.values():
            mailbox = getattr(link, "mailbox", None)
            if mailbox is not None:  # gradients a neighbour sent for outputs that needed none
                mailbox.drop_before(cmd.step, (Lane.BWD,))
        if cmd.backward == "fused":
            self._begin_fused(cmd.step)
        program.module.train(cmd.key == "train" and cmd.training)
        order = actions(cmd.schedule, self.stage, self.n_stages, cmd.micro_batches, cmd.backward == "fused")
        async with trio.open_nursery() as sends:
            self._sends = sends
            try:
                for kind, mb in order:
                    if kind == "F":
                        await self._forward(program, cmd, mb, keep=backward)
                    else:
                        await self._backward(program, cmd.step, mb, cmd)
            finally:
                self._sends = None
        self.steps_run += 1
        self.micro_batches_run += cmd.micro_batches

    async def run_backward(self, cmd: RunBackward) -> None:
        program = self._program(cmd.key)
        async with trio.open_nursery() as sends:
            self._sends = sends
            try:
                for mb in range(cmd.micro_batches):
                    await self._backward(program, cmd.step, mb, None, cmd.grad_to_user)
            finally:
                self._sends = None

    def _program(self, key: str) -> LoadedProgram:
        if key not in self.programs:
            raise StageError("no_program", f"no {key} program is loaded on this stage")
        return self.programs[key]

    def _link(self, role: str) -> Link:
        link = self.links.get(role)
        if link is None:
            raise StageError("no_link", f"stage {self.stage} has no {role} link")
        return link

    async def _forward(self, program: LoadedProgram, cmd: RunStep, mb: int, keep: bool) -> None:
        values = []
        for slot in program.inputs:
            lane = Lane.FWD if slot.source == "prev" else Lane.USER_IN
            tensor = await self._link(slot.source).recv(lane, cmd.step, mb, slot.idx)
            if keep and tensor.is_floating_point():
                tensor.requires_grad_(True)
            values.append(tensor.to(self.device))
        seed = seed_of(self.job, cmd.step, mb, self.stage)
        module = program.module

        def compute() -> list[Any]:
            charged = self._charge(module, values, (cmd.step, mb), keep)  # in a thread: a new shape's count is slow
            if alone and charged <= INLINE_BYTES:
                self._inline.add(small)
            # The stage's own seed, the process's random stream put back after: a stage in the owner's process
            # (private mode) must not move the user's (generate's sampling, the user's data order).
            devices = [self.device] if self.device.type != "cpu" else []
            try:
                with torch.random.fork_rng(devices, device_type=self.device.type), torch.set_grad_enabled(keep):
                    torch.manual_seed(seed)
                    out = module(*values)
            finally:
                self.running = 0
            return list(out) if isinstance(out, tuple) else [out]

        alone = not keep and cmd.micro_batches == 1
        small = (cmd.key, tuple(tuple(v.shape) for v in values))
        outputs = compute() if alone and small in self._inline else await trio.to_thread.run_sync(compute)
        if keep:
            self.stash[(cmd.step, mb)] = (values, outputs)
        wanted = set(cmd.to_user)
        for dest, out in zip(program.outputs, outputs, strict=True):
            if dest.dest == "user" and dest.idx not in wanted:
                continue
            if dest.dest == "user" and cmd.tail and isinstance(out, torch.Tensor) and out.dim() >= 2:
                out = out[:, -cmd.tail :]  # generation reads the last position's logits only
            lane = Lane.FWD if dest.dest == "next" else Lane.USER_OUT
            self._send(dest.dest, lane, cmd.step, mb, dest.idx, out)

    async def _backward(
        self, program: LoadedProgram, step: int, mb: int, fused: RunStep | None, grad_to_user: list[str] | None = None
    ) -> None:
        if (step, mb) not in self.stash:
            raise StageError("no_activations", f"no activations of step {step}, micro-batch {mb} are kept here")
        values, outputs = self.stash.pop((step, mb))
        self.stash_bytes.pop((step, mb), None)
        roots, grads = [], []
        for dest, out in zip(program.outputs, outputs, strict=True):
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                continue
            if dest.dest == "next":
                grad = from_marker(await self._link("next").recv(Lane.BWD, step, mb, dest.idx), out)
            elif fused is not None:
                grad = torch.full_like(out, fused.loss_scale) if dest.idx == fused.loss_output else None
            else:
                grad = from_marker(await self._link("user").recv(Lane.OUT_GRAD, step, mb, dest.idx), out)
            if grad is not None:
                roots.append(out)
                grads.append(grad.to(out.device))
        if roots:
            await trio.to_thread.run_sync(lambda: torch.autograd.backward(roots, grads))
        wanted_by_user = set(fused.grad_to_user if fused is not None else grad_to_user or [])
        for slot, value in zip(program.inputs, values, strict=True):
            if not value.is_floating_point() or (slot.source == "user" and slot.name not in wanted_by_user):
                continue
            lane = Lane.BWD if slot.source == "prev" else Lane.USER_GRAD
            grad = value.grad if value.grad is not None else NONE_MARKER
            self._send(slot.source, lane, step, mb, slot.idx, grad)

    def _charge(self, module: StageModule, values: list[torch.Tensor], key: tuple[int, int], keep: bool) -> int:
        """Refuse a forward that would take the stage past its reservation: what it allocates at these input
        shapes (counted on meta, IRError past the program's bound), twice when kept for backward (its values
        stay, and backward makes a gradient of each), plus what is held and the frames buffered on its links.
        Returns what the forward is charged."""
        forward = forward_bytes(module.memory_at([list(v.shape) for v in values]), train=keep)
        held = self.needed(reserve=False) + self._buffered()
        self._require(held + forward, f"micro-batch {key[1]} of step {key[0]}")
        if keep:
            self.stash_bytes[key] = forward
        else:
            self.running = forward
        return forward

    def _buffered(self) -> int:
        return sum(link.mailbox.buffered_bytes for link in {id(x): x for x in self.links.values()}.values())

    def frame_room(self, nbytes: int) -> int:
        """Bytes frames arriving on this stage's links may still take, after growing the reservation to fit a
        frame of ``nbytes`` where the worker has room (a program larger than was declared arrives this way): the
        reservation less what the stage holds, the forward running and the frames already buffered. A link
        refuses a frame past it (Mailbox.room)."""
        used = self.needed(reserve=False) + self.running + self._buffered()
        self.peak_charged = max(self.peak_charged, used + nbytes)
        held = self.reservation.held()
        if used + nbytes > held:
            held = self.reservation.grow(used + nbytes)
        return held - used

    def _send(self, role: str, lane: Lane, step: int, mb: int, idx: int, tensor: torch.Tensor) -> None:
        assert self._sends is not None
        self._sends.start_soon(self._link(role).send, lane, step, mb, idx, tensor.detach().cpu())


@dataclass(frozen=True)
class _Held:
    """What a set of loaded programs holds: their weights' and buffers' storages (shared ones once), the training
    parameters' count and bytes (gradients and optimizer state are sized by them), and the largest forward's
    activations at the declared maximum shapes."""

    storage_bytes: int
    params: int
    param_bytes: int
    activations: int


def _walk(programs: dict[str, StageModule]) -> _Held:
    storages: dict[int, int] = {}
    for module in programs.values():
        for t in [*module.parameters(), *module.buffers()]:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    params = list(programs["train"].parameters()) if "train" in programs else []
    activations = max((forward_bytes(m.memory_bound, train=k == "train") for k, m in programs.items()), default=0)
    return _Held(sum(storages.values()), len(params), sum(p.numel() * p.element_size() for p in params), activations)


def _hyper_values(hyper: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items()}


def _share_state(source: torch.nn.Module, target: torch.nn.Module, prefix: str = "") -> None:
    """Point ``target``'s parameters and buffers at ``source``'s tensors of the same names (``target``'s
    names being ``prefix`` + ``source``'s)."""
    src_params = {prefix + n: p for n, p in source.named_parameters()}
    src_buffers = {prefix + n: b for n, b in source.named_buffers()}
    for name, _ in list(target.named_parameters()):
        if name not in src_params:
            raise StageError("cannot_share", f"the eval program needs {name!r}, which this stage does not hold")
        owner, leaf = _owner(target, name)
        owner._parameters[leaf] = src_params[name]
    for name, _ in list(target.named_buffers()):
        if name in src_buffers:
            owner, leaf = _owner(target, name)
            owner._buffers[leaf] = src_buffers[name]


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf
