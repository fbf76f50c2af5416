"""The node's Ed25519 identity, persisted in its data dir so the peer id survives restarts."""

from __future__ import annotations

import logging
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import load_identity, save_identity
from libp2p.peer.id import ID

log = logging.getLogger(__name__)
KEY_FILE = "identity.key"


def load_or_create_identity(data_dir: Path) -> KeyPair:
    """The key in data_dir/identity.key, created (mode 0600) on first start."""
    path = data_dir / KEY_FILE
    if path.exists():
        try:
            return load_identity(path)
        except Exception as exc:
            raise ValueError(
                f"{path} is not a valid libp2p private key ({exc}); move it away to start with a new identity"
            ) from exc
    key_pair = create_new_key_pair()
    save_identity(key_pair, path)
    log.info("created a new identity in %s", path)
    return key_pair


def new_identity() -> KeyPair:
    """A fresh Ed25519 key that is never saved: a user's client gets a new peer id every run."""
    return create_new_key_pair()


def peer_id_of(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()
