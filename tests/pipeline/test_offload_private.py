"""private=True: the first and the last stage run in this process, so token ids and labels never reach a
worker (generate() sends a stage that reads them the attention mask and positions, which its attention
needs). The workers run with --audit-inputs: their /status then lists the dtypes (per lane) and the
SHA-256 digest of every tensor the job's owner sent them, which the test compares with digests of every
input it used. A control run with private=False shows that the same check does find the ids there.

One LocalSwarm of 2 workers serves the module; each test closes its model.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import offload_cases as C
import pytest
import torch

import tensorlink
from tensorlink.stage.links import tensor_digest

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

GPT2 = C.MODELS["gpt2"]


@pytest.fixture(scope="module")
def swarm() -> Iterator[tensorlink.LocalSwarm]:
    with C.swarm(2, worker_flags=["--audit-inputs"]) as s:
        yield s


def secret_digests(batches: list[dict[str, torch.Tensor]], sequences: list[torch.Tensor]) -> dict[str, str]:
    """digest -> what it is, for every input and label tensor and each of its micro-batch slices."""
    out = {}
    for step, batch in enumerate(batches):
        for key, tensor in batch.items():
            out[tensor_digest(tensor)] = f"step {step} {key}"
            for m, part in enumerate(torch.tensor_split(tensor, C.MICRO_BATCHES)):
                out[tensor_digest(part)] = f"step {step} {key} micro-batch {m}"
    for i, ids in enumerate(sequences):
        out[tensor_digest(ids)] = f"generate: token ids, sequence {i}"
        for r in range(ids.shape[0]):
            out[tensor_digest(ids[r : r + 1])] = f"generate: token ids, sequence {i} row {r}"
    return out


def generation_inputs(prompt: torch.Size, end: int, cache_len: int) -> list[torch.Tensor]:
    """The attention masks (over the whole KV cache) and positions of each model call of an unpadded greedy
    generate(): the prompt, then one token at a time up to ``end`` positions. Workers need them for attention;
    they say where the cache is filled, not what the tokens are."""
    rows, n = prompt
    out = []
    for start, stop in [(0, n), *((e - 1, e) for e in range(n + 1, end))]:
        mask = torch.zeros(rows, cache_len, dtype=torch.bool)
        mask[:, :stop] = True
        out += [mask, torch.arange(start, stop).expand(rows, stop - start).contiguous()]
    return out


def audits(swarm: tensorlink.LocalSwarm, job: str) -> dict[str, dict[str, Any]]:
    """worker peer id -> what the owner of ``job`` sent it (the job's session must still be open)."""
    out = {}
    for worker in swarm.workers:
        for session in worker.status()["running"]:
            if session["job"] == job:
                assert "from_owner" in session, "the worker runs without --audit-inputs"
                out[worker.peer_id] = session["from_owner"]
    return out


def test_private_keeps_token_ids_and_labels_on_this_machine(swarm: tensorlink.LocalSwarm) -> None:
    steps = 3
    run = C.train_side_by_side(swarm, GPT2, workers=2, steps=steps, private=True)
    try:
        model = run.model
        stages = model.stages()
        assert len(stages) == 4
        assert stages[0]["where"] == stages[-1]["where"] == "this machine"
        assert {s["where"] for s in stages[1:-1]} == {w.peer_id for w in swarm.workers}
        # private mode trains like local training too
        C.assert_losses_close(run.losses, run.ref_losses)
        C.assert_state_close(model.state_dict(), run.ref.state_dict())

        prompt = torch.randint(1, C.M.VOCAB, (2, 4), generator=torch.Generator().manual_seed(42))
        generated = model.generate(prompt, max_new_tokens=5)
        run.ref.eval()
        assert generated.tolist() == run.ref.generate(prompt, do_sample=False, max_new_tokens=5).tolist()
        sampling: dict[str, Any] = dict(do_sample=True, top_k=20, max_new_tokens=5, pad_token_id=0)
        torch.manual_seed(3)  # the stages in this process leave the user's random stream alone
        sampled = model.generate(prompt, **sampling)
        torch.manual_seed(3)
        assert sampled.tolist() == run.ref.generate(prompt, **sampling).tolist()
        # every sequence generate() ran the model on (the prompt, then one token longer each time)
        sequences = [out[:, :n] for out in (generated, sampled) for n in range(prompt.shape[1], out.shape[1] + 1)]

        secrets = secret_digests([GPT2.batch(s) for s in range(steps)], sequences)
        cache = {tensor_digest(t): t for t in generation_inputs(prompt.shape, generated.shape[1], 64)}
        seen = audits(swarm, model.pipeline.job_id.hex())
        assert set(seen) == {w.peer_id for w in swarm.workers}
        for peer, audit in seen.items():
            assert audit["frames"] > 0 and audit["digests"], f"worker {peer}: the audit recorded nothing"
            leaked = [secrets[d] for d in audit["digests"] if d in secrets]
            assert not leaked, f"worker {peer} received: {leaked}"
            for lane, shapes in audit["integer_shapes"].items():
                # programs travel as uint8 bytes; user inputs only as the mask and positions below; any other
                # integers are 0-dim. Token ids (a batch of them) would have a shape.
                if lane not in ("BLOB", "USER_IN"):
                    assert shapes == [[]], f"worker {peer} got integer tensors of shapes {shapes} on lane {lane}"
            if "USER_IN" in audit["dtypes"]:  # a stage whose attention reads the mask and positions directly
                shapes = {tuple(t.shape) for t in cache.values()}
                assert {tuple(x) for x in audit["integer_shapes"]["USER_IN"]} <= shapes, audit["integer_shapes"]
                assert set(audit["dtypes"]["USER_IN"]) <= {"bool", "int64"}, audit["dtypes"]
                assert set(cache) <= set(audit["digests"]), "the mask and positions that came are not generate's"
    finally:
        run.model.close()


def test_control_without_private_the_audit_finds_the_ids(swarm: tensorlink.LocalSwarm) -> None:
    """The check above can fail: with private=False the first worker does receive the token ids."""
    run = C.train_side_by_side(swarm, GPT2, workers=2, steps=1, private=False)
    try:
        stages = run.model.stages()
        seen = audits(swarm, run.model.pipeline.job_id.hex())
        batch = GPT2.batch(0)
        first, last = seen[stages[0]["where"]], seen[stages[-1]["where"]]
        ids = [tensor_digest(p) for p in torch.tensor_split(batch["input_ids"], C.MICRO_BATCHES)]
        labels = [tensor_digest(p) for p in torch.tensor_split(batch["labels"], C.MICRO_BATCHES)]
        assert set(ids) <= set(first["digests"])
        assert set(labels) <= set(last["digests"])
        assert "int64" in first["dtypes"]["USER_IN"]
    finally:
        run.model.close()


# Four threads decode one stage program at once in a fresh process, with the GIL handed over as often as
# possible; the first decode of msgspec's Program/Manifest types builds their type info, and two threads
# doing that together crash the interpreter.
CONCURRENT_LOADS = textwrap.dedent(
    """
    import sys, threading
    from tensorlink.ir.program import StageProgram
    data = open(sys.argv[1], "rb").read()
    sys.setswitchinterval(1e-6)
    barrier = threading.Barrier(4)
    def load():
        barrier.wait()
        StageProgram.from_bytes(data)
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    """
)


def test_stage_programs_load_in_parallel_threads_without_crashing(tmp_path: Path) -> None:
    from tensorlink.ir import capture

    program = capture(C.M.mlp_loss(), C.M.mlp_loss_inputs(2, 8), max_seq_len=32, train=True)
    path = tmp_path / "stage.bin"
    path.write_bytes(program.to_bytes())
    for attempt in range(5):  # each attempt crashes in ~3 of 4 fresh processes while the bug is there
        proc = subprocess.run([sys.executable, "-c", CONCURRENT_LOADS, str(path)], capture_output=True, timeout=120)
        assert proc.returncode == 0, f"attempt {attempt}: exit {proc.returncode}\n{proc.stderr.decode()[-2000:]}"
