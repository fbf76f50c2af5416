"""The data plane: encrypted tensor channels between peers, set up over the libp2p control plane.

    service = ChannelService(host, TransportConfig(listen_ip="0.0.0.0"))
    await nursery.start(service.serve)
    channel = await service.open(peer_id, job)       # or: channel = await service.accept()
    await channel.send(tensor, Route(job, step, micro_batch, stage))
    tensor, route = await channel.recv()

Direct channels carry AES-GCM records on a TCP connection of their own (native, GIL released);
when no direct connection is possible the same API runs on the libp2p stream (``channel.kind``).
"""

from tensorlink.transport.channel import Channel
from tensorlink.transport.errors import ChannelError, ChannelRefused
from tensorlink.transport.service import PROTOCOL, ChannelService, TransportConfig

__all__ = ["PROTOCOL", "Channel", "ChannelError", "ChannelRefused", "ChannelService", "TransportConfig"]
