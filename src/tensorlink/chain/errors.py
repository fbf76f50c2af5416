"""Contract reverts as Python exceptions named after the Solidity custom errors.

web3.py 8 has no ABI-based custom-error decoder, and every backend surfaces a revert differently
(eth-tester: `TransactionFailed("execution reverted: b'...'")`, anvil: `ContractCustomError` with hex
data). We match the 4-byte selector against the `error` entries of every compiled ABI and raise one
exception class per error name, so callers write `except errors.NotValidatorSigner`. Classes are made
with `type()` the first time the module attribute is read; no code is generated from text.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from eth_abi import abi
from eth_abi.exceptions import DecodingError
from eth_utils import keccak, to_checksum_address

from tensorlink.chain import artifacts


class ChainError(Exception):
    """Anything that went wrong talking to the chain."""


class TransactionReverted(ChainError):
    """A mined transaction failed and its revert data could not be recovered."""


class ContractRevert(ChainError):
    """A contract reverted with data. Subclasses carry the Solidity error's name; `args` are its decoded
    arguments (addresses checksummed, bytes as bytes)."""

    name: str = "ContractRevert"
    inputs: tuple[str, ...] = ()

    def __init__(self, *args: Any, data: bytes = b"", selector: str = "") -> None:
        super().__init__(*args)
        self.data = data
        self.selector = selector or (data[:4].hex() if data else "")

    @property
    def fields(self) -> dict[str, Any]:
        """Decoded arguments by their Solidity parameter names."""
        return dict(zip(self.inputs, self.args, strict=False))

    def __str__(self) -> str:
        if type(self) is ContractRevert:
            return f"contract reverted with unknown error selector 0x{self.selector} (data 0x{self.data.hex()})"
        shown = ", ".join(f"{k}={v!r}" if k else repr(v) for k, v in zip(self.inputs, self.args, strict=False))
        return f"{self.name}({shown})"


class Error(ContractRevert):
    """Solidity's built-in `Error(string)` (a `require` message or a low-level failure reason)."""

    name = "Error"
    inputs = ("reason",)


class Panic(ContractRevert):
    """Solidity's built-in `Panic(uint256)`: 0x11 is arithmetic overflow, 0x12 division by zero, ..."""

    name = "Panic"
    inputs = ("code",)


_ERROR_SELECTOR = bytes.fromhex("08c379a0")
_PANIC_SELECTOR = bytes.fromhex("4e487b71")
_BUILTIN = {"Error": Error, "Panic": Panic, "ContractRevert": ContractRevert, "ChainError": ChainError}


def _abi_type(param: dict[str, Any]) -> str:
    """Canonical ABI type of one input, expanding tuples (custom errors may take structs)."""
    kind = param["type"]
    if kind.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in param.get("components", [])) + ")" + kind[len("tuple") :]
    return kind


class _Decoder:
    """One error signature: its class and argument types."""

    def __init__(self, cls: type[ContractRevert], types: list[str]) -> None:
        self.cls = cls
        self.types = types


@functools.cache
def _registry() -> tuple[dict[str, type[ContractRevert]], dict[bytes, _Decoder]]:
    """(classes by name, decoders by selector) from every artifact's ABI."""
    classes: dict[str, type[ContractRevert]] = {}
    by_selector: dict[bytes, _Decoder] = {
        _ERROR_SELECTOR: _Decoder(Error, ["string"]),
        _PANIC_SELECTOR: _Decoder(Panic, ["uint256"]),
    }
    for artifact_name in artifacts.names():
        for entry in artifacts.load(artifact_name).abi:
            if entry.get("type") != "error":
                continue
            name = entry["name"]
            if not name.isidentifier() or name in _BUILTIN:
                continue
            types = [_abi_type(p) for p in entry.get("inputs", [])]
            selector = keccak(text=f"{name}({','.join(types)})")[:4]
            if selector in by_selector:
                continue
            cls = classes.get(name)
            if cls is None:
                inputs = tuple(p.get("name", "") for p in entry.get("inputs", []))
                doc = f"Solidity `error {name}({', '.join(types)})`, declared in {artifact_name}."
                cls = type(name, (ContractRevert,), {"name": name, "inputs": inputs, "__doc__": doc})
                cls.__module__ = __name__
                classes[name] = cls
            by_selector[selector] = _Decoder(cls, types)
    return classes, by_selector


def __getattr__(name: str) -> type[ContractRevert]:
    """`errors.NotValidatorSigner` etc.: built from the ABIs on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    classes, _ = _registry()
    try:
        return classes[name]
    except KeyError:
        raise AttributeError(f"no contract error named {name!r} in the compiled ABIs") from None


def error_names() -> list[str]:
    """Every custom error the compiled contracts can raise."""
    return sorted(_registry()[0])


def _normalise(value: Any) -> Any:
    if isinstance(value, str) and len(value) == 42 and value.startswith("0x"):
        return to_checksum_address(value)
    if isinstance(value, tuple):
        return tuple(_normalise(v) for v in value)
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def decode(data: bytes) -> ContractRevert:
    """The exception for raw revert data (selector + ABI arguments)."""
    if len(data) < 4:
        return ContractRevert(data=data, selector=data.hex())
    decoder = _registry()[1].get(data[:4])
    if decoder is None:
        return ContractRevert(data=data)
    try:
        values = abi.decode(decoder.types, data[4:])
    except DecodingError:
        return ContractRevert(data=data)
    return decoder.cls(*(_normalise(v) for v in values), data=data)


_BYTES_REPR = re.compile(r"^b(['\"])(.*)\1$", re.DOTALL)


def _bytes_from_repr(text: str) -> bytes | None:
    """eth-tester formats revert bytes with `str(bytes)`; undo that without evaluating anything.
    A bytes repr holds only printable ASCII and backslash escapes, which `unicode_escape` reverses."""
    match = _BYTES_REPR.match(text.strip())
    if match is None:
        return None
    body = match.group(2)
    if not body.isascii():
        return None
    try:
        return body.encode("ascii").decode("unicode_escape").encode("latin-1")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return None


def revert_data(exc: BaseException) -> bytes | None:
    """Raw revert data carried by a backend's exception, or None when it is not a revert."""
    data = getattr(exc, "data", None)
    if isinstance(data, dict):  # some nodes nest it: {"data": "0x..."}
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return None
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    if type(exc).__name__ == "TransactionFailed" and exc.args:  # eth-tester
        first = exc.args[0]
        if isinstance(first, bytes | bytearray):
            return bytes(first)
        if isinstance(first, str):
            text = first.removeprefix("execution reverted:").strip()
            raw = _bytes_from_repr(text)
            if raw is not None:
                return raw
            # a reason string eth-tester has already decoded from Error(string)
            return _ERROR_SELECTOR + abi.encode(["string"], [text])
    return None


def from_exception(exc: BaseException) -> ContractRevert | None:
    """The named exception for a backend's revert, or None when `exc` is not a revert."""
    raw = revert_data(exc)
    return None if raw is None else decode(raw)
