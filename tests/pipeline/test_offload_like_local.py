"""An offloaded model where HF code and torch habits expect a local module: HF's attributes, torch's
parameter-taking utilities (refused, pointing to the remote ones), dtype and device changes (taking effect on
the workers, or refused), ``torch.autocast`` (refused), ``load_state_dict`` (the workers run the loaded weights)
and LR schedulers on the remote optimizer (training equals local training with the same scheduler).

Real worker processes (LocalSwarm); numbers are compared with the same model run here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import offload_cases as C
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

import tensorlink
from tensorlink.pipeline.remote import OffloadError

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

ATOL = 1e-5  # float32 logits of the same program, run in pieces on the workers and whole here
BF16_ATOL = 2e-2  # bfloat16 logits (8 bits of mantissa) of the same program; the logits are of order 1
GPT2 = C.MODELS["gpt2"]


@pytest.fixture(scope="module")
def swarm() -> Iterator[tensorlink.LocalSwarm]:
    with C.swarm(2) as s:
        yield s


def ids(batch: int = 4, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, C.M.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def gpt2(seed: int = 0) -> torch.nn.Module:
    return C.M.gpt2(n_layer=2, seed=seed).eval()


def test_hf_attributes_and_parameter_utilities(swarm: tensorlink.LocalSwarm) -> None:
    """config, generation_config, name_or_path... read through; device is this machine's CPU; dtype, the
    parameter count and can_generate() as the local module's. Submodules, weights and methods are not
    delegated. torch's optimizers and clip_grad_norm_ fail at once naming the remote way. None of it starts
    the pipeline."""
    module = gpt2()
    model = tensorlink.offload(module, network=swarm, workers=2)
    mlp = tensorlink.offload(C.M.mlp_loss(), network=swarm, workers=1)
    try:
        assert model.config is module.config and model.generation_config is module.generation_config
        assert model.name_or_path == module.name_or_path and model.main_input_name == "input_ids"
        assert model.device == torch.device("cpu") and model.dtype == torch.float32
        for kw in [{}, {"only_trainable": True}, {"exclude_embeddings": True}]:
            assert model.num_parameters(**kw) == module.num_parameters(**kw), kw
        assert model.num_parameters(exclude_embeddings=True) < model.num_parameters()
        assert model.can_generate() and not mlp.can_generate()
        plain = mlp.local
        assert mlp.num_parameters() == sum(p.numel() for p in plain.parameters()) > 0
        for name in ["transformer", "lm_head", "get_input_embeddings"]:  # a submodule, a weight's owner, a method
            with pytest.raises(AttributeError, match="not available on the offloaded model"):
                getattr(model, name)
        with pytest.raises(AttributeError):
            model.no_such_attribute  # noqa: B018
        with pytest.raises(OffloadError, match=r"model\.optimizer\(torch\.optim\.AdamW"):
            torch.optim.AdamW(model.parameters(), lr=1e-3)
        with pytest.raises(OffloadError, match=r"model\.clip_grad_norm_\(max_norm\)"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with pytest.raises(OffloadError, match="parameters live on the workers"):
            dict(model.named_parameters())
        assert model.remote.pipeline is None and mlp.remote.pipeline is None
    finally:
        model.close()
        mlp.close()


def test_dtype_and_device_changes(swarm: tensorlink.LocalSwarm) -> None:
    """Changes that are already so are no-ops (the job stays); .bfloat16() after the first call sets the
    pipeline up again in bfloat16 (.float() back again), and .half() before it offloads float16 weights;
    .cuda(), .to("cuda") and torch.autocast are refused saying what to do instead."""
    torch.manual_seed(0)
    module, ref = gpt2(), gpt2()
    model = tensorlink.offload(module, network=swarm, workers=2)
    try:
        torch.testing.assert_close(logits(model, ids()), logits(ref, ids()), atol=ATOL, rtol=0)
        job = model.pipeline.job_id
        for same in [model.to("cpu"), model.float(), model.cpu(), model.to("cpu", torch.float)]:
            assert same is model
        assert model.pipeline.job_id == job, "a change to what already is restarted the job"
        for refused in [model.cuda, lambda: model.to("cuda"), lambda: model.to("cuda:0", torch.float16)]:
            with pytest.raises(OffloadError, match="stay on this machine's CPU"):
                refused()
        for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]:  # else autocast turns itself off
            with pytest.raises(OffloadError, match=rf"torch\.autocast\('{device}'\) does not reach the workers"):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=True):
                    model(input_ids=ids())
        with pytest.raises(OffloadError, match="floating dtype"):
            model.to(torch.int64)
        with pytest.raises(OffloadError, match="cannot reach the weights"):
            model.type(torch.float64)

        assert model.bfloat16() is model
        ref.bfloat16()
        assert model.dtype == torch.bfloat16 and module.transformer.wte.weight.dtype == torch.bfloat16
        got = logits(model, ids())
        assert got.dtype == torch.bfloat16, "the workers still run float32"
        assert model.pipeline.job_id != job
        torch.testing.assert_close(got.float(), logits(ref, ids()).float(), atol=BF16_ATOL, rtol=0)
        model.float()  # back to float32 (the bfloat16 values, exactly)
        ref.float()
        got = logits(model, ids())
        assert got.dtype == torch.float32 and model.dtype == torch.float32
        torch.testing.assert_close(got, logits(ref, ids()), atol=ATOL, rtol=0)
    finally:
        model.close()
    half = tensorlink.offload(gpt2(), network=swarm, workers=2).half()
    try:
        assert half.dtype == torch.float16 and half.remote.pipeline is None
        assert logits(half, ids()).dtype == torch.float16
    finally:
        half.close()


def test_load_state_dict(swarm: tensorlink.LocalSwarm) -> None:
    """Before the first call it loads into the local module; after it the workers run the loaded weights. Its
    result and errors (missing and unexpected keys, strict or not) are torch's; a tied weight loaded under
    one name changes the other too."""
    module, ref = gpt2(), gpt2()
    other, third = gpt2(seed=1), gpt2(seed=2)
    model = tensorlink.offload(module, network=swarm, workers=2)
    try:
        model.load_state_dict(other.state_dict())
        assert model.remote.pipeline is None
        torch.testing.assert_close(logits(model, ids()), logits(other, ids()), atol=ATOL, rtol=0)
        job = model.pipeline.job_id
        model.load_state_dict(third.state_dict())
        torch.testing.assert_close(logits(model, ids()), logits(third, ids()), atol=ATOL, rtol=0)
        assert model.pipeline.job_id != job

        state = other.state_dict()
        bad = {k: v for k, v in state.items() if k != "transformer.ln_f.bias"} | {"extra.weight": torch.zeros(1)}
        ref.load_state_dict(third.state_dict())
        with pytest.raises(RuntimeError) as want:
            ref.load_state_dict(bad)
        with pytest.raises(RuntimeError) as got:
            model.load_state_dict(bad)
        assert str(got.value) == str(want.value) and "Missing key(s)" in str(got.value)
        torch.testing.assert_close(logits(model, ids()), logits(ref, ids()), atol=ATOL, rtol=0)

        tied = {"transformer.wte.weight": third.state_dict()["transformer.wte.weight"] * 2}
        result = model.load_state_dict(tied, strict=False)
        assert result == ref.load_state_dict(tied, strict=False)
        assert "lm_head.weight" in result.missing_keys
        assert module.lm_head.weight is module.transformer.wte.weight
        torch.testing.assert_close(logits(model, ids()), logits(ref, ids()), atol=ATOL, rtol=0)
    finally:
        model.close()


def test_load_state_dict_after_training_keeps_the_trained_weights_it_does_not_replace(
    swarm: tensorlink.LocalSwarm,
) -> None:
    """strict=False with one tensor after two training steps: the workers then run the trained weights with that
    tensor replaced, as a local module would (the eval loss equals the local one)."""
    run = C.train_side_by_side(swarm, GPT2, workers=2, steps=2)
    try:
        part = {"transformer.h.0.mlp.c_fc.weight": torch.zeros_like(run.ref.transformer.h[0].mlp.c_fc.weight)}
        assert run.model.load_state_dict(part, strict=False) == run.ref.load_state_dict(part, strict=False)
        run.ref.eval()
        run.model.eval()
        batch = GPT2.batch(0)
        with torch.no_grad():  # outputs="loss": the loss is what comes back
            got, want = run.model(**batch).loss, C.reference_loss(run.ref, batch)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    finally:
        run.model.close()


def _one_cycle(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS)


STEPS = 6
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "OneCycleLR": _one_cycle,  # also cycles AdamW's beta1, which the test's optimizer was not given
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    "linear warmup (transformers)": lambda opt: get_linear_schedule_with_warmup(opt, 2, STEPS),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_lr_schedulers_on_the_remote_optimizer(swarm: tensorlink.LocalSwarm, name: str) -> None:
    """The scheduler's values (lr, and OneCycleLR's betas) reach the workers at every step: the weights equal
    local training with the same scheduler (PARAM_RTOL 1e-5, float32)."""
    schedulers: list[Any] = []

    def make(run: C.Run) -> None:
        schedulers.extend([SCHEDULERS[name](run.opt), SCHEDULERS[name](run.ref_opt)])

    def advance(run: C.Run) -> None:
        for scheduler in schedulers:
            scheduler.step()

    case = GPT2 if name == "OneCycleLR" else C.MODELS["mlp"]
    run = C.train_side_by_side(swarm, case, workers=2, steps=STEPS, setup=make, after_step=advance)
    try:
        group, ref_group = run.opt.param_groups[0], run.ref_opt.param_groups[0]
        assert group["lr"] == ref_group["lr"] and tuple(group["betas"]) == tuple(ref_group["betas"])
        C.assert_losses_close(run.losses, run.ref_losses)
        C.assert_state_close(run.model.state_dict(), run.ref.state_dict())
    finally:
        run.model.close()
