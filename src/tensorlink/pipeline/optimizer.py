"""RemoteOptimizer: a torch optimizer whose steps run on the workers, each for its own parameters.

It is a real ``torch.optim.Optimizer`` (LR schedulers accept nothing else) with one parameter group
holding the hyper-parameters; its only parameter is a placeholder, since the weights live on the
workers. The group starts with the optimizer's own defaults, as a local one's does, and each ``step()`` sends
the group's current values, so a scheduler's changes (lr, betas, momentum) take effect.
Only torch's own optimizers may be named (no user code reaches a worker). It works on the model's
pipeline (``Remote``): made on the workers when a training job opens, or at once if one is open.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from tensorlink.pipeline.remote import OffloadError, Remote
from tensorlink.stage.runtime import HYPER_KEYS, OPTIMIZERS, StageError, check_hyper


class RemoteOptimizer(torch.optim.Optimizer):
    def __init__(self, remote: Remote, cls: type[torch.optim.Optimizer] | str, **hyper: Any) -> None:
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", repr(cls))
        if not isinstance(cls, str) and OPTIMIZERS.get(name) is not cls:
            raise TypeError(
                f"{name} is not one of torch's optimizers that workers run: {', '.join(sorted(OPTIMIZERS))}"
            )
        try:
            check_hyper(name, hyper)
        except StageError as exc:
            raise TypeError(str(exc)) from None
        for key, value in hyper.items():
            if not _plain(value):
                raise TypeError(f"hyper-parameter {key}={value!r}: numbers, booleans or tuples of numbers only")
        self.name = name
        self.remote = remote
        super().__init__([torch.zeros(0, requires_grad=True)], _defaults(OPTIMIZERS[name]) | hyper)
        remote.optimizer = (name, self.hyper())
        if remote.trains:
            current = self.hyper()
            remote.call(lambda p: p.make_optimizer(name, current))

    def hyper(self) -> dict[str, Any]:
        """The group's current hyper-parameters, as the workers take them."""
        group = self.param_groups[0]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k in HYPER_KEYS and _plain(v)}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if closure is not None:
            raise TypeError("closures are not supported: the loss is computed on the workers")
        if not self.remote.trains:
            self.remote.require()  # a failed pipeline says so
            raise OffloadError("no training forward has run yet: there are no gradients to step with")
        hyper = self.hyper()
        self.remote.call(lambda p: p.optimizer_step(hyper))
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.remote.trains:
            self.remote.call(lambda p: p.zero_grad())

    def state_dict(self) -> dict[str, Any]:
        """The hyper-parameters here and every worker's optimizer state, by parameter name."""
        state = self.remote.call(lambda p: p.optimizer_state()) if self.remote.trains else {}
        return {"name": self.name, "param_groups": [self.hyper()], "state": state}


def _defaults(cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """The optimizer's own defaults for the hyper-parameters workers take: schedulers read them from the group
    as from a local optimizer's (OneCycleLR cycles AdamW's betas, which the user seldom gives)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.name in HYPER_KEYS and _plain(p.default)}


def _plain(value: Any) -> bool:
    if isinstance(value, bool | int | float):
        return True
    return isinstance(value, tuple | list) and all(isinstance(v, int | float) for v in value)
