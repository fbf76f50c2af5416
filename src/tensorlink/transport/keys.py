"""Channel keys: an ephemeral X25519 exchange over an authenticated libp2p stream, expanded with HKDF.

The libp2p stream is Noise-encrypted and bound to both peers' identities, so the ephemeral public keys
that cross it cannot be swapped by anyone in the middle. Both peer ids, the job, the cipher and every
value of the exchange go into the HKDF salt (the transcript), so keys from one exchange never match
another's, even between the same peers. The result is one AES-GCM key per direction (16 bytes for
AES-128-GCM, the default, or 32 for AES-256-GCM) and a channel id that names the
pending channel on the direct TCP connection (it is not secret: possession of the keys is proven by the
sealed hello, see :func:`seal_hello`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = {"aes-128-gcm": 16, "aes-256-gcm": 32}
TOKEN_BYTES = 32
CHANNEL_ID_BYTES = 16
# The direct connection opens with: magic, version, channel id, then the one-time token sealed with
# the opener's key at counter 0 (SealedSocket starts its counters at 1, so no nonce is used twice).
HELLO_MAGIC = b"TLDC"
HELLO_VERSION = 1
HELLO_BYTES = len(HELLO_MAGIC) + 1 + CHANNEL_ID_BYTES + TOKEN_BYTES + 16
HELLO_REPLY_BYTES = CHANNEL_ID_BYTES + 16
_NONCE_ZERO = bytes(12)
_INFO = b"tensorlink data-plane channel v1"


class HandshakeError(Exception):
    """The direct connection's hello is malformed or does not prove the channel keys."""


@dataclass(frozen=True, slots=True)
class ChannelKeys:
    """What one side derives: its send and receive keys and the channel id."""

    send: bytes
    recv: bytes
    channel_id: bytes
    token: bytes
    cipher: str


class Ephemeral:
    """One side's fresh X25519 key for one channel set-up; never reused."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def derive(
        self,
        peer_public: bytes,
        *,
        opener: str,
        acceptor: str,
        job: bytes,
        nonce: bytes,
        token: bytes,
        cipher: str,
        is_opener: bool,
    ) -> ChannelKeys:
        opener_key, acceptor_key = (self.public, peer_public) if is_opener else (peer_public, self.public)
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        if not any(shared):
            raise HandshakeError("the peer's ephemeral key is a low-order point (all-zero shared secret)")
        transcript = hashlib.sha256(
            b"|".join(
                [_INFO, opener.encode(), acceptor.encode(), job, opener_key, acceptor_key, nonce, token]
                + [cipher.encode()]
            )
        ).digest()
        n = KEY_BYTES[cipher]
        okm = HKDF(hashes.SHA256(), 2 * n + CHANNEL_ID_BYTES, salt=transcript, info=_INFO).derive(shared)
        opener_to_acceptor, acceptor_to_opener, channel_id = okm[:n], okm[n : 2 * n], okm[2 * n :]
        if is_opener:
            return ChannelKeys(opener_to_acceptor, acceptor_to_opener, channel_id, token, cipher)
        return ChannelKeys(acceptor_to_opener, opener_to_acceptor, channel_id, token, cipher)


def seal_hello(keys: ChannelKeys) -> bytes:
    """The opener's first bytes on the direct connection."""
    sealed = AESGCM(keys.send).encrypt(_NONCE_ZERO, keys.token, keys.channel_id)
    return HELLO_MAGIC + bytes([HELLO_VERSION]) + keys.channel_id + sealed


def parse_hello(data: bytes) -> tuple[bytes, bytes]:
    """(channel id, sealed token) of a hello; HandshakeError for anything else."""
    if len(data) != HELLO_BYTES or data[:4] != HELLO_MAGIC:
        raise HandshakeError("not a TensorLink data-plane hello (wrong magic or length)")
    if data[4] != HELLO_VERSION:
        raise HandshakeError(f"data-plane hello version {data[4]} is not supported (this node speaks {HELLO_VERSION})")
    return data[5 : 5 + CHANNEL_ID_BYTES], data[5 + CHANNEL_ID_BYTES :]


def check_hello(keys: ChannelKeys, sealed_token: bytes) -> None:
    """Acceptor side: the sealed token must open with the opener's key and equal the one we issued."""
    try:
        token = AESGCM(keys.recv).decrypt(_NONCE_ZERO, sealed_token, keys.channel_id)
    except InvalidTag:
        raise HandshakeError("hello does not authenticate (wrong keys)") from None
    if not hmac.compare_digest(token, keys.token):
        raise HandshakeError("hello carries the wrong token")


def seal_reply(keys: ChannelKeys) -> bytes:
    """The acceptor's answer: the channel id sealed with its own key, proving it holds the keys too."""
    return AESGCM(keys.send).encrypt(_NONCE_ZERO, keys.channel_id, None)


def check_reply(keys: ChannelKeys, reply: bytes) -> None:
    try:
        channel_id = AESGCM(keys.recv).decrypt(_NONCE_ZERO, reply, None)
    except InvalidTag:
        raise HandshakeError("the acceptor's reply does not authenticate (wrong keys)") from None
    if not hmac.compare_digest(channel_id, keys.channel_id):
        raise HandshakeError("the acceptor's reply names another channel")
