"""``tensorlink.offload(model)``: the user's model, its stages running on workers, used as before.

    with tensorlink.LocalSwarm(workers=2) as swarm:
        model = tensorlink.offload(model, network=swarm, micro_batches=8, schedule="1f1b")
        opt = model.optimizer(torch.optim.AdamW, lr=3e-4)
        loss = model(input_ids=x, labels=y).loss
        loss.backward(); opt.step(); opt.zero_grad()

The pipeline is set up on the first forward (the capture needs real input shapes). The returned module
holds no weights of its own: ``state_dict()`` fetches them from the workers into the original module, and
``generate()`` is Hugging Face's own, with only the model calls on the workers (pipeline/generation.py).
"""

from __future__ import annotations

import builtins
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NoReturn

import torch
import torch.utils._pytree as pytree

from tensorlink.ir import CaptureError, StageProgram
from tensorlink.pipeline.client import Client
from tensorlink.pipeline.driver import Backward, Pipeline, Settings, StepResult, StepSpec
from tensorlink.pipeline.job import PipelineError
from tensorlink.pipeline.optimizer import RemoteOptimizer
from tensorlink.pipeline.programs import Loaded, Program, capture_program
from tensorlink.pipeline.remote import OffloadError, Remote
from tensorlink.stage.schedule import SCHEDULES
from tensorlink.wire.stage import ProgramKey

log = logging.getLogger(__name__)


def offload(
    model: torch.nn.Module,
    network: Any,
    *,
    workers: int | None = None,
    micro_batches: int = 1,
    schedule: Literal["gpipe", "1f1b"] = "1f1b",
    private: bool = False,
    outputs: Literal["all", "loss"] = "all",
    max_seq_len: int | None = None,
) -> OffloadedModel:
    """Spread ``model`` over workers of ``network`` (a LocalSwarm, or a list of validator multiaddrs).

    ``outputs="loss"`` returns only the scalar loss the model computes (HF models given labels): the
    workers then run forward and backward together (1F1B) and nothing else travels back. ``private``
    keeps the first and the last stage on this machine, so inputs and labels never leave it.
    ``max_seq_len`` bounds dim 1 of the inputs (default: the HF config's position limit)."""
    if not isinstance(model, torch.nn.Module):
        raise OffloadError(f"offload() takes a torch.nn.Module, not a {type(model).__name__}")
    if schedule not in SCHEDULES:
        raise OffloadError(f"schedule {schedule!r} is not known; use one of {', '.join(SCHEDULES)}")
    if micro_batches < 1:
        raise OffloadError("micro_batches must be at least 1")
    if outputs not in ("all", "loss"):
        raise OffloadError('outputs must be "all" or "loss"')
    addrs, validator_ids, available = _network(network)
    n_workers = workers if workers is not None else available
    if not n_workers or n_workers < 1:
        raise OffloadError("say how many workers to use: offload(..., workers=N)")
    config = getattr(model, "config", None)
    if max_seq_len is None and config is not None:
        max_seq_len = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    settings = Settings(
        workers=n_workers, micro_batches=micro_batches, schedule=schedule, private=private, max_seq_len=max_seq_len
    )
    remote = Remote(functools.partial(_connect, addrs, validator_ids), settings, fused=outputs == "loss")
    return OffloadedModel(model, remote, outputs=outputs)


def _connect(addrs: list[str], validator_ids: list[str]) -> tuple[Client, str]:
    """A started client connected to the first validator it reaches, and that validator's peer id."""
    client = Client().start()
    reached = client.call(client.connect, addrs)
    validator = next((v for v in validator_ids if v in reached), None)
    if validator is None:
        client.close()
        raise OffloadError(f"no validator reachable at {', '.join(addrs) or '(no address given)'}")
    return client, validator


def _network(network: Any) -> tuple[list[str], list[str], int | None]:
    """(validator addresses, their peer ids, workers known) from a LocalSwarm or a list of addresses."""
    if hasattr(network, "validator_addrs"):
        return list(network.validator_addrs), list(network.validator_peer_ids), len(network.workers)
    if isinstance(network, str):
        network = [network]
    if isinstance(network, Sequence) and network and all(isinstance(a, str) for a in network):
        ids = [a.rsplit("/p2p/", 1)[-1] for a in network if "/p2p/" in a]
        if len(ids) != len(network):
            raise OffloadError(
                "validator addresses need /p2p/<peer id> at the end (the validator's start log shows it)"
            )
        return list(network), ids, None
    raise OffloadError("network= takes a tensorlink.LocalSwarm or a list of validator multiaddrs")


class _Pipeline(torch.autograd.Function):
    """Autograd across the remote boundary: forward runs a step, backward commits (fused) or
    back-propagates (later) it."""

    @staticmethod
    def forward(
        ctx: Any,
        model: OffloadedModel,
        result: StepResult,
        inputs: list[torch.Tensor],
        anchor: torch.Tensor,
        *grad_inputs: torch.Tensor,
    ) -> Any:
        ctx.model, ctx.result, ctx.inputs = model, result, inputs
        outs = tuple(result.outputs[i] for i in sorted(result.outputs))
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        model: OffloadedModel = ctx.model
        result: StepResult = ctx.result
        by_output = dict(zip(sorted(result.outputs), grads, strict=True))
        input_grads = model._backward(result, by_output, ctx.inputs)
        return (None, None, None, None, *[input_grads.get(n) for n in result.spec.grad_to_user])


Signature = tuple[int, tuple[str, ...], tuple[tuple[torch.dtype, int], ...]]


class OffloadedModel(torch.nn.Module):
    """The offloaded model. Call it like the original; see ``offload``.

    Like a local module, ``train()``/``eval()`` and ``torch.no_grad()`` decide what a call runs: a training
    forward the ``train`` program; an evaluation forward without gradients the ``eval`` program (captured on
    first use; with gradients in a training job, the train program in eval mode, so they flow as locally);
    ``generate()`` the ``generate`` program. The pipeline opens on the first call, for what it needs: a job
    that only evaluates or generates reserves no gradient or optimizer memory, and is opened again with
    it on the first training forward (its weights are still the model's own).

    Where code expects the local module: plain attributes (HF's ``config``...) read through to it, ``device``
    is this machine's CPU, ``num_parameters()`` and ``dtype`` are its own; ``load_state_dict`` and a cast to
    another dtype change its weights and set the pipeline up again from them; what cannot reach the workers
    (``parameters()`` for torch's optimizers, another device, ``torch.autocast``) is refused, never ignored."""

    local: torch.nn.Module  # the user's module, whose weights fetch() fills

    def __init__(self, module: torch.nn.Module, remote: Remote, *, outputs: str) -> None:
        super().__init__()
        object.__setattr__(self, "local", module)  # not a submodule: its weights live on the workers
        self.remote = remote
        self.outputs = outputs
        self.train(module.training)
        self._signatures: dict[str, Signature] = {}  # per program: the inputs it was captured for
        self._anchor = torch.zeros((), requires_grad=True)
        self._generation_batch: int | None = None  # the batch the workers' KV caches are sized for

    @property
    def client(self) -> Client:
        """The client of the current job (each job has its own)."""
        return self.remote.client

    @property
    def pipeline(self) -> Pipeline:
        """The open pipeline (tensorlink.pipeline.driver.Pipeline); an error if none is."""
        return self.remote.require()

    # -- like the local module ------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        """Read-only attributes of the local module that are plain values (HF's ``config``,
        ``generation_config``, ``name_or_path``, ``main_input_name``, ...). Not its tensors, submodules or
        methods: those would show or change weights that live on the workers."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            local = self.__dict__.get("local")
            if local is None or name.startswith("__"):
                raise
        value = getattr(local, name)
        if isinstance(value, torch.Tensor | torch.nn.Module) or callable(value):
            raise AttributeError(
                f"{name!r} of the {type(local).__name__} is not available on the offloaded model: its weights, "
                "submodules and methods stay with the module the workers run (model.fetch() returns that module "
                "with the workers' current weights)"
            )
        return value

    @property
    def device(self) -> torch.device:
        """Where inputs go and outputs come back: this machine's CPU (the workers pick their own devices)."""
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's weights (on the workers as here; see ``to``)."""
        return _float_dtype(self.local)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The local module's count (HF's num_parameters where it has one); the workers hold the same weights."""
        count = getattr(self.local, "num_parameters", None)
        if callable(count):
            return int(count(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings))
        embedding = torch.nn.Embedding
        skip = {id(m.weight) for m in self.local.modules() if isinstance(m, embedding)} if exclude_embeddings else set()
        params = self.local.parameters()
        return sum(p.numel() for p in params if (p.requires_grad or not only_trainable) and id(p) not in skip)

    def can_generate(self) -> bool:
        can = getattr(self.local, "can_generate", None)
        return bool(can()) if callable(can) else False

    def parameters(self, recurse: bool = True) -> NoReturn:
        """Refused (see PARAMETERS): an empty list would let clip_grad_norm_ and optimizers do nothing silently."""
        raise OffloadError(PARAMETERS)

    def named_parameters(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise OffloadError(PARAMETERS)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The workers' gradients, as the remote optimizer's zero_grad."""
        if self.remote.trains:
            self.remote.call(lambda p: p.zero_grad())

    def to(self, *args: Any, **kwargs: Any) -> OffloadedModel:
        """A floating dtype takes effect on the workers (see ``_cast``); this machine's CPU is the only device."""
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type != "cpu":
            raise OffloadError(DEVICE)
        if memory_format is not None:
            raise OffloadError("memory_format cannot be changed on an offloaded model; set it before offload()")
        if dtype is not None:
            self._cast(dtype)
        return self

    def half(self) -> OffloadedModel:
        return self.to(torch.float16)

    def bfloat16(self) -> OffloadedModel:
        return self.to(torch.bfloat16)

    def float(self) -> OffloadedModel:
        return self.to(torch.float32)

    def double(self) -> OffloadedModel:
        return self.to(torch.float64)

    def cuda(self, device: Any = None) -> NoReturn:
        raise OffloadError(DEVICE)

    def cpu(self) -> OffloadedModel:
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> NoReturn:
        """Every other conversion (``type``, ``xpu``, ``share_memory``, ...) would touch no weight: refused."""
        raise OffloadError(
            "this conversion cannot reach the weights, which live on the workers; convert the module before "
            "offload() (module.<conversion>(); offload(module, ...)), or use model.to(dtype)"
        )

    def _cast(self, dtype: torch.dtype) -> None:
        """Cast the weights to ``dtype``: the local module (with the workers' current weights) is cast and the
        next call sets the pipeline up again from it; a no-op when it already has that dtype."""
        if not dtype.is_floating_point:
            raise OffloadError(f"a model's weights can be cast to a floating dtype only, not {dtype}")
        if _float_dtype(self.local) == dtype:
            return
        self.fetch()
        self.local.to(dtype)
        self._restart()

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """torch's load_state_dict on the local module (its result and errors: missing and unexpected keys),
        whose weights then go to the workers: before the first call with it, else by setting the pipeline up
        again at the next call. Keys not given keep the workers' current values (fetched first)."""
        self.fetch()
        try:
            return self.local.load_state_dict(state_dict, strict=strict, assign=assign)
        finally:  # torch copies what matches before it raises for missing or unexpected keys
            self._restart()

    def _restart(self) -> None:
        """The local module's weights changed: the workers' are stale. The pipeline is closed, to be opened again
        from the module at the next call (the remote optimizer is made there again, with fresh state)."""
        if self.remote.pipeline is None:
            return
        log.info("the model's weights changed here: the pipeline is set up again at the next call")
        self.remote.restart()
        self._signatures.clear()
        self._generation_batch = None

    # -- the model's call -----------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        _refuse_autocast()
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        for name, value in [*enumerate(args), *kwargs.items()]:
            if not isinstance(value, torch.Tensor):
                raise OffloadError(
                    f"input {name!r} is a {type(value).__name__}; an offloaded model takes tensors only "
                    "(settings such as use_cache belong in the model's config)"
                )
        inputs = [*args, *kwargs.values()]
        wants_grad = torch.is_grad_enabled()
        key: ProgramKey = "train" if self.training or (wants_grad and self.remote.trains) else "eval"
        loaded = self._program(key, args, kwargs)
        n_micro = min(self.remote.settings.micro_batches, *(t.shape[0] for t in inputs if t.dim() > 0))
        _check_shapes(loaded.whole, loaded.split.user_inputs, inputs, n_micro)
        spec = self._spec(key, loaded, inputs, n_micro, wants_grad)
        result = self.remote.call(lambda p: p.run(spec, inputs))
        if spec.backward is not Backward.NONE:
            grad_inputs = [t for t in inputs if t.requires_grad]
            values = _Pipeline.apply(self, result, inputs, self._anchor, *grad_inputs)
            result.outputs = dict(zip(sorted(result.outputs), values, strict=True))
        return _structure(loaded, result.outputs)

    def _spec(
        self, key: ProgramKey, loaded: Loaded, inputs: list[torch.Tensor], n_micro: int, wants_grad: bool
    ) -> StepSpec:
        """What one forward of program ``key`` runs: its outputs, and its backward (with gradients wanted, of a
        training program: fused into the step for outputs="loss", else later from the outputs' gradients)."""
        loss_index = _loss_output(loaded)
        if self.outputs == "loss":
            if loss_index is None:
                raise OffloadError('outputs="loss" needs a model that returns a scalar loss (give it labels)')
            to_user: tuple[int, ...] = (loss_index,)
        else:
            to_user = tuple(range(len(loaded.split.model_outputs)))
        backward = Backward.NONE
        if wants_grad and key == "train":
            backward = Backward.FUSED if self.outputs == "loss" else Backward.LATER
        grad_names = () if backward is Backward.NONE else tuple(
            name for name, t in zip(loaded.split.user_inputs, inputs, strict=True) if t.requires_grad
        )  # fmt: skip
        return StepSpec(
            key=key,
            backward=backward,
            training=self.training,
            loss_output=loss_index,
            to_user=to_user,
            grad_to_user=grad_names,
            micro_batches=n_micro,
        )

    def _program(self, key: ProgramKey, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Loaded:
        """Program ``key`` loaded on the stages for inputs like these: captured from this call and loaded (the
        pipeline opened for it) on first use, and an eval program again for other inputs (names, dtypes, ranks);
        a job that never trained opened again for a training one."""
        signature = (len(args), tuple(kwargs), tuple((t.dtype, t.dim()) for t in [*args, *kwargs.values()]))
        if self.remote.failed is not None:
            self.remote.require()
        pipeline = self.remote.pipeline
        if pipeline is not None and key in pipeline.programs:
            if signature == self._signatures[key]:
                return pipeline.programs[key]
            if key == "train":  # loading it again would reset the trained weights
                raise OffloadError(
                    "this offloaded model was set up to train on other inputs (names, dtypes or ranks); call it "
                    "the same way every time in training, or offload a second copy for the other use"
                )
        program = self._capture(key, args, kwargs)
        if pipeline is None or (key == "train" and not pipeline.trains):
            pipeline = self.remote.open(program, key)
            self._signatures.clear()
            self._generation_batch = None
        else:
            self.remote.load(key, program)
        self._signatures[key] = signature
        return pipeline.programs[key]

    def _capture(self, key: ProgramKey, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Program:
        """Capture program ``key`` on this call's first micro-batch; errors before any work."""
        n = min(self.remote.settings.micro_batches, *(t.shape[0] for t in [*args, *kwargs.values()] if t.dim() > 0))
        first = [torch.tensor_split(t, n)[0] if t.dim() > 0 else t for t in args]
        first_kw = {k: torch.tensor_split(t, n)[0] if t.dim() > 0 else t for k, t in kwargs.items()}
        example = _example(first, first_kw)
        try:
            return capture_program(
                self.local, *example, train=key == "train", max_seq_len=self.remote.settings.max_seq_len
            )
        except CaptureError as exc:
            raise OffloadError(f"the model cannot be captured for the workers: {exc}") from None

    def _backward(
        self, result: StepResult, grads: dict[int, torch.Tensor | None], inputs: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if result.spec.backward is Backward.FUSED:
            (loss_index,) = result.outputs
            grad = grads[loss_index]
            scale = float(grad) if grad is not None else 0.0
            self.remote.call(lambda p: p.commit(result.step, scale))
            return {n: g * scale for n, g in result.input_grads.items()}
        return self.remote.call(lambda p: p.backward(result, grads, inputs))

    # -- training helpers --------------------------------------------------------------------------------

    def optimizer(self, cls: type[torch.optim.Optimizer] | str, **hyper: Any) -> RemoteOptimizer:
        """An optimizer that runs on every worker for that worker's parameters (``cls`` must be one of
        torch's optimizers; see tensorlink.stage.runtime.OPTIMIZERS)."""
        return RemoteOptimizer(self.remote, cls, **hyper)

    def clip_grad_norm_(self, max_norm: builtins.float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ across every stage; returns the total norm before clipping."""
        if not self.remote.trains:
            self.remote.require()
            raise OffloadError("no training forward has run yet: there are no gradients to clip")
        return torch.tensor(self.remote.call(lambda p: p.clip_grad_norm(float(max_norm))))

    # -- weights --------------------------------------------------------------------------------------------

    def fetch(self) -> torch.nn.Module:
        """Copy the workers' current weights into the original module and return it (only training changes
        them: before any, the module's own are current)."""
        if not self.remote.trains:
            return self.local
        state = self.remote.call(lambda p: p.state())
        own = dict(self.local.named_parameters(remove_duplicate=False)) | dict(self.local.named_buffers())
        groups = self.pipeline.programs["train"].whole.tie_groups
        ties: dict[str, str] = {alias: group[0] for group in groups for alias in group}
        with torch.no_grad():
            for name, target in own.items():
                source = state.get(name, state.get(ties.get(name, name)))
                if source is not None:
                    target.copy_(source)
        return self.local

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The trained weights, fetched from the workers, under the original module's names."""
        return self.fetch().state_dict(*args, **kwargs)

    def save_pretrained(self, path: str, **kwargs: Any) -> None:
        """For HF models: fetch the weights and save with the model's own save_pretrained."""
        save = getattr(self.local, "save_pretrained", None)
        if save is None:
            raise OffloadError(
                "save_pretrained exists for Hugging Face models only; use torch.save(model.state_dict())"
            )
        self.fetch()
        save(path, **kwargs)

    # -- generation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Hugging Face's own ``generate`` with every argument it takes (see tensorlink.pipeline.generation for
        what is refused), run here; only the model calls go to the workers, which keep the KV cache of their own
        layers (max_seq_len positions) and hold the trained weights. Before any forward call the pipeline opens
        for generation alone."""
        _refuse_autocast()
        limit = self.remote.settings.max_seq_len
        if limit is None:
            raise OffloadError("generate() needs max_seq_len (offload(..., max_seq_len=N)) to size the KV cache")
        if self.remote.failed is not None:
            self.remote.require()
        from tensorlink.pipeline import generation  # transformers: the [hf] extra

        kwargs.setdefault("use_cache", True)  # the workers keep a KV cache even where the config says no (training)
        return generation.generate(self.local, _Decoder(self, limit), input_ids, attention_mask, **kwargs)

    def _load_generation(self, batch: int, limit: int) -> None:
        """The generation program for ``batch`` rows on the stages (the KV cache is sized for one batch: captured
        again for another); the pipeline opened for it if none is."""
        from tensorlink.pipeline.generation import capture_generation

        pipeline = self.remote.pipeline
        if self._generation_batch == batch and pipeline is not None and "generate" in pipeline.programs:
            return
        try:
            captured = capture_generation(self.local, batch, limit)
        except CaptureError as exc:
            raise OffloadError(f"generate() cannot capture this model for the workers: {exc}") from None
        program = Program(captured.whole, None, captured.prefix)
        if pipeline is None:
            self.remote.open(program, "generate")
            self._signatures.clear()
        else:
            self.remote.load("generate", program)
        self._generation_batch = batch

    def close(self) -> None:
        """Release the workers and stop the client."""
        self.remote.close()

    def stages(self) -> list[dict[str, Any]]:
        """Where each stage runs and what it holds (for logs and the demo); empty before the pipeline opens."""
        pipeline = self.remote.pipeline
        if pipeline is None:
            return []
        sizes = {name: p.numel() for name, p in self.local.named_parameters(remove_duplicate=False)}
        loaded = pipeline.programs.get("train") or next(iter(pipeline.programs.values()))
        prefix = loaded.program.prefix
        held = {k: [name.removeprefix(prefix) for name in part.params] for k, part in enumerate(loaded.split.parts)}
        return [
            {
                "stage": ref.index,
                "where": ref.peer or "this machine",
                "parameters": sum(sizes.get(p, 0) for p in held.get(ref.index, [])),
                "params": held.get(ref.index, []),
            }
            for ref in pipeline.job.stages
        ]


class _Decoder:
    """tensorlink.pipeline.generation's Decoder on the model's pipeline: a step is a run of the "generate"
    program that brings back the last position's logits; a beam reorder goes to every stage's KV cache."""

    def __init__(self, model: OffloadedModel, max_len: int) -> None:
        self.model = model
        self.max_len = max_len

    def prepare(self, batch: int) -> None:
        self.model._load_generation(batch, self.max_len)

    def step(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        names = self.model.pipeline.programs["generate"].split.user_inputs
        result = self.model.remote.call(Pipeline.run, GENERATE_STEP, [inputs[name] for name in names])
        return result.outputs[0][:, -1]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        index = [int(i) for i in beam_idx.tolist()]
        self.model.remote.call(lambda p: p.reorder_cache("generate", index))


GENERATE_STEP = StepSpec(key="generate", tail=1)
PARAMETERS = (
    "an offloaded model's parameters live on the workers, so torch's optimizers and utilities cannot take them: "
    "make the optimizer with model.optimizer(torch.optim.AdamW, lr=...) (it steps on the workers; LR schedulers "
    "accept it), clip with model.clip_grad_norm_(max_norm), count with model.num_parameters(), and read the "
    "weights with model.state_dict()"
)
DEVICE = (
    "an offloaded model's inputs and outputs stay on this machine's CPU (model.device), and each worker runs its "
    "stages on its own device: leave the model and its inputs on the CPU"
)


def _refuse_autocast() -> None:
    """torch.autocast changes how ops run in this process; the workers' programs never see it."""
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            raise OffloadError(
                f"torch.autocast({device!r}) does not reach the workers, which run the model in its own dtype: "
                "cast the model instead (model.to(torch.bfloat16), before or after offload()) and call it "
                "outside autocast"
            )


def _float_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the module's first floating weight (HF's ``dtype``); the default dtype if it has none."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def _example(args: list[torch.Tensor], kwargs: dict[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Contiguous examples of at least 2 rows: torch.export specialises a batch of 1 away, and a sliced
    input's strides would become guards on the sequence length."""

    def widen(t: torch.Tensor) -> torch.Tensor:
        return (t.repeat(2, *([1] * (t.dim() - 1))) if t.dim() > 0 and t.shape[0] == 1 else t).contiguous()

    return tuple(widen(t) for t in args), {k: widen(t) for k, t in kwargs.items()}


# Workers reserve memory for the largest micro-batch the first call had (driver.capture): a larger one later
# would not fit what they reserved.
WIDER_BATCH = (
    " (the first call sets the largest micro-batch, which the workers reserved memory for: make the first call "
    "with your largest batch, ask for more micro_batches in offload(), or offload a second copy for larger batches)"
)


def _check_shapes(program: StageProgram, names: Sequence[str], inputs: Sequence[torch.Tensor], n_micro: int) -> None:
    """Refuse, before anything is sent, inputs the stages would refuse mid-step (the capture fixed each
    dim or its range: e.g. the sequence length up to max_seq_len)."""
    sig = program.program.signature
    for name, spec, tensor in zip(names, sig.inputs, inputs, strict=True):
        shape = list(tensor.shape)
        if shape and n_micro > 1:
            shape[0] = -(-shape[0] // n_micro)  # the largest micro-batch
        if len(shape) != len(spec.shape):
            raise OffloadError(f"input {name!r} has {len(shape)} dims; the model was captured with {len(spec.shape)}")
        for d, (size, dim) in enumerate(zip(shape, spec.shape, strict=True)):
            low, high = sig.symbols[dim] if isinstance(dim, str) else (dim, dim)
            if not low <= size <= high:
                raise OffloadError(
                    f"input {name!r} dim {d} is {size} per micro-batch; the model was captured for {low}..{high}"
                    + (" (raise max_seq_len in offload())" if d == 1 else "")
                    + (WIDER_BATCH if d == 0 else "")
                )


def _loss_output(program: Loaded) -> int | None:
    sig = program.whole.program.signature
    if sig.output == "dict" and "loss" in sig.output_keys:
        return sig.output_keys.index("loss")
    if sig.output == "tensor":
        return 0
    return None


def _structure(program: Loaded, outputs: dict[int, torch.Tensor]) -> Any:
    """The model's own output structure (e.g. an HF ModelOutput); outputs not fetched are None."""
    sig = program.whole.program.signature
    n = len(program.split.model_outputs)
    leaves = [outputs.get(i) for i in range(n)]
    if program.out_spec is not None:
        return pytree.tree_unflatten(leaves, program.out_spec)
    if sig.output == "tensor":
        return leaves[0]
    if sig.output == "tuple":
        return tuple(leaves)
    return dict(zip(sig.output_keys, leaves, strict=True))


__all__ = ["OffloadError", "OffloadedModel", "PipelineError", "offload"]
