"""offload() trains like local training: GPT-2 (tied embeddings), Llama and a custom MLP with its own loss,
over 2 and 3 real worker processes, against the same model trained here with the same micro-batches.

One LocalSwarm of 3 workers serves every test of this module (2-worker jobs use two of them); each test
closes its model, which releases the workers for the next.
"""

from __future__ import annotations

from collections.abc import Iterator

import offload_cases as C
import pytest
import torch
import torch.nn.functional as F

import tensorlink

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

STEPS = 10


@pytest.fixture(scope="module")
def swarm() -> Iterator[tensorlink.LocalSwarm]:
    with C.swarm(3) as s:
        yield s


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("name", ["gpt2", "llama", "mlp"])
def test_training_equals_local_training(swarm: tensorlink.LocalSwarm, name: str, workers: int) -> None:
    case = C.MODELS[name]
    run = C.train_side_by_side(swarm, case, workers=workers, steps=STEPS)
    try:
        stages = run.model.stages()
        assert len(stages) == workers and all(s["where"] != "this machine" for s in stages)
        assert len({s["where"] for s in stages}) == workers
        C.assert_losses_close(run.losses, run.ref_losses)
        assert run.losses[9] < run.losses[0]  # the same batch: the model learned
        C.assert_state_close(run.model.state_dict(), run.ref.state_dict())
    finally:
        run.model.close()


def test_gpt2_outputs_all_gpipe_loss_computed_here(swarm: tensorlink.LocalSwarm) -> None:
    """outputs="all": the logits come back, the loss is computed in this process and back-propagated
    through the pipeline after the forward (GPipe schedule)."""
    torch.manual_seed(0)
    module, ref = C.M.gpt2(n_layer=2), C.M.gpt2(n_layer=2)
    model = tensorlink.offload(module, network=swarm, workers=2, micro_batches=C.MICRO_BATCHES, schedule="gpipe")
    try:
        opt = model.optimizer(torch.optim.AdamW, lr=C.LR, weight_decay=C.WEIGHT_DECAY)
        ref_opt = C.adamw(ref.parameters())

        def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

        losses, ref_losses = [], []
        for step in range(5):
            batch = C.MODELS["gpt2"].batch(step)
            out = model(input_ids=batch["input_ids"])
            assert out.loss is None and out.logits.shape == (C.BATCH, C.SEQ, C.M.VOCAB)
            assert out.logits.requires_grad
            loss = lm_loss(out.logits, batch["labels"])
            loss.backward()
            ref_logits = torch.cat([ref(input_ids=c).logits for c in batch["input_ids"].tensor_split(C.MICRO_BATCHES)])
            assert C.rel(out.logits, ref_logits) <= C.PARAM_RTOL
            ref_loss = lm_loss(ref_logits, batch["labels"])
            ref_loss.backward()
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
            losses.append(float(loss.detach())), ref_losses.append(float(ref_loss.detach()))
        C.assert_losses_close(losses, ref_losses)
        C.assert_state_close(model.state_dict(), ref.state_dict())
    finally:
        model.close()


@pytest.mark.parametrize("outputs", ["all", "loss"])
def test_gradient_of_a_float_input_comes_back(swarm: tensorlink.LocalSwarm, outputs: str) -> None:
    """An input that requires grad gets the same .grad as locally, in both backward modes (after the
    forward, and fused into it)."""
    torch.manual_seed(0)
    module, ref = C.M.mlp_loss(), C.M.mlp_loss()
    model = tensorlink.offload(module, network=swarm, workers=2, micro_batches=C.MICRO_BATCHES, outputs=outputs)
    try:
        for step in range(2):
            batch = C.MODELS["mlp"].batch(step)
            x = batch["x"].clone().requires_grad_(True)
            x_ref = batch["x"].clone().requires_grad_(True)
            loss = model(x, batch["y"])
            loss.backward()
            ref_loss = C.reference_loss(ref, {"x": x_ref, "y": batch["y"]})
            ref_loss.backward()
            assert x.grad is not None, f"step {step}: the input got no gradient"
            assert x.grad.shape == x.shape
            assert C.rel(x.grad, x_ref.grad) <= C.PARAM_RTOL, f"step {step}: {C.rel(x.grad, x_ref.grad):.2e}"
            C.assert_losses_close([float(loss.detach())], [float(ref_loss.detach())])
            ref.zero_grad()
    finally:
        model.close()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_generate_after_training_equals_hf_generate(swarm: tensorlink.LocalSwarm, name: str) -> None:
    run = C.train_side_by_side(swarm, C.MODELS[name], workers=2, steps=3)
    try:
        g = torch.Generator().manual_seed(42)
        prompt = torch.randint(1, C.M.VOCAB, (2, 4), generator=g)
        new = 12
        got = run.model.generate(prompt, max_new_tokens=new)
        run.ref.eval()
        want = run.ref.generate(prompt, do_sample=False, max_new_tokens=new, attention_mask=torch.ones_like(prompt))
        # HF stops when every row has produced eos (rows already done get pad = eos); offload's generate too
        assert got.shape[1] > prompt.shape[1]
        assert torch.equal(got[:, : prompt.shape[1]], prompt)
        assert got.tolist() == want.tolist()
    finally:
        run.model.close()
