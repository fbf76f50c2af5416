"""Errors of the data plane."""

from __future__ import annotations


class ChannelError(ConnectionError):
    """A channel could not be opened, or broke; ``reason`` says why in words for the log."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class ChannelRefused(ChannelError):
    """The peer refused to open a channel (it answered with an ErrorReply)."""


class FrameRefused(Exception):
    """A channel's acceptor refused a frame by its header, before its payload was read (a frame nobody asked
    for, or unlike or larger than what was asked for). The channel closes, its reason naming the header, and
    ``recv`` raises this."""
