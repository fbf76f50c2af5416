"""Node configuration: a TOML file in the data dir, overridden by command-line flags.

Every field is validated on load (msgspec), so a typo in config.toml is an error that names the field,
not a setting silently ignored. A key is its flag's name (``--max-memory`` is ``max_memory``), as
``--help`` says; the attribute names keep their units (``max_memory_gb``) for the code that reads them.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Literal

import msgspec

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

CONFIG_FILE = "config.toml"
DEFAULT_PORT = 4001
DEFAULT_STATUS_PORT = 7070


# Keys that config.toml took before keys were the flags' names. Refused with the new name rather than
# accepted quietly: one name per setting, and a file that still works in a year.
RENAMED_KEYS = {
    "max_memory_gb": "max_memory",
    "torch_threads": "threads",
    "validators": "validator",
    "claim_timeout_s": "claim_timeout",
}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and says how to fix it."""


class NodeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: Literal["worker", "validator"] = "worker"
    listen: list[str] = msgspec.field(default_factory=lambda: [f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"])
    announce: list[str] = msgspec.field(default_factory=list)
    bootstrap: list[str] = msgspec.field(default_factory=list)
    network_key: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}\Z")] | None = None
    relay: bool = False
    status_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = DEFAULT_STATUS_PORT
    max_memory_gb: Annotated[float, msgspec.Meta(gt=0)] | None = msgspec.field(default=None, name="max_memory")
    device: Literal["cpu", "cuda"] | None = None  # None: cuda when a GPU is present, else cpu
    # How long a published record lives without a refresh; the node refreshes at a third of it.
    record_ttl_s: Annotated[float, msgspec.Meta(ge=3, le=3600)] = 60.0
    heartbeat_s: Annotated[float, msgspec.Meta(ge=0.2, le=300)] = 5.0
    # Data plane: TCP port for direct tensor channels (0: any free port; peers learn it at channel
    # set-up), and whether to offer and try direct channels at all (off: libp2p streams only).
    data_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    direct_channels: bool = True
    channel_memory_gb: Annotated[float, msgspec.Meta(gt=0, le=1024)] = 1.0
    channel_cipher: Literal["aes-128-gcm", "aes-256-gcm"] = "aes-128-gcm"
    # None: torch's default
    torch_threads: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = msgspec.field(default=None, name="threads")
    audit_inputs: bool = False  # record digests of what jobs' owners send (worker/stage_host.py)
    # The network's trusted validators (validator/trust.py): only these may assign stages, and only
    # their records count. Empty: no validator is trusted, a worker refuses every assignment.
    validators: list[Annotated[str, msgspec.Meta(pattern=r"^[1-9A-HJ-NP-Za-km-z]{32,128}\Z")]] = msgspec.field(
        default_factory=list, name="validator"
    )
    # How long a worker holds a stage its owner has not started (validators stop counting the job as
    # waiting after the same time). An honest owner claims within a second of its plan.
    claim_timeout_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = msgspec.field(default=30.0, name="claim_timeout")
    # A chain whose Staking contract grants the validator role (validator/stake.py): its JSON-RPC URL,
    # the deployment file, and on a validator the file with the hex key of its staked account.
    chain_rpc: Annotated[str, msgspec.Meta(pattern=r"^https?://")] | None = None
    chain_deployment: str | None = None
    chain_key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.chain_rpc is None) != (self.chain_deployment is None):
            raise ValueError("chain_rpc and chain_deployment go together: give both, or neither")
        if self.chain_key_file is not None and self.chain_rpc is None:
            raise ValueError("chain_key_file needs a chain: give chain_rpc and chain_deployment too")


def default_data_dir() -> Path:
    return Path(os.environ.get("TENSORLINK_HOME", Path.home() / ".tensorlink"))


def load_config(data_dir: Path, overrides: dict[str, object]) -> NodeConfig:
    """The file's settings (if the file exists) with the non-None overrides (keyed like the file) on top."""
    path = data_dir / CONFIG_FILE
    settings: dict[str, object] = {}
    if path.exists():
        try:
            settings = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    given = {key: value for key, value in overrides.items() if value is not None}
    _refuse_renamed(settings, path)
    settings.update(given)
    try:
        return msgspec.convert(settings, NodeConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting ({_source(str(exc), path, given)}): {exc}") from None


def _refuse_renamed(settings: dict[str, object], path: Path) -> None:
    for old, new in RENAMED_KEYS.items():
        if old in settings:
            flag = "--" + new.replace("_", "-")
            raise ConfigError(f"{path}: the key {old!r} is now {new!r}, the name of its flag {flag}; rename it")


def _source(message: str, path: Path, given: dict[str, object]) -> str:
    """Where the bad value came from: the flag when the command line gave that key, else the file."""
    match = re.search(r"at `\$\.(\w+)", message)
    if match and match.group(1) in given:
        return "--" + match.group(1).replace("_", "-")
    return str(path) if path.exists() else "command line"
