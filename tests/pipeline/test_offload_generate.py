"""``OffloadedModel.generate`` is Hugging Face's own generate with the model calls run by worker processes
(LocalSwarm): greedy, sampling under torch.manual_seed, a left-padded batch with its attention mask and beam
search equal HF's local generate token for token; a streamer gets each token as it comes; an unsupported
argument is refused by name before anything is sent, and the next call still works.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import offload_cases as C
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

import tensorlink
from tensorlink.pipeline.driver import Pipeline
from tensorlink.pipeline.generation import GenerationError
from tensorlink.wire.stage import ProgramKey

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
VOCAB, EOS, PAD = 48, 2, 0


def gpt2() -> PreTrainedModel:
    """Small GPT-2 with its KV cache on (HF's generate then runs the way users run it)."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=1, eos_token_id=EOS
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def offloaded() -> Iterator[tuple[Any, PreTrainedModel]]:
    """One offloaded GPT-2 over 2 worker processes, and the same model here."""
    with C.swarm(2) as swarm:
        model = tensorlink.offload(gpt2(), network=swarm, workers=2)
        try:
            yield model, gpt2()
        finally:
            model.close()


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def both(model: Any, ref: PreTrainedModel, ids: torch.Tensor, seed: int = 0, **kw: Any) -> tuple[Any, Any]:
    """The offloaded generate and HF's local one on the same arguments, each from the same random state."""
    torch.manual_seed(seed)
    got = model.generate(ids, pad_token_id=PAD, **kw)
    torch.manual_seed(seed)
    want = ref.generate(ids, pad_token_id=PAD, **kw)
    return got, want


def test_greedy(offloaded: tuple[Any, PreTrainedModel]) -> None:
    model, ref = offloaded
    got, want = both(model, ref, prompts(2, 5), max_new_tokens=10, do_sample=False)
    assert got.tolist() == want.tolist()
    assert got.shape == (2, 15)


class Collect(BaseStreamer):
    """A streamer that keeps what generate() hands it: the prompt first, then each new token as it comes."""

    def __init__(self) -> None:
        self.values: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.values.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


def test_a_streamer_gets_each_token_as_it_comes(offloaded: tuple[Any, PreTrainedModel]) -> None:
    model, _ = offloaded
    prompt = prompts(1, 5, seed=5)
    streamer = Collect()
    got = model.generate(prompt, pad_token_id=PAD, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert streamer.ended and streamer.values[0] == prompt[0].tolist()
    assert [v for values in streamer.values[1:] for v in values] == got[0, 5:].tolist()
    assert len(streamer.values) == 1 + got.shape[1] - 5  # one put per new token


def test_sampling_follows_the_seed(offloaded: tuple[Any, PreTrainedModel]) -> None:
    """Sampled tokens equal HF's under the same seed, also on the call that captures a program for a new batch
    size; two seeds give two continuations (the equality is no accident of a peaked distribution)."""
    model, ref = offloaded
    kw: dict[str, Any] = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=30, top_p=0.95)
    first = both(model, ref, prompts(3, 4), seed=1, **kw)  # 3 rows: a new generation program
    second = both(model, ref, prompts(3, 4), seed=2, **kw)
    assert first[0].tolist() == first[1].tolist()
    assert second[0].tolist() == second[1].tolist()
    assert first[0].tolist() != second[0].tolist()


def test_left_padded_batch_with_attention_mask(offloaded: tuple[Any, PreTrainedModel]) -> None:
    model, ref = offloaded
    ids = prompts(2, 7, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = PAD, 0  # the first prompt is 4 tokens, left-padded to 7
    got, want = both(model, ref, ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert got.tolist() == want.tolist()
    alone = model.generate(ids[:1, 3:], pad_token_id=PAD, max_new_tokens=8, do_sample=False)
    assert got[0, 3:].tolist() == alone[0].tolist(), "padding changed what the short prompt generates"


def test_beam_search(offloaded: tuple[Any, PreTrainedModel], monkeypatch: pytest.MonkeyPatch) -> None:
    """Beams reorder every stage's KV cache on the workers (ReorderCache); two sequences come back per prompt."""
    model, ref = offloaded
    reorders: list[list[int]] = []
    reorder = Pipeline.reorder_cache

    async def counted(self: Pipeline, key: ProgramKey, index: list[int]) -> None:
        reorders.append(index)
        await reorder(self, key, index)

    monkeypatch.setattr(Pipeline, "reorder_cache", counted)
    got, want = both(model, ref, prompts(2, 5, seed=4), max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert got.tolist() == want.tolist()
    assert got.shape == (4, 13)
    assert reorders and all(len(index) == 6 for index in reorders), "the beams never moved on the workers"


def test_an_unsupported_argument_is_refused_by_name(offloaded: tuple[Any, PreTrainedModel]) -> None:
    model, ref = offloaded
    with pytest.raises(GenerationError, match="does not support assistant_model"):
        model.generate(prompts(2, 5), assistant_model=ref, max_new_tokens=4)
    with pytest.raises(GenerationError, match="does not support penalty_alpha|contrastive search"):
        model.generate(prompts(2, 5), penalty_alpha=0.6, top_k=4, max_new_tokens=4)
    got, want = both(model, ref, prompts(2, 5), max_new_tokens=4, do_sample=False)  # the model still works
    assert got.tolist() == want.tolist()


def test_a_prompt_longer_than_the_cache_is_refused(offloaded: tuple[Any, PreTrainedModel]) -> None:
    model, _ = offloaded
    with pytest.raises(GenerationError, match="max_seq_len"):
        model.generate(prompts(2, 30), pad_token_id=PAD, max_new_tokens=8)
