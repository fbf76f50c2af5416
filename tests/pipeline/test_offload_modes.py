"""An offloaded model behaves like a local module across modes: ``eval()`` before ``offload()``,
``torch.no_grad()``, ``generate()`` as the first call, other batch sizes, a switch to training later, and
errors that leave the next call working or failing at once (never waiting on workers).

Real worker processes (LocalSwarm); numbers are compared with the same model run here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import offload_cases as C
import pytest
import torch

import tensorlink
from tensorlink.ir.split import profile
from tensorlink.pipeline.job import PipelineError
from tensorlink.pipeline.offload import _example
from tensorlink.pipeline.programs import capture_program
from tensorlink.stage.runtime import OPTIMIZER_SLOTS
from tensorlink.validator.partition import declare, unit_memory

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

ATOL = 1e-5  # float32 logits of the same program, run in pieces on the workers and whole here
BATCH, SEQ = 4, 8


@pytest.fixture(scope="module")
def swarm() -> Iterator[tensorlink.LocalSwarm]:
    with C.swarm(2) as s:
        yield s


def ids(batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, C.M.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def running(swarm: tensorlink.LocalSwarm, job: bytes) -> list[dict]:
    """The stages of ``job`` on every worker, as its status reports them."""
    return [s for w in swarm.workers for s in w.status()["running"] if s["job"] == job.hex()]


def test_eval_before_offload_runs_an_eval_only_job(swarm: tensorlink.LocalSwarm) -> None:
    """model.eval() then offload(): every forward works (with and without no_grad, other batch sizes and
    lengths in the captured range) and equals local eval; the job holds only the eval program, no optimizer
    and no gradients. A forward after model.train() opens a training job and trains like local training."""
    torch.manual_seed(0)
    module, ref = C.M.gpt2(n_layer=2), C.M.gpt2(n_layer=2)
    module.eval()
    ref.eval()
    model = tensorlink.offload(module, network=swarm, workers=2, micro_batches=C.MICRO_BATCHES)
    try:
        with torch.no_grad():
            got = model(input_ids=ids()).logits
        torch.testing.assert_close(got, ref(input_ids=ids()).logits, atol=ATOL, rtol=0)
        got = model(input_ids=ids(seed=1)).logits  # grad enabled, eval mode: as locally, no training job for it
        torch.testing.assert_close(got, ref(input_ids=ids(seed=1)).logits.detach(), atol=ATOL, rtol=0)
        captured = model.pipeline.programs["eval"]
        for batch, seq in [(2, 8), (4, 5), (1, 3)]:  # within the captured ranges: no re-capture, no refusal
            x = ids(batch, seq, seed=batch + seq)
            with torch.no_grad():
                torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, atol=ATOL, rtol=0)
        assert model.pipeline.programs["eval"] is captured
        with pytest.raises(tensorlink.OffloadError, match="the first call sets the largest micro-batch"):
            model(input_ids=ids(2 * BATCH))  # beyond the captured range: refused before anything is sent
        with torch.no_grad():  # other inputs (labels too): the eval program is captured again for them
            got = model(input_ids=ids(), labels=ids(seed=3))
            want = C.reference_loss(ref, {"input_ids": ids(), "labels": ids(seed=3)})
        torch.testing.assert_close(got.loss, want, atol=ATOL, rtol=0)
        job = model.pipeline.job_id
        stages = running(swarm, job)
        assert len(stages) == 2
        for stage in stages:
            assert stage["programs"] == ["eval"] and stage["optimizer"] is None and stage["parameters"] == 0, stage
        assert model.fetch() is module  # nothing trained: the module's own weights are current

        model.train()
        ref.train()
        opt = model.optimizer(torch.optim.AdamW, lr=C.LR, weight_decay=C.WEIGHT_DECAY)
        ref_opt = C.adamw(ref.parameters())
        batch = C.MODELS["gpt2"].batch(0)
        loss = model(**batch).loss
        loss.backward()
        ref_loss = C.reference_loss(ref, batch)
        ref_loss.backward()
        opt.step()
        ref_opt.step()
        C.assert_losses_close([float(loss)], [float(ref_loss)])
        assert running(swarm, job) == []  # the eval-only job was closed, a training job opened
        assert model.pipeline.job_id != job
        C.assert_state_close(model.state_dict(), ref.state_dict())
        model.eval()
        ref.eval()
        with torch.no_grad():  # the eval program of the training job shares its trained weights
            torch.testing.assert_close(model(input_ids=ids()).logits, ref(input_ids=ids()).logits, atol=ATOL, rtol=0)
        (first, *_) = running(swarm, model.pipeline.job_id)
        assert first["programs"] == ["eval", "train"] and first["optimizer"] == "AdamW", first
    finally:
        model.close()


def test_generate_as_the_first_call(swarm: tensorlink.LocalSwarm) -> None:
    """generate() before any forward opens a generation-only job; greedy tokens equal HF's."""
    torch.manual_seed(0)
    module, ref = C.M.gpt2(n_layer=2), C.M.gpt2(n_layer=2)
    ref.eval()
    model = tensorlink.offload(module, network=swarm, workers=2)
    try:
        prompt = ids(2, 4, seed=7)
        got = model.generate(prompt, max_new_tokens=6)
        want = ref.generate(prompt, do_sample=False, max_new_tokens=6, attention_mask=torch.ones_like(prompt))
        assert got.tolist() == want.tolist()
        for stage in running(swarm, model.pipeline.job_id):
            assert stage["programs"] == ["generate"] and stage["optimizer"] is None, stage
    finally:
        model.close()


def test_an_inference_job_declares_no_gradients_or_optimizer_state() -> None:
    """What the owner declares for a job that never trains: weights once, one eval forward, no gradient or
    optimizer copies; well under what the same model declares for training."""
    module = C.M.gpt2(n_layer=2).eval()
    first = {"input_ids": ids(2, SEQ)}
    program = capture_program(module, *_example([], first), train=False, max_seq_len=module.config.n_positions)
    symbols = program.whole.program.signature.symbols
    units = profile(program.whole, {name: high for name, (_, high) in symbols.items()})
    params = sum(u.param_bytes for u in units)
    infer = sum(unit_memory(declare(u, optimizer_slots=0, kept=1, train=False), 0) for u in units)
    slots = OPTIMIZER_SLOTS["AdamW"]
    train = sum(unit_memory(declare(u, optimizer_slots=slots, kept=1), slots) for u in units)
    assert params <= infer < params + (train - 4 * params), (params, infer, train)
    assert train >= 4 * params  # weights, gradients and AdamW's two copies


def test_a_set_up_error_leaves_the_next_call_working(swarm: tensorlink.LocalSwarm) -> None:
    """A stage that refuses its program during set-up (an eval-mode program loaded for training, the error
    users met with eval() before offload()): one PipelineError naming the stage and worker, no group; the
    job is released and the next forward sets up again and works, without waiting on anything."""
    torch.manual_seed(0)
    module, ref = C.M.gpt2(n_layer=2), C.M.gpt2(n_layer=2)
    module.eval()
    ref.eval()
    model = tensorlink.offload(module, network=swarm, workers=2)
    try:
        wrong = capture_program(module, *_example([], {"input_ids": ids()}), train=False, max_seq_len=64)
        with pytest.raises(PipelineError) as info:
            model.remote.open(wrong, "train")
        assert "captured in eval mode" in str(info.value) and "stage " in str(info.value), info.value
        assert model.remote.pipeline is None
        started = time.monotonic()
        with torch.no_grad():
            got = model(input_ids=ids()).logits
        assert time.monotonic() - started < 30.0
        torch.testing.assert_close(got, ref(input_ids=ids()).logits, atol=ATOL, rtol=0)
    finally:
        model.close()


def test_after_a_failed_step_the_next_call_fails_at_once() -> None:
    """A worker that goes away mid-job: the step fails with one PipelineError; every later call fails at once
    naming that error (the workers' state is gone), instead of waiting out a deadline."""
    with C.swarm(1) as swarm:
        model = tensorlink.offload(C.M.mlp_loss(), network=swarm, workers=1)
        try:
            x, y = C.M.mlp_loss_inputs(BATCH, SEQ)
            model(x, y)
            swarm.workers[0].stop()
            with pytest.raises(PipelineError) as info:
                model(x, y)
            started = time.monotonic()
            with pytest.raises(PipelineError, match="failed earlier and was closed") as again:
                model(x, y)
            assert time.monotonic() - started < 1.0
            assert str(info.value) in str(again.value)
        finally:
            model.close()
