"""One peer cannot starve a protocol: idle streams lose their slot at the first-message deadline, one
peer holds at most a few slots of each protocol, and every refusal says why.

A real worker node process; the attacker is a libp2p host in this test process that opens more idle
(or half-written) streams of the stage and channel protocols than the node has slots for. An honest
peer is answered at once all the same, and the attacker's streams are closed after the deadline.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from nodes import NodeProcess

from tensorlink.p2p.host import FIRST_MESSAGE_S, PER_PEER, make_host
from tensorlink.p2p.identity import load_or_create_identity
from tensorlink.p2p.streams import StreamError, read_record, write_message, write_record
from tensorlink.transport.service import SETUPS_PER_PEER
from tensorlink.wire.messages import ChannelOffer, ErrorReply, StageAssign, decode_message
from tensorlink.wire.protocols import ASSIGN_PROTOCOL as ASSIGN
from tensorlink.wire.protocols import CHANNEL_PROTOCOL as CHANNEL
from tensorlink.wire.protocols import STAGE_PROTOCOL as STAGE
from tensorlink.wire.stage import Failed, StageOpen, decode_stage, encode_stage
from tensorlink.worker.stage_host import STAGES_PER_PEER

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

# More than the node's global slots (64 stage, 32 channel, 16 assign), so without per-peer caps nobody else
# gets one. The assign protocol stands for those that keep serve_protocol's defaults (ErrorReply refusals).
IDLE = {STAGE: 70, CHANNEL: 36, ASSIGN: 20}
CAPS = {STAGE: STAGES_PER_PEER, CHANNEL: SETUPS_PER_PEER, ASSIGN: PER_PEER}


async def _host(tmp: str) -> Any:
    return make_host(load_or_create_identity(Path(tmp)))


async def refusal(stream: Any, protocol: str) -> str:
    """The node's answer on a stream we never wrote a whole message to: its error text, then the end."""
    record = await read_record(stream, 16 << 10)
    msg = decode_stage(record) if protocol == STAGE else decode_message(record)
    assert isinstance(msg, Failed | ErrorReply), msg
    with pytest.raises(StreamError):  # and nothing more: the stream is over
        await read_record(stream, 16 << 10)
    return f"{msg.message} ({msg.code})"


async def honest_answer(host: Any, peer: Any, protocol: str) -> tuple[float, str]:
    """Seconds from opening a stream to the node's answer of an honest first message, and the answer."""
    started = trio.current_time()
    stream = await host.new_stream(peer, [protocol])
    if protocol == STAGE:
        await write_record(stream, encode_stage(StageOpen(job=os.urandom(16), stage=0)))
    elif protocol == CHANNEL:
        await write_message(
            stream, ChannelOffer(job=os.urandom(16), ephemeral_key=os.urandom(32), nonce=os.urandom(32))
        )
    else:
        me = host.get_id().to_base58()
        await write_message(
            stream, StageAssign(job=os.urandom(16), owner=me, validator=me, stage=0, n_stages=1, memory_bytes=1 << 20)
        )
    answer = await refusal(stream, protocol)
    return trio.current_time() - started, answer


async def attack(target: str) -> dict[str, Any]:
    seen: dict[str, Any] = {"busy": {}, "closed": {}, "honest": {}}
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        attacker, honest = await _host(a), await _host(b)
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        async with attacker.run(listen), honest.run(listen):
            info = info_from_p2p_addr(multiaddr.Multiaddr(target))
            await attacker.connect(info)
            await honest.connect(info)

            async def idle(protocol: str, i: int) -> None:
                stream = await attacker.new_stream(info.peer_id, [protocol])
                opened = trio.current_time()
                if i % 2:
                    await stream.write(b"\x00\x00")  # half a length prefix, then nothing
                answer = await refusal(stream, protocol)
                kind = "busy" if "already holds" in answer else "closed"
                seen[kind].setdefault(protocol, []).append((trio.current_time() - opened, answer))

            with trio.fail_after(40):
                async with trio.open_nursery() as nursery:
                    for protocol, count in IDLE.items():
                        for i in range(count):
                            nursery.start_soon(idle, protocol, i)
                    await trio.sleep(1.0)  # every idle stream is open (or refused) by now
                    for protocol in IDLE:
                        seen["honest"][protocol] = await honest_answer(honest, info.peer_id, protocol)
    return seen


@pytest.mark.timeout(120)
def test_idle_streams_cannot_hold_the_slots_of_honest_peers(start_node: Callable[..., NodeProcess]) -> None:
    node = start_node("worker")
    seen = trio.run(attack, node.addr)
    for protocol, cap in CAPS.items():
        # The honest peer got the protocol's own answer (no such job, not a validator), at once.
        took, answer = seen["honest"][protocol]
        assert "(busy)" not in answer and "(too_slow)" not in answer, answer
        print(f"{protocol}: honest answer in {took * 1000:.0f} ms under {IDLE[protocol]} idle attacker streams")
        assert took < 2.0, f"{protocol}: the honest peer waited {took:.2f} s"
        # The attacker held `cap` slots; every other stream of it was refused at once, saying why.
        busy, closed = seen["busy"].get(protocol, []), seen["closed"][protocol]
        assert len(closed) == cap and len(busy) == IDLE[protocol] - cap, (len(closed), len(busy))
        for t, text in busy:
            assert f"already holds {cap} streams of {protocol} (busy)" in text and t < 3.0, (t, text)
        # The held ones were closed at the first-message deadline, with the reason.
        for t, text in closed:
            assert f"no first message within {FIRST_MESSAGE_S:.1f} s on {protocol} (too_slow)" in text, text
            assert FIRST_MESSAGE_S - 0.5 < t < FIRST_MESSAGE_S + 3.0, t
    assert node.proc.poll() is None, node.output
    assert "Traceback" not in node.output, node.output[-5000:]
