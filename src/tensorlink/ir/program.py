"""StageProgram and its bytes: a manifest with content hashes, the JSON program, safetensors weights.

Layout: b"TLIR", u16 format version, u32 manifest length, manifest JSON, u32 program length, program
JSON, u64 weights length, safetensors. Every length is checked against its cap and every hash before
anything is parsed.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tensorlink import _C
from tensorlink.ir.errors import IRError
from tensorlink.ir.schema import Program

MAGIC = b"TLIR"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 4096
MAX_PROGRAM_BYTES = 16 << 20
MAX_WEIGHTS_BYTES = 64 << 30
MAX_SAFETENSORS_HEADER = 16 << 20
MAX_JSON_DEPTH = 64  # arrays/objects; each nested list argument adds two


class Manifest(msgspec.Struct, forbid_unknown_fields=True):
    format: str
    version: int
    program_sha256: str
    weights_sha256: str


# Built once, at import: msgspec 0.22 builds a type's decoder lazily on first use, and two threads doing
# that at once (two stages loading in one process) crashed the interpreter.
_MANIFEST_DECODER = msgspec.json.Decoder(Manifest)
_PROGRAM_DECODER = msgspec.json.Decoder(Program)


@dataclass(frozen=True)
class StageProgram:
    program: Program
    weights: bytes  # safetensors
    # The capturing side's pytree spec of the outputs (e.g. an HF ModelOutput class): rebuilds the
    # user's output structure there. Never serialized; a worker's copy has None.
    out_spec: Any = field(default=None, compare=False, repr=False)

    @property
    def tie_groups(self) -> list[list[str]]:
        return [list(group) for group in self.program.tie_groups]

    def to_bytes(self) -> bytes:
        program = msgspec.json.encode(self.program)
        manifest = msgspec.json.encode(
            Manifest(
                format="tensorlink-stage-ir",
                version=FORMAT_VERSION,
                program_sha256=hashlib.sha256(program).hexdigest(),
                weights_sha256=hashlib.sha256(self.weights).hexdigest(),
            )
        )
        return b"".join(
            [
                MAGIC,
                struct.pack("<HI", FORMAT_VERSION, len(manifest)),
                manifest,
                struct.pack("<I", len(program)),
                program,
                struct.pack("<Q", len(self.weights)),
                self.weights,
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_weights_bytes: int = MAX_WEIGHTS_BYTES) -> StageProgram:
        view = memoryview(data)
        pos = 0

        def take(n: int, what: str) -> memoryview:
            nonlocal pos
            if n > len(view) - pos:
                raise IRError(f"stage program truncated in the {what} ({len(view) - pos} of {n} bytes)")
            out = view[pos : pos + n]
            pos += n
            return out

        if bytes(take(4, "magic")) != MAGIC:
            raise IRError("not a TensorLink stage program (bad magic)")
        version, manifest_len = struct.unpack("<HI", take(6, "header"))
        if version != FORMAT_VERSION:
            raise IRError(f"stage program format {version} is not supported (this worker reads {FORMAT_VERSION})")
        if manifest_len > MAX_MANIFEST_BYTES:
            raise IRError(f"manifest of {manifest_len} bytes exceeds the cap of {MAX_MANIFEST_BYTES}")
        manifest_bytes = take(manifest_len, "manifest")
        (program_len,) = struct.unpack("<I", take(4, "program length"))
        if program_len > MAX_PROGRAM_BYTES:
            raise IRError(f"program JSON of {program_len} bytes exceeds the cap of {MAX_PROGRAM_BYTES}")
        program_bytes = take(program_len, "program")
        (weights_len,) = struct.unpack("<Q", take(8, "weights length"))
        if weights_len > max_weights_bytes:
            raise IRError(f"weights of {weights_len} bytes exceed the cap of {max_weights_bytes}")
        weights = take(weights_len, "weights")
        if pos != len(view):
            raise IRError(f"{len(view) - pos} unexpected bytes after the weights")
        try:
            manifest = _MANIFEST_DECODER.decode(manifest_bytes)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise IRError(f"malformed manifest: {exc}") from None
        if manifest.format != "tensorlink-stage-ir" or manifest.version != FORMAT_VERSION:
            raise IRError(f"manifest describes {manifest.format!r} version {manifest.version}")
        if hashlib.sha256(program_bytes).hexdigest() != manifest.program_sha256:
            raise IRError("program hash mismatch: the program JSON was altered after capture")
        if hashlib.sha256(weights).hexdigest() != manifest.weights_sha256:
            raise IRError("weights hash mismatch: the weights were altered after capture")
        _check_safetensors_header(weights)
        _check_depth(program_bytes, "program JSON")
        try:
            program = _PROGRAM_DECODER.decode(program_bytes)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise IRError(f"malformed program JSON: {exc}") from None
        return cls(program, bytes(weights))


def _check_depth(text: memoryview | bytes, what: str) -> None:
    """Bound nesting before the recursive decoder runs. msgspec stops at the interpreter's recursion
    limit, which imported libraries raise (py_ecc sets 100,000); that deep, a hostile program would
    overflow the C stack and kill the worker instead of being refused."""
    if _C.json_depth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise IRError(f"{what} nesting depth exceeds {MAX_JSON_DEPTH} levels (captured programs nest about 10)")


def _check_safetensors_header(weights: memoryview) -> None:
    """safetensors starts with a u64 header length; refuse a huge one before the library reads it."""
    if len(weights) < 8:
        raise IRError("weights are not safetensors (shorter than its header length)")
    (header_len,) = struct.unpack("<Q", weights[:8])
    if header_len > MAX_SAFETENSORS_HEADER or header_len > len(weights) - 8:
        raise IRError(
            f"safetensors header of {header_len} bytes is over the cap of {MAX_SAFETENSORS_HEADER} or past the end"
        )
