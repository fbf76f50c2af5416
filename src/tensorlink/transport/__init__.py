"""The data plane: encrypted tensor channels between peers, set up over the libp2p control plane.

    service = ChannelService(host, TransportConfig(listen_ip="0.0.0.0"))
    await nursery.start(service.serve)
    channel = await service.open(peer_id, job)       # or: channel = await service.accept()
    await channel.send(tensor, Route(job, step, micro_batch, stage))
    tensor, route = await channel.recv()

Direct channels carry AES-GCM records on a TCP connection of their own (native, GIL released);
when no direct connection is possible the same API runs on the libp2p stream (``channel.kind``).
"""

from __future__ import annotations

from tensorlink.transport.channel import Channel
from tensorlink.transport.errors import ChannelError, ChannelRefused, FrameRefused

__all__ = [
    "Channel",
    "ChannelError",
    "ChannelRefused",
    "ChannelService",
    "FrameRefused",
    "TransportConfig",
]


def __getattr__(name: str) -> object:
    """The libp2p-facing service, imported on first use: the channels, the sealed socket and the CUDA
    staging work without libp2p (GPU machines whose Python has no libp2p wheels can run them)."""
    if name in ("ChannelService", "TransportConfig"):
        from tensorlink.transport import service

        return getattr(service, name)
    raise AttributeError(f"module 'tensorlink.transport' has no attribute {name!r}")
