"""Which peers this node obeys as validators: the network's decision, never the claimant's.

A validator presence record signed by a peer proves who it is, not that it may assign stages. A peer is
a trusted validator when the network's configuration lists it (``validators = [...]`` in config.toml,
``--validator PEER_ID``): the rule for networks without a chain. A node with no rule trusts nobody: a
worker then refuses every assignment, and says how to configure one.
"""

from __future__ import annotations

from collections.abc import Iterable

NO_RULE_HINT = (
    "no trusted validators are configured: start the node with --validator PEER_ID (repeatable) or list "
    'them in config.toml as validators = ["PEER_ID", ...]'
)


class ValidatorTrust:
    """The rule in force on one node: ``trusts(peer)`` answers, ``rule`` describes it for people."""

    def __init__(self, listed: Iterable[str] = ()) -> None:
        self.listed = frozenset(listed)

    def trusts(self, peer: str) -> bool:
        return peer in self.listed

    @property
    def rule(self) -> str:
        """One line for the banner and /status."""
        if not self.listed:
            return "none (" + NO_RULE_HINT + ")"
        return f"config list of {len(self.listed)}"

    def refusal(self, peer: str) -> str:
        """Why ``peer`` is not obeyed, naming the rule, for the refused peer and the operator's log."""
        if not self.listed:
            return f"{peer} is not a trusted validator: {NO_RULE_HINT}"
        return (
            f"{peer} is not a trusted validator of this network (trusted validators: config list of "
            f"{len(self.listed)}; a validator's own record does not make it one)"
        )
