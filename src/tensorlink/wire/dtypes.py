"""The fixed dtype table shared with the native codec: torch dtype <-> one-byte code."""

from __future__ import annotations

import torch

from tensorlink import _C
from tensorlink.wire.errors import WireError

_TORCH_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}

CODE_BY_DTYPE: dict[torch.dtype, int] = {}
DTYPE_BY_CODE: dict[int, torch.dtype] = {}
for _name, _code, _itemsize, _floating in _C.dtype_table():
    _dtype = _TORCH_BY_NAME[_name]
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
