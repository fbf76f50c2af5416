"""StageRuntime over in-process links: two runtimes hold the two halves of a small MLP (captured and split with
tensorlink.ir, loaded from their IR bytes as a worker loads them), the test plays the owner on LocalLink pairs, and two
1F1B steps with fused backward, each followed by an SGD step (momentum carries over), give the losses and parameters
that eager PyTorch gives on the same model and data (float32, relative tolerance 1e-5). And the strict mailbox (the
owner's) takes only the frames it expects, each once."""

from __future__ import annotations

import copy

import pytest
import torch
import trio
from torch import nn

from tensorlink.ir import capture
from tensorlink.ir.split import split
from tensorlink.pipeline.driver import slots
from tensorlink.stage.links import Announced, FrameRefused, Lane, LocalLink, Mailbox
from tensorlink.stage.runtime import StageRuntime
from tensorlink.wire.stage import RunStep

JOB = b"s" * 16
MICRO_BATCHES = 3
STEPS = 2
SGD = {"lr": 0.1, "momentum": 0.9}  # not Adam: Adam would hide a wrongly scaled gradient
RTOL = 1e-5  # float32: the stages run the same aten ops as eager, in the same order


class MLPLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.net(x) - y).pow(2).mean()


def data(step: int, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + mb)
    return torch.randn(3, 8, generator=g), torch.randn(3, 4, generator=g)


def eager(model: nn.Module) -> tuple[list[float], dict[str, torch.Tensor]]:
    """What the pipeline should compute: per step, each micro-batch's loss back-propagated scaled by 1/m, then SGD."""
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        for mb in range(MICRO_BATCHES):
            loss = model(*data(step, mb))
            loss.backward(torch.tensor(1 / MICRO_BATCHES))
            losses.append(loss.item())
        optimizer.step()
    return losses, {name: p.detach() for name, p in model.named_parameters()}


async def pipelined(model: nn.Module) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same steps on two StageRuntimes (net.0 on stage 0, net.2 on stage 1), the test as their owner."""
    program = capture(model, data(0, 0))
    sp = split(program, {name: 0 if name.startswith("net.0") else 1 for name in program.program.parameters}, 2)
    owner_0, user_0 = LocalLink.pair()
    owner_1, user_1 = LocalLink.pair()
    forward, backward = LocalLink.pair()
    stages = [
        StageRuntime(JOB, 0, 2, {"user": user_0, "next": forward}),
        StageRuntime(JOB, 1, 2, {"user": user_1, "prev": backward}),
    ]
    owners = [owner_0, owner_1]
    for k, rt in enumerate(stages):
        rt.load("train", sp.parts[k].program.to_bytes(), *slots(sp, k))
        rt.make_optimizer("SGD", SGD)
    losses = []
    for step in range(STEPS):
        for mb in range(MICRO_BATCHES):
            for i, value in enumerate(data(step, mb)):
                await owners[sp.input_stage[sp.user_inputs[i]]].send(Lane.USER_IN, step, mb, i, value)
        cmd = RunStep(
            key="train", step=step, micro_batches=MICRO_BATCHES, schedule="1f1b", backward="fused",
            loss_output=0, loss_scale=1 / MICRO_BATCHES, to_user=[0],
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            for rt in stages:
                nursery.start_soon(rt.run_step, cmd)
        losses += [(await owner_1.recv(Lane.USER_OUT, step, mb, 0)).item() for mb in range(MICRO_BATCHES)]
        for rt in stages:
            rt.commit(step, 1.0)
            rt.optimizer_step(SGD)
            rt.zero_grad()
    params = {name: p.detach() for rt in stages for name, p in rt.parameters().items()}
    return losses, params


async def test_two_stages_train_as_eager_pytorch_does() -> None:
    torch.manual_seed(0)
    model = MLPLoss()
    expected_losses, expected_params = eager(copy.deepcopy(model))
    losses, params = await pipelined(model)
    assert losses == pytest.approx(expected_losses, rel=RTOL)
    assert sorted(params) == sorted(expected_params)
    for name, value in params.items():
        torch.testing.assert_close(value, expected_params[name], rtol=RTOL, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert not any(torch.equal(params[n], p) for n, p in model.named_parameters()), "the step changed no parameter"


async def test_a_strict_mailbox_takes_only_expected_frames_once() -> None:
    mailbox = Mailbox(strict=True)
    tensor = torch.ones(2, 3)
    frame = Announced.of_tensor(tensor)
    key = (int(Lane.USER_OUT), 0, 1, 0)
    with pytest.raises(FrameRefused, match=r"an unsolicited USER_OUT frame of step 0, micro-batch 1, index 0"):
        mailbox.admit(key, frame)
    mailbox.expect(key, lambda got: None if got.shape == (2, 3) else f"shape {got.shape}, expected (2, 3)")
    mailbox.admit(key, frame)
    mailbox.put(key, tensor)
    assert mailbox.buffered_bytes == tensor.nbytes
    with pytest.raises(FrameRefused, match="a duplicate USER_OUT frame .* still unread"):
        mailbox.admit(key, frame)
    assert torch.equal(await mailbox.get(key), tensor)
    assert mailbox.buffered_bytes == 0
    with trio.move_on_after(0.05) as waited:
        await mailbox.get(key)
    assert waited.cancelled_caught, "a frame was delivered twice"
    wrong = (int(Lane.USER_OUT), 0, 2, 0)
    mailbox.expect(wrong, lambda got: None if got.shape == (2, 3) else f"shape {got.shape}, expected (2, 3)")
    with pytest.raises(FrameRefused, match=r"a wrong USER_OUT frame .*: shape \(3, 2\), expected \(2, 3\)"):
        mailbox.admit(wrong, Announced.of_tensor(torch.ones(3, 2)))


async def test_a_worker_mailbox_refuses_a_repeated_frame_and_counts_each_byte_once() -> None:
    """A neighbour that repeats a frame cannot pin the stage's room to buffer frames: the copy is refused while
    the first is unread, so buffered bytes go back to 0 once it is taken; after that the key may come again."""
    mailbox = Mailbox()
    tensor = torch.ones(4)
    key = (int(Lane.FWD), 3, 0, 0)
    mailbox.admit(key, Announced.of_tensor(tensor))
    mailbox.put(key, tensor)
    with pytest.raises(FrameRefused, match=r"a duplicate FWD frame of step 3, micro-batch 0, index 0"):
        mailbox.admit(key, Announced.of_tensor(tensor))
    assert mailbox.buffered_bytes == tensor.nbytes
    assert torch.equal(await mailbox.get(key), tensor)
    assert mailbox.buffered_bytes == 0
    mailbox.admit(key, Announced.of_tensor(tensor))
    mailbox.put(key, tensor)
    assert mailbox.buffered_bytes == tensor.nbytes
