"""ReorderCache on a stage, in-process: beam search's cache reorder selects the KV-cache rows of the generation
program transformers' wrapper captures, and a hostile index is refused with the cache untouched."""

from __future__ import annotations

import msgspec
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tensorlink.pipeline.generation import capture_generation
from tensorlink.stage.runtime import KV_CACHE, StageError, StageRuntime
from tensorlink.wire.errors import WireError
from tensorlink.wire.stage import ReorderCache, decode_stage, encode_stage

pytestmark = pytest.mark.slow  # captures a program per model and batch size
BATCH = 3


@pytest.fixture(scope="module")
def program() -> bytes:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).eval()
    return capture_generation(model, BATCH, 8).whole.to_bytes()


def runtime(program: bytes) -> tuple[StageRuntime, dict[str, torch.Tensor]]:
    """A stage holding the generation program, each cache row filled with its row number (plus the buffer's
    place, so rows of different buffers differ)."""
    rt = StageRuntime(b"j" * 16, 0, 1, {})
    rt.load("generate", program, [], [])
    buffers = dict(rt.programs["generate"].module.named_buffers())
    for k, (name, buffer) in enumerate(sorted(buffers.items())):
        if KV_CACHE.search(name):
            buffer.copy_(torch.arange(BATCH, dtype=buffer.dtype).view(-1, 1, 1, 1) + 100 * k)
    return rt, buffers


def caches(buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in buffers.items() if KV_CACHE.search(name)}


def test_the_wrappers_cache_buffers_are_what_a_reorder_selects(program: bytes) -> None:
    rt, buffers = runtime(program)
    names = sorted(caches(buffers))
    assert names == ["key_cache_0", "key_cache_1", "value_cache_0", "value_cache_1"]
    lengths = {n: b.clone() for n, b in buffers.items() if n.startswith("cumulative_length")}
    before = caches(buffers)
    rt.reorder_cache("generate", [2, 0, 0])
    for name, old in before.items():
        assert torch.equal(buffers[name], old[[2, 0, 0]]), name
    assert all(torch.equal(buffers[n], t) for n, t in lengths.items())  # positions are not rows


@pytest.mark.parametrize("index", [[0, 1], [0, 1, 2, 0], [0, 1, 3], [-1, 0, 1]])
def test_a_hostile_index_is_refused_and_the_cache_stays(program: bytes, index: list[int]) -> None:
    rt, buffers = runtime(program)
    before = caches(buffers)
    with pytest.raises(StageError) as refused:
        rt.reorder_cache("generate", index)
    assert refused.value.code == "bad_index"
    assert "3 row indices" in str(refused.value)
    assert all(torch.equal(buffers[n], t) for n, t in before.items())


def test_a_reorder_of_a_program_not_loaded_is_refused(program: bytes) -> None:
    rt, _ = runtime(program)
    with pytest.raises(StageError) as refused:
        rt.reorder_cache("eval", [0, 1, 2])
    assert refused.value.code == "no_program"


@pytest.mark.parametrize("index", [[], [-1], [4096], list(range(4097))])
def test_the_wire_refuses_an_index_out_of_bounds(index: list[int]) -> None:
    raw = msgspec.msgpack.encode({"kind": "reorder_cache", "v": 1, "key": "generate", "index": index})
    with pytest.raises(WireError):
        decode_stage(raw)


def test_a_full_batch_reorder_fits_its_message() -> None:
    msg = ReorderCache(key="generate", index=[4095] * 4096)
    assert decode_stage(encode_stage(msg)) == msg
