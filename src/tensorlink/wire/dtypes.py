"""The fixed dtype table: name <-> torch dtype, and torch dtype <-> the native codec's one-byte code."""

from __future__ import annotations

import torch

from tensorlink import _C
from tensorlink.wire.dtype_names import DTYPE_NAMES
from tensorlink.wire.errors import WireError

TORCH_BY_NAME: dict[str, torch.dtype] = {n: getattr(torch, n) for n in DTYPE_NAMES}  # the fixed names only
NAME_BY_TORCH: dict[torch.dtype, str] = {d: n for n, d in TORCH_BY_NAME.items()}

CODE_BY_DTYPE: dict[torch.dtype, int] = {}
DTYPE_BY_CODE: dict[int, torch.dtype] = {}
for _name, _code, _itemsize, _floating in _C.dtype_table():
    _dtype = TORCH_BY_NAME[_name]
    assert _dtype.itemsize == _itemsize, f"native dtype table disagrees with torch on {_name}"
    CODE_BY_DTYPE[_dtype] = _code
    DTYPE_BY_CODE[_code] = _dtype


def code_of(dtype: torch.dtype) -> int:
    try:
        return CODE_BY_DTYPE[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in CODE_BY_DTYPE)
        raise WireError(f"dtype {dtype} cannot be sent in a frame; supported: {supported}") from None


def dtype_of(code: int) -> torch.dtype:
    try:
        return DTYPE_BY_CODE[code]
    except KeyError:
        raise WireError(f"unknown dtype code {code}") from None
