"""Errors of the data plane."""

from __future__ import annotations


class ChannelError(ConnectionError):
    """A channel could not be opened, or broke; ``reason`` says why in words for the log."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class ChannelRefused(ChannelError):
    """The peer refused to open a channel (it answered with an ErrorReply)."""
