"""Test tensors shared by the wire tests."""

from __future__ import annotations

import torch


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, scale: float = 1e3) -> torch.Tensor:
    """Values that use the dtype's range, so a wrong byte order or width would show."""
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)
