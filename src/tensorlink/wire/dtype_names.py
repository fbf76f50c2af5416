"""The tensor dtypes TensorLink carries, by name: in frames, in stage programs, in checkpoints.

Torch-free, so that msgspec schemas can use the names; wire/dtypes.py maps them to torch dtypes.
"""

from __future__ import annotations

from typing import Literal, get_args

DTypeName = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]
DTYPE_NAMES: tuple[str, ...] = get_args(DTypeName)
