"""What a stage is charged on its worker, in one place.

The worker charges its stages with these (tensorlink.stage.runtime.StageRuntime.needed); the owner declares
each unit's share with them and the validator adds the shares up per stage (tensorlink.validator.partition), so
that a placement reserves what the worker will charge: no more (a tightly packed worker refusing an honest
load), no less (a validator under-reserving).
"""

from __future__ import annotations

STEP_BYTES = 64  # per parameter, an optimizer's 0-dim step tensor and its header, besides its state copies
TRAIN_FACTOR = 2  # a training forward's values stay for backward, which makes a gradient of each


def optimizer_bytes(param_bytes: int, n_params: int, copies: int) -> int:
    """What an optimizer keeping ``copies`` parameter-sized tensors per parameter holds."""
    return copies * param_bytes + (STEP_BYTES * n_params if copies else 0)


def training_bytes(param_bytes: int, n_params: int, copies: int) -> int:
    """Parameters with their gradients and optimizer state."""
    return 2 * param_bytes + optimizer_bytes(param_bytes, n_params, copies)


def forward_bytes(bound: int, *, train: bool, kept: int = 1) -> int:
    """What ``kept`` forwards of a program are charged, each counted at ``bound`` bytes (tensorlink.ir.memory)."""
    return bound * (TRAIN_FACTOR if train else 1) * kept
