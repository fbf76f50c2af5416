"""A stage's reservation is enforced over the real stage protocol: an owner whose stage holds a small reservation
cannot load a program larger than the worker can give it (the worker answers ``over_reservation``, naming the
bytes), and an honest program that needs more than was declared grows its reservation into the worker's free
memory and runs. The worker is a real StageHost with its real Assignments registry on its own libp2p host; the
owner is a real Client and Pipeline, as offload() builds them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tensorlink.pipeline.client import Client
from tensorlink.pipeline.driver import Pipeline, Settings
from tensorlink.pipeline.job import Job, PipelineError
from tensorlink.pipeline.programs import capture_program
from tensorlink.wire.messages import StageAssign
from tensorlink.worker.assignments import Assignments
from tensorlink.worker.stage_host import StageHost

pytestmark = [pytest.mark.swarm]

MIB = 1 << 20


@dataclass
class Worker:
    owner: Client
    worker: Client
    driver: Pipeline
    registry: Assignments


@pytest.fixture
def make() -> Iterator:
    """make(capacity, declared): an owner and a worker offering ``capacity`` bytes, one stage assigned to the owner
    with ``declared`` bytes reserved, the stage opened but no program loaded."""
    clients: list[Client] = []

    def build(capacity: int, declared: int) -> Worker:
        owner, worker = Client().start(), Client().start()
        clients.extend([owner, worker])
        job_id = secrets.token_bytes(16)
        registry = Assignments(capacity, trust_any_validator=True, min_stage_bytes=1)
        assign = StageAssign(
            job=job_id, owner=owner.peer_id, validator="v", stage=0, n_stages=1, memory_bytes=declared
        )
        registry.accept(assign, "v")
        host = StageHost(worker.host, worker.channels, registry, max_memory_bytes=capacity)

        async def serve() -> None:
            assert worker.nursery is not None
            await worker.nursery.start(host.serve)

        worker.call(serve)
        assert owner.call(owner.connect, [f"{a}/p2p/{worker.peer_id}" for a in worker.host.addrs()])

        async def open_job() -> Pipeline:
            job = Job(owner, job_id, 1, {0: worker.peer_id}, worker.peer_id)
            await job.open()
            return Pipeline(owner, Settings(workers=1), job, {"weight": 0, "bias": 0})

        return Worker(owner, worker, owner.call(open_job), registry)

    yield build
    for client in clients:
        client.close()


def load(w: Worker, width: int) -> None:
    torch.manual_seed(0)
    program = capture_program(nn.Linear(width, width), (torch.randn(2, width),), {}, train=True, max_seq_len=None)
    w.owner.call(w.driver.load, "train", program)


def test_a_program_over_what_the_worker_can_reserve_is_refused(make) -> None:
    """A Linear(2048, 2048) (16 MiB of weights, 32 MiB with gradients) on a worker offering 24 MiB, with 1 MiB
    declared: the program's bytes arrive (the reservation grows to hold them), its load fails with
    over_reservation naming the bytes, and the reservation never took the whole worker."""
    w = make(24 * MIB, 1 * MIB)
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the driver's nursery wraps it in an exception group
        load(w, 2048)
    error = raised.value
    while getattr(error, "exceptions", None):
        (error,) = error.exceptions  # type: ignore[attr-defined]
    assert isinstance(error, PipelineError), error
    assert re.search(
        r"would bring this stage to \d+ bytes, over its reservation of \d+ .*\(over_reservation\)", str(error)
    )
    assert 16 * MIB < w.registry.reserved_bytes() < 24 * MIB


def test_an_honest_program_grows_its_reservation_and_runs(make) -> None:
    """The same worker with 256 MiB: the reservation grows from the declared 1 MiB to what the program needs."""
    w = make(256 * MIB, 1 * MIB)
    load(w, 2048)
    assert 32 * MIB < w.registry.reserved_bytes() < 256 * MIB
