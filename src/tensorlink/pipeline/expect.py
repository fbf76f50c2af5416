"""What the owner expects a worker to send back, from the capture's own metadata.

The owner captured the whole program, so it knows every value's dtype and shape: fixed sizes, symbols
bound by the inputs it sent, and size expressions bounded by the ranges seen at capture. A tensor from a
worker is checked against that from its frame's header, before its payload is read (exact dtype, exact
rank, every dimension), so a worker cannot make the owner reshape, crash on, buffer or even allocate for
something it never asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tensorlink.ir import StageProgram
from tensorlink.stage.links import Announced, Check
from tensorlink.wire.dtypes import TORCH_BY_NAME

MARKER_SHAPE = (0,)  # links.NONE_MARKER: a gradient that does not exist


@dataclass(frozen=True)
class Spec:
    """One expected tensor: dtype and dims (an int, a symbol of the inputs, or a size expression)."""

    dtype: torch.dtype
    shape: tuple[int | str, ...]


def value_spec(program: StageProgram, name: str) -> Spec:
    """The capture's record of value ``name`` (a tensor the split sends between stages or to the owner)."""
    meta = program.program.values.get(name)
    if meta is None or meta.dtype is None:
        raise ValueError(f"the capture has no tensor metadata for {name!r}")
    return Spec(TORCH_BY_NAME[meta.dtype], tuple(meta.shape))


def spec_like(tensor: torch.Tensor) -> Spec:
    """A tensor of exactly this one's dtype and shape (the gradient of an input the owner sent)."""
    return Spec(tensor.dtype, tuple(tensor.shape))


def checker(
    spec: Spec,
    what: str,
    sizes: dict[str, int],
    ranges: Mapping[str, list[int]],
    *,
    tail: int = 0,
    marker: bool = False,
) -> Check:
    """A check for one tensor. ``sizes``: the symbols the inputs bound, shared by every check of one
    micro-batch so an expression is bound once and then held to it; ``ranges``: the capture's [min, max]
    of each expression; ``tail``: dim 1 cut to its last ``tail`` positions (generation); ``marker``: the
    empty "no gradient" tensor is allowed too."""

    def check(frame: Announced) -> str | None:
        if marker and frame.shape == MARKER_SHAPE:
            return None
        if frame.dtype != spec.dtype or len(frame.shape) != len(spec.shape):
            return f"{what} is {_show(frame.dtype, frame.shape)}, expected {_show(spec.dtype, spec.shape)}"
        for axis, (size, dim) in enumerate(zip(frame.shape, spec.shape, strict=True)):
            wrong = _dim_error(int(size), dim, sizes, ranges, tail if axis == 1 else 0)
            if wrong is not None:
                got, want = _show(frame.dtype, frame.shape), _show(spec.dtype, spec.shape)
                return f"{what} is {got}, expected {want}: dim {axis} {wrong}"
        return None

    return check


def _show(dtype: torch.dtype, shape: tuple[int | str, ...]) -> str:
    """``float32 [2, 8]``: only for messages (a check that passes formats nothing, once per frame)."""
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


def _dim_error(
    size: int, dim: int | str, sizes: dict[str, int], ranges: Mapping[str, list[int]], tail: int
) -> str | None:
    bound = dim if isinstance(dim, int) else sizes.get(dim)
    if bound is None:
        low, high = ranges.get(str(dim), (0, 0))
        if not (low <= size <= high or (tail and size <= tail)):
            return f"{size} is outside {dim}'s range [{low}, {high}]"
        if not tail:
            sizes[str(dim)] = size  # later tensors of this micro-batch must agree
        return None
    full = bound
    expected = min(tail, full) if tail else full
    return None if size == expected else f"is {size}, expected {expected} ({dim})"
