"""RemoteOptimizer: a torch optimizer whose steps run on the workers, each for its own parameters.

It is a real ``torch.optim.Optimizer`` (LR schedulers accept nothing else) with one parameter group
holding the hyper-parameters; its only parameter is a placeholder, since the weights live on the
workers. Each ``step()`` sends the group's current values, so a scheduler's changes take effect.
Only torch's own optimizers may be named (no user code reaches a worker).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tensorlink.stage.runtime import HYPER_KEYS, OPTIMIZERS, StageError, check_hyper

if TYPE_CHECKING:
    from tensorlink.pipeline.offload import OffloadedModel


class RemoteOptimizer(torch.optim.Optimizer):
    def __init__(self, model: OffloadedModel, cls: type[torch.optim.Optimizer] | str, **hyper: Any) -> None:
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
        self.model = model
        super().__init__([torch.zeros(0, requires_grad=True)], dict(hyper))

    def hyper(self) -> dict[str, Any]:
        """The group's current hyper-parameters, as the workers take them."""
        group = self.param_groups[0]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k in HYPER_KEYS and _plain(v)}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if closure is not None:
            raise TypeError("closures are not supported: the loss is computed on the workers")
        self.model._require_started()
        self.model.client.call(self.model.driver.optimizer_step, self.hyper())
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.model._signature is not None:
            self.model.client.call(self.model.driver.zero_grad)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The hyper-parameters here and every worker's optimizer state, by parameter name."""
        state = self.model.client.call(self.model.driver.optimizer_state) if self.model._signature else {}
        return {"name": self.name, "param_groups": [self.hyper()], "state": state}


def _plain(value: Any) -> bool:
    if isinstance(value, bool | int | float):
        return True
    return isinstance(value, tuple | list) and all(isinstance(v, int | float) for v in value)
