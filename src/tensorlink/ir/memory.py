"""How much memory one forward of a stage program allocates, counted on the meta device before anything real is.

The count runs the program on meta tensors under a dispatch mode. The mode sees the aten calls that composite
operators decompose into (the B*K*M copy a broadcasting ``matmul`` makes of its expanded operand, the L*S score
matrix of attention's math path, the log-probabilities of ``cross_entropy``), and adds up every new storage any
call creates; a view, an in-place update or an op that returns its input creates none. Kernels that allocate
inside themselves get their workspace added by ``_workspace`` (convolution's im2col buffer). Nothing is freed in
the count, so it bounds the peak of the run, not just its outputs.

Why this bounds a real run: no allow-listed op's output shape depends on tensor values (value-dependent ones,
boolean indexing or a tensor used as a size, fail on meta), so the shapes on meta are exactly the shapes the
real run creates at the same input shapes. What is not true is that sizes grow with the inputs: a program can
compute ``K - batch`` (a negative literal multiplier), slice or ``arange`` with a step taken from the batch, or
square ``batch - 32``. So the load-time figure (the largest count over the corners of the declared symbol
ranges, which is what the stage reserves) is made binding by ``ShapeGuard``: before a forward runs at input
shapes not seen before, it counts them (on meta, cached per shapes) and refuses the forward if they need more
than the load-time figure. Every forward that runs therefore stays within the figure the stage was charged.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tensorlink.ir.errors import IRError

MAX_CORNERS = 4  # symbol-range corners counted at load (see corners)
SHAPE_CACHE = 64  # distinct input shapes a module remembers the count of


class OverBound(IRError):
    """A forward would allocate more than the limit it is counted against."""


class AllocationCounter(TorchDispatchMode):
    """Adds up the bytes of every storage an aten call creates (and kernels' internal workspace) while active;
    raises OverBound as soon as the total passes ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        known = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        fresh: dict[int, int] = {}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in known:
                    fresh[storage._cdata] = storage.nbytes()
        self.total += sum(fresh.values()) + _workspace(func, args)
        if self.total > self.limit:
            raise OverBound(f"{func} brings the count to {self.total} bytes, over the limit of {self.limit}")
        return out


def _workspace(func: Any, args: tuple) -> int:
    """Bytes a kernel allocates inside itself, which no output shows. Convolution on the CPU unfolds its input
    (im2col: batch x C_in*prod(kernel) x prod(output spatial); the float64 path always does), counted for every
    dtype since the kernel chosen at run time is not known here."""
    if func is torch.ops.aten.convolution.default:
        x, w = args[0], args[1]
        n, c_in = x.shape[0], x.shape[1]
        out_spatial = _conv_out(x.shape[2:], w.shape[2:], args[3], args[4], args[5])
        return n * c_in * math.prod(w.shape[2:]) * math.prod(out_spatial) * x.element_size()
    return 0


def _conv_out(size: Any, kernel: Any, stride: list[int], padding: list[int], dilation: list[int]) -> list[int]:
    """Output spatial sizes of aten.convolution (its stride, padding and dilation lists hold one value per spatial
    dim, or one for all)."""

    def at(v: list[int], i: int) -> int:
        return int(v[i] if len(v) > 1 else v[0])

    return [
        max(0, (s + 2 * at(padding, i) - at(dilation, i) * (k - 1) - 1) // max(1, at(stride, i)) + 1)
        for i, (s, k) in enumerate(zip(size, kernel, strict=True))
    ]


def count(run: Callable[[], Any], limit: int) -> int:
    """Bytes ``run()`` (a forward on meta tensors) allocates; OverBound past ``limit``."""
    counter = AllocationCounter(limit)
    with torch.no_grad(), counter:
        run()
    return counter.total


def corners(symbols: Mapping[str, list[int]]) -> list[dict[str, int]]:
    """The points of the declared symbol ranges to count at load, all-maximum first: every corner for up to two
    symbols (a batch and a sequence), else all-maximum and all-minimum. More would multiply the load's dry-run time
    (argcheck.MAX_COST prices each run) without making the bound sound: ShapeGuard does that."""
    names = sorted(symbols)
    top = {n: symbols[n][1] for n in names}
    if 2 ** len(names) <= MAX_CORNERS:
        points = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(symbols[n] for n in names))]
    else:
        points = [{n: symbols[n][0] for n in names}]
    unique: list[dict[str, int]] = [top]
    for point in points:
        if point not in unique:
            unique.append(point)
    return unique


class ShapeGuard:
    """Makes a program's memory bound binding: ``check(shapes)`` counts a forward at input shapes not seen
    before (``count_at(shapes, limit)``) and refuses shapes that need more than ``bound`` bytes."""

    def __init__(self, bound: int, count_at: Callable[[list[list[int]], int], int]) -> None:
        self.bound = bound
        self._count_at = count_at
        self._seen: OrderedDict[tuple[tuple[int, ...], ...], int] = OrderedDict()

    def check(self, shapes: list[list[int]]) -> int:
        """The bytes a forward at ``shapes`` allocates; IRError if over the bound."""
        key = tuple(tuple(s) for s in shapes)
        need = self._seen.get(key)
        if need is None:
            try:
                need = self._count_at(shapes, self.bound)
            except OverBound:
                raise IRError(
                    f"a forward at input shapes {[list(k) for k in key]} needs more than this program's memory bound "
                    f"of {self.bound} bytes (counted at the corners of its declared input ranges; its sizes do not "
                    "grow with its inputs): refused before allocating"
                ) from None
            self._seen[key] = need
            if len(self._seen) > SHAPE_CACHE:
                self._seen.popitem(last=False)
        self._seen.move_to_end(key)
        return need
