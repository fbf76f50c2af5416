"""Errors for malformed wire input. They come from the native codec so C++ and Python raise one type."""

from tensorlink._C import ChecksumError, WireError

__all__ = ["ChecksumError", "WireError"]
