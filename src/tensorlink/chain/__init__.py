"""The EVM side of TensorLink: SNO token, validator/worker bonds, job settlement, reputation and
slashing, reached through typed methods on an in-process chain (default) or a JSON-RPC node."""

# isort: split
from tensorlink.chain import recursion_guard  # noqa: F401  (before anything imports eth or py_ecc)

# isort: split
from tensorlink.chain import errors
from tensorlink.chain.artifacts import ArtifactMissing
from tensorlink.chain.backends import Backend, EmbeddedBackend, RpcBackend
from tensorlink.chain.chain import SNO, ZERO_ADDRESS, Chain, Deployment, DeployParams, Event, Job, Receipt, StakeInfo
from tensorlink.chain.eip712 import Settle, Slash
from tensorlink.chain.errors import ChainError, ContractRevert
from tensorlink.chain.merkle import Leaf, RewardTree, reward_leaves, split

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
