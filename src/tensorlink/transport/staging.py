"""CUDA tensors on the data plane: device↔pinned copies on a stream of their own, ordered with events.

A send stages a CUDA tensor into a pinned pool buffer on the copy stream, after an event recorded on the
producer's stream, so the copy overlaps whatever the producer enqueues next (the next micro-batch's
compute) and the network send of the previous frame. A receive copies from the pinned buffer to the
device on the copy stream and makes the consumer's current stream wait on that copy's event, so the
consumer never reads early and never blocks the host.
"""

from __future__ import annotations

from collections import deque

import torch

from tensorlink import _C


class DeviceStager:
    """One copy stream per device; the pinned memory comes from the channel service's buffer pool."""

    def __init__(self, pool: _C.BufferPool, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"DeviceStager is for CUDA devices, not {device}")
        self.pool = pool
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        # pinned sources of device copies still in flight: their pool buffers must not be reused yet
        self._in_flight: deque[tuple[torch.cuda.Event, torch.Tensor]] = deque()

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """A host copy of tensor in pinned memory and the event that marks the copy done."""
        src = tensor.contiguous()
        nbytes = src.numel() * src.element_size()
        buf = self.pool.acquire(max(nbytes, 1))
        host = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(src.dtype).reshape(src.shape)
        produced = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(produced)
            host.copy_(src, non_blocking=True)
            src.record_stream(self.stream)  # the caching allocator keeps src alive until the copy ran
            done = self.stream.record_event()
        return host, done

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """host (pinned) copied to the device; the caller's current stream waits for the copy."""
        while self._in_flight and self._in_flight[0][0].query():
            self._in_flight.popleft()
        with torch.cuda.stream(self.stream):
            out = host.to(self.device, non_blocking=True)
            done = self.stream.record_event()
        self._in_flight.append((done, host))
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(done)
        out.record_stream(consumer)
        return out
