"""Wire formats: tensor frames, compression and control messages. Formats only, no I/O."""

from tensorlink.wire.compression import Compression
from tensorlink.wire.errors import ChecksumError, WireError
from tensorlink.wire.frame import EncodedFrame, Route, decode_frame, decode_payload, encode_frame
from tensorlink.wire.messages import Message, decode_message, encode_message

__all__ = [
    "ChecksumError",
    "Compression",
    "EncodedFrame",
    "Message",
    "Route",
    "WireError",
    "decode_frame",
    "decode_message",
    "decode_payload",
    "encode_frame",
    "encode_message",
]
