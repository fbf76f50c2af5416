"""The EVM side of TensorLink: SNO token, validator/worker bonds, job settlement, reputation and
slashing, reached through typed methods on an in-process chain (default) or a JSON-RPC node.

Its libraries (web3, eth-account, eth-tester with py-evm) come with the ``chain`` extra, not with the base
install: ``offload()`` and a node without a chain never import this package. Importing it without them
raises ModuleNotFoundError with the command that installs them.
"""

INSTALL_HINT = "pip install 'tensorlink-p2p[chain]'"

try:
    # A plain import sorts before every `from` import: it must run before anything imports eth or py_ecc.
    import tensorlink.chain.recursion_guard  # noqa: F401
    from tensorlink.chain import errors
    from tensorlink.chain.artifacts import ArtifactMissing
    from tensorlink.chain.backends import Backend, EmbeddedBackend, RpcBackend
    from tensorlink.chain.chain import (
        SNO,
        ZERO_ADDRESS,
        Chain,
        Deployment,
        DeployParams,
        Event,
        Job,
        Receipt,
        StakeInfo,
    )
    from tensorlink.chain.eip712 import Settle, Slash
    from tensorlink.chain.errors import ChainError, ContractRevert
    from tensorlink.chain.merkle import Leaf, RewardTree, reward_leaves, split
except ModuleNotFoundError as exc:
    if exc.name is None or exc.name.split(".")[0] == "tensorlink":
        raise
    raise ModuleNotFoundError(
        f"tensorlink.chain needs the chain extra ({exc.name} is not installed): {INSTALL_HINT}", name=exc.name
    ) from exc

__all__ = [
    "SNO",
    "ZERO_ADDRESS",
    "ArtifactMissing",
    "Backend",
    "Chain",
    "ChainError",
    "ContractRevert",
    "DeployParams",
    "Deployment",
    "EmbeddedBackend",
    "Event",
    "Job",
    "Leaf",
    "Receipt",
    "RewardTree",
    "RpcBackend",
    "Settle",
    "Slash",
    "StakeInfo",
    "errors",
    "reward_leaves",
    "split",
]
