"""offload()'s training helpers against their torch counterparts on a local reference: global gradient
clipping across stages (GPT-2's tied embeddings held by the first and the last stage), LR schedulers on
the RemoteOptimizer, the optimizer's state, the weights and save_pretrained; and what model.stages() and
each worker's /status show about a running job.

One LocalSwarm of 2 workers serves the module; each test closes its model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import offload_cases as C
import pytest
import torch

import tensorlink

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

GPT2 = C.MODELS["gpt2"]


@pytest.fixture(scope="module")
def swarm() -> Iterator[tensorlink.LocalSwarm]:
    with C.swarm(2) as s:
        yield s


def test_clip_grad_norm_equals_torch_clip_grad_norm(swarm: tensorlink.LocalSwarm) -> None:
    max_norm = 0.5
    totals: list[tuple[torch.Tensor, torch.Tensor]] = []

    def clip(run: C.Run) -> None:
        got = run.model.clip_grad_norm_(max_norm)
        want = torch.nn.utils.clip_grad_norm_(run.ref.parameters(), max_norm)
        totals.append((got, want))

    run = C.train_side_by_side(swarm, GPT2, workers=2, steps=4, before_step=clip)
    try:
        for step, (got, want) in enumerate(totals):
            assert isinstance(got, torch.Tensor) and got.dim() == 0
            assert C.rel(got, want) <= C.PARAM_RTOL, f"step {step}: total norm {float(got)} != {float(want)}"
        assert all(float(want) > max_norm for _, want in totals), "the test needs clipping to happen"
        C.assert_losses_close(run.losses, run.ref_losses)
        C.assert_state_close(run.model.state_dict(), run.ref.state_dict())
    finally:
        run.model.close()


def test_step_lr_scheduler_sets_the_workers_learning_rate(swarm: tensorlink.LocalSwarm) -> None:
    steps = 6
    schedulers: list[Any] = []

    def make(run: C.Run) -> None:
        schedulers.append(torch.optim.lr_scheduler.StepLR(run.opt, step_size=2, gamma=0.1))
        schedulers.append(torch.optim.lr_scheduler.StepLR(run.ref_opt, step_size=2, gamma=0.1))

    def advance(run: C.Run) -> None:
        for scheduler in schedulers:
            scheduler.step()

    run = C.train_side_by_side(swarm, GPT2, workers=2, steps=steps, setup=make, after_step=advance)
    try:
        assert run.opt.param_groups[0]["lr"] == pytest.approx(C.LR * 0.1**3)
        assert run.opt.param_groups[0]["lr"] == run.ref_opt.param_groups[0]["lr"]
        got = run.model.state_dict()
        C.assert_state_close(got, run.ref.state_dict())
        # Control: without the scheduler the weights end elsewhere, so the workers did use the new lr.
        torch.manual_seed(0)
        plain = GPT2.build()
        opt = C.adamw(plain.parameters())
        for step in range(steps):
            C.reference_loss(plain, GPT2.batch(step)).backward()
            opt.step()
            opt.zero_grad()
        assert C.state_errors(got, plain.state_dict()), "a constant lr gives the same weights: the test shows nothing"
    finally:
        run.model.close()


def test_optimizer_state_dict_holds_adamw_state_of_every_parameter(swarm: tensorlink.LocalSwarm) -> None:
    run = C.train_side_by_side(swarm, GPT2, workers=2, steps=3)
    try:
        sd = run.opt.state_dict()
        assert sd["name"] == "AdamW"
        group = sd["param_groups"][0]
        assert group["lr"] == C.LR and group["weight_decay"] == C.WEIGHT_DECAY
        names = dict(run.ref.named_parameters())  # the tied wte/lm_head once, as torch's optimizer sees it
        assert set(sd["state"]) == set(names)
        got, want = {}, {}
        for name, param in names.items():
            ref_state = run.ref_opt.state[param]
            assert set(sd["state"][name]) >= {"exp_avg", "exp_avg_sq", "step"}, name
            assert float(sd["state"][name]["step"]) == float(ref_state["step"]) == 3
            for key in ("exp_avg", "exp_avg_sq"):
                got[f"{name}:{key}"] = sd["state"][name][key]
                want[f"{name}:{key}"] = ref_state[key]
        errors = C.state_errors(got, want)
        assert not errors, "optimizer state differs from the local AdamW's:\n" + "\n".join(errors)
    finally:
        run.model.close()


def test_state_dict_and_save_pretrained_give_the_trained_weights(swarm: tensorlink.LocalSwarm, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    run = C.train_side_by_side(swarm, GPT2, workers=2, steps=3)
    try:
        state = run.model.state_dict()
        assert list(state) == list(GPT2.build().state_dict())  # the original module's names, in its order
        C.assert_state_close(state, run.ref.state_dict())
        run.model.save_pretrained(str(tmp_path / "trained"))
        loaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "trained"))
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        loaded_state = loaded.state_dict()
        assert set(loaded_state) == set(state)
        for name, tensor in state.items():
            assert torch.equal(loaded_state[name], tensor), name
        initial = GPT2.build().state_dict()
        name = "transformer.h.0.mlp.c_fc.weight"
        assert not torch.equal(loaded_state[name], initial[name])  # trained weights, not the initial ones
    finally:
        run.model.close()


def test_stages_and_worker_status_show_the_job(swarm: tensorlink.LocalSwarm) -> None:
    run = C.train_side_by_side(swarm, GPT2, workers=2, steps=2)
    try:
        model = run.model
        stages = model.stages()
        workers = {w.peer_id: w for w in swarm.workers}
        assert [s["stage"] for s in stages] == [0, 1]
        assert {s["where"] for s in stages} == set(workers)  # both workers, none on this machine
        held = [set(s["params"]) for s in stages]
        assert set().union(*held) == set(dict(run.ref.named_parameters()))
        # GPT-2's tied embedding: the first stage embeds with it, the last one projects with it
        assert all("transformer.wte.weight" in h for h in held)
        assert all(s["parameters"] > 0 for s in stages)

        job = model.pipeline.job_id.hex()
        owner = model.client.peer_id
        for stage in stages:
            worker = workers[stage["where"]]
            status = worker.status()
            (session,) = [r for r in status["running"] if r["job"] == job]
            assert session["stage"] == stage["stage"] and session["n_stages"] == 2
            assert session["optimizer"] == "AdamW"
            assert session["steps"] == 2
            assert "train" in session["programs"]
            assert session["links"] == (["next", "user"] if stage["stage"] == 0 else ["prev", "user"])
            other = next(p for p in workers if p != worker.peer_id)
            channels = [c for c in status["data_plane"]["channels"] if c["job"] == job and c["closed"] is None]
            assert {c["peer"] for c in channels} == {owner, other}, channels
            assert all(c["kind"] == "direct" for c in channels), channels
    finally:
        run.model.close()
