"""offload() refuses what it cannot do before any work starts, with an exception that says what to change:
a model torch.export cannot capture, more workers than the network has, a worker without the memory for
its stage, an optimizer that is not one of torch's own.

One LocalSwarm of 2 workers serves the module; the second offers almost no memory (--max-memory).
"""

from __future__ import annotations

from collections.abc import Iterator

import offload_cases as C
import pytest
import torch
from torch import nn

import tensorlink
from tensorlink.validator.matching import JobRefused

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

TINY_GB = 1e-5  # 10 kB: less than GPT-2's token embedding alone


@pytest.fixture(scope="module")
def swarm() -> Iterator[tensorlink.LocalSwarm]:
    with C.swarm(2, worker_memory_gb=[2.0, TINY_GB]) as s:
        yield s


def no_work_started(swarm: tensorlink.LocalSwarm) -> None:
    for worker in swarm.workers:
        status = worker.status()
        assert status["running"] == [] and status["stages"] == [], f"{worker.name}: {status['stages']}"


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if h.sum() > 0:
            return h.relu().mean()
        return h.mean()


def test_a_model_torch_export_cannot_capture(swarm: tensorlink.LocalSwarm) -> None:
    torch.manual_seed(0)
    model = tensorlink.offload(DataDependent(), network=swarm, workers=1)
    try:
        with pytest.raises(tensorlink.OffloadError, match="cannot be captured") as info:
            model(torch.randn(4, 8))
        message = str(info.value)
        assert "data-dependent" in message.lower() or "control flow" in message.lower(), message
        no_work_started(swarm)
    finally:
        model.close()


def test_the_capture_error_names_the_line_and_the_remedy(swarm: tensorlink.LocalSwarm) -> None:
    model = tensorlink.offload(DataDependent(), network=swarm, workers=1)
    try:
        with pytest.raises(tensorlink.OffloadError) as info:
            model(torch.randn(4, 8))
        message = str(info.value)
        assert "if h.sum() > 0" in message or "test_offload_errors.py" in message, message
        assert "torch.where" in message or "torch.cond" in message, message
    finally:
        model.close()


def test_more_workers_than_the_network_has(swarm: tensorlink.LocalSwarm) -> None:
    model = tensorlink.offload(C.M.mlp_loss(), network=swarm, workers=3)
    try:
        with pytest.raises(JobRefused) as info:
            model(*C.M.mlp_loss_inputs(4, 8))
        assert info.value.code == "too_few_workers"
        assert "asks for 3 workers" in info.value.message and "ask for at most 2" in info.value.message
        no_work_started(swarm)
    finally:
        model.close()


def test_a_worker_without_the_memory_for_its_stage(swarm: tensorlink.LocalSwarm) -> None:
    tiny = next(w for w in swarm.workers if w.status()["capability"]["memory_bytes"] <= TINY_GB * 1e9)
    model = tensorlink.offload(C.M.gpt2(n_layer=2), network=swarm, workers=2, outputs="loss")
    try:
        with pytest.raises(JobRefused) as info:
            model(**C.M.lm_inputs(4, 8))
        assert info.value.code == "not_enough_memory"
        assert tiny.peer_id in info.value.message, info.value.message
        assert "more memory" in info.value.message
        no_work_started(swarm)
    finally:
        model.close()


class MySGD(torch.optim.SGD):
    pass


def test_optimizers_not_on_the_allow_list(swarm: tensorlink.LocalSwarm) -> None:
    model = tensorlink.offload(C.M.mlp_loss(), network=swarm, workers=1)
    try:
        with pytest.raises(TypeError, match=r"MySGD is not one of torch's optimizers .*AdamW"):
            model.optimizer(MySGD, lr=0.1)
        with pytest.raises(TypeError, match=r"LBFGS is not one of torch's optimizers .*SGD"):
            model.optimizer(torch.optim.LBFGS, lr=0.1)
        with pytest.raises(TypeError, match=r"'Lion' is not allowed; use one of .*AdamW"):
            model.optimizer("Lion", lr=0.1)
        with pytest.raises(TypeError, match=r"hyper-parameters not allowed here: foreach"):
            model.optimizer(torch.optim.AdamW, lr=0.1, foreach=True)
        with pytest.raises(TypeError, match="numbers, booleans or tuples of numbers only"):
            model.optimizer(torch.optim.AdamW, lr=torch.tensor(0.1))
        no_work_started(swarm)
    finally:
        model.close()
