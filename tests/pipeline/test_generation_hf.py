"""generate() with Hugging Face's semantics, in-process: HF's own generate drives a LocalDecoder that runs the
captured generation program through the IR loader and interpreter (the program the workers run) with a stage
runtime's cache reorder, and every result is compared token for token with HF's generate of the same model."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import trio
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    TextIteratorStreamer,
)

from tensorlink.ir.split import split
from tensorlink.pipeline.driver import slots
from tensorlink.pipeline.generation import UNSUPPORTED, GenerationError, capture_generation, generate
from tensorlink.stage.links import Lane, LocalLink
from tensorlink.stage.runtime import StageRuntime
from tensorlink.wire.stage import RunStep

pytestmark = pytest.mark.slow  # captures a program per model and batch size
MAX_LEN = 24
VOCAB = 48
BOS, EOS = 1, 2


class LocalDecoder:
    """The Decoder protocol on one in-process stage: the whole generation program, loaded from its bytes as a
    worker loads it, with the cache reorder a worker runs. Programs are captured once per batch size."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.max_len = MAX_LEN
        self.runtimes: dict[int, StageRuntime] = {}
        self.batch = 0
        self.calls: list[tuple[str, Any]] = []

    def prepare(self, batch: int) -> None:
        if batch not in self.runtimes:
            rt = StageRuntime(b"g" * 16, 0, 1, {})
            rt.load("generate", capture_generation(self.model, batch, self.max_len).whole.to_bytes(), [], [])
            self.runtimes[batch] = rt
        self.batch = batch
        self.calls.append(("prepare", batch))

    def step(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append(("step", tuple(inputs["input_ids"].shape)))
        with torch.no_grad():
            logits = self.runtimes[self.batch].programs["generate"].module(**inputs)
        return logits[:, -1]  # what a step with tail=1 brings back

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.calls.append(("reorder", beam_idx.tolist()))
        self.runtimes[self.batch].reorder_cache("generate", beam_idx.tolist())


class SplitDecoder:
    """The Decoder protocol on two in-process stages, the program split as a job splits it (layer 0 on stage 0,
    layer 1 and the head on stage 1): each stage keeps its own layer's cache and reorders it itself."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.max_len = MAX_LEN
        self.step_no = 0

    def prepare(self, batch: int) -> None:
        whole = capture_generation(self.model, batch, self.max_len)
        later = (".h.1.", ".layers.1.", "ln_f", ".norm.", "lm_head")
        owner = {n: int(any(k in n for k in later)) for n in whole.whole.program.parameters}
        self.split = sp = split(whole.whole, owner, 2)
        (self.owner_0, user_0), (self.owner_1, user_1), (fwd, bwd) = (LocalLink.pair() for _ in range(3))
        self.stages = [
            StageRuntime(b"s" * 16, 0, 2, {"user": user_0, "next": fwd}),
            StageRuntime(b"s" * 16, 1, 2, {"user": user_1, "prev": bwd}),
        ]
        for k, rt in enumerate(self.stages):
            rt.load("generate", sp.parts[k].program.to_bytes(), *slots(sp, k))

    def step(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.step_no += 1
        return trio.run(self._step, self.step_no, inputs)

    async def _step(self, step: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        owners = [self.owner_0, self.owner_1]
        for i, name in enumerate(self.split.user_inputs):
            await owners[self.split.input_stage[name]].send(Lane.USER_IN, step, 0, i, inputs[name])
        cmd = RunStep(key="generate", step=step, micro_batches=1, schedule="1f1b", backward="none", training=False,
                      to_user=[0], tail=1)  # fmt: skip
        async with trio.open_nursery() as nursery:
            for rt in self.stages:
                nursery.start_soon(rt.run_step, cmd)
        return (await self.owner_1.recv(Lane.USER_OUT, step, 0, 0))[:, -1]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for rt in self.stages:
            rt.reorder_cache("generate", beam_idx.tolist())


def gpt2() -> PreTrainedModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=BOS, eos_token_id=EOS
    )
    return GPT2LMHeadModel(config).eval()


def llama_gqa() -> PreTrainedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=[gpt2, llama_gqa], ids=["gpt2", "llama-gqa"])
def pair(request: pytest.FixtureRequest) -> tuple[PreTrainedModel, LocalDecoder]:
    model = request.param()
    return model, LocalDecoder(model)


def prompts(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def both(model: PreTrainedModel, decoder: LocalDecoder, ids: torch.Tensor, seed: int = 0, **kw: Any) -> tuple[Any, Any]:
    """HF's generate and ours on the same arguments, each from the same random state."""
    torch.manual_seed(seed)
    expected = model.generate(ids, **kw)
    torch.manual_seed(seed)
    got = generate(model, decoder, ids, **kw)
    return expected, got


CASES = {
    "greedy": dict(max_new_tokens=10, do_sample=False),
    "sampling": dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
    "min_p and repetition penalty": dict(max_new_tokens=10, do_sample=True, min_p=0.05, repetition_penalty=1.3),
    "max_length": dict(max_length=9, do_sample=True, temperature=1.5),
    "return sequences": dict(max_new_tokens=6, do_sample=True, num_return_sequences=2),
    "beam search": dict(max_new_tokens=8, num_beams=3),
    "beam search, two returned": dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, length_penalty=0.5),
}


@pytest.mark.parametrize("case", CASES)
def test_generate_equals_hf(pair: tuple[PreTrainedModel, LocalDecoder], case: str) -> None:
    model, decoder = pair
    ids = prompts()
    expected, got = both(model, decoder, ids, pad_token_id=0, **CASES[case])
    assert torch.equal(got, expected), f"{case}: {got.tolist()} != {expected.tolist()}"
    assert got.shape[1] > ids.shape[1]


def test_sampling_follows_the_seed(pair: tuple[PreTrainedModel, LocalDecoder]) -> None:
    """Equality above is no accident of a peaked distribution: two seeds give two continuations, each HF's."""
    model, decoder = pair
    kw = dict(max_new_tokens=10, do_sample=True, temperature=2.0, pad_token_id=0)
    first, second = (both(model, decoder, prompts(), seed=s, **kw) for s in (1, 2))
    assert torch.equal(first[1], first[0]) and torch.equal(second[1], second[0])
    assert not torch.equal(first[1], second[1])


def test_left_padded_prompts_of_different_lengths(pair: tuple[PreTrainedModel, LocalDecoder]) -> None:
    model, decoder = pair
    ids = prompts(length=7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # the first prompt is 4 tokens, left-padded to 7
    ids[0, :3] = 0
    expected, got = both(model, decoder, ids, attention_mask=mask, pad_token_id=0, max_new_tokens=10)
    assert torch.equal(got, expected)
    alone = generate(model, decoder, ids[:1, 3:], pad_token_id=0, max_new_tokens=10)
    assert torch.equal(got[0, 3:], alone[0]), "padding changed what the short prompt generates"


def test_eos_stops_a_row_and_pads_it(pair: tuple[PreTrainedModel, LocalDecoder]) -> None:
    model, decoder = pair
    ids = prompts()
    free = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    stop = int(free[0, ids.shape[1] + 2])  # row 0's third new token, as the end of sequence
    expected, got = both(model, decoder, ids, max_new_tokens=10, eos_token_id=stop, pad_token_id=0)
    assert torch.equal(got, expected)
    new = got[0, ids.shape[1] :].tolist()
    end = new.index(stop)
    assert end <= 2 and all(t == 0 for t in new[end + 1 :])


def test_scores_and_logits_come_back_as_hf_gives_them(pair: tuple[PreTrainedModel, LocalDecoder]) -> None:
    model, decoder = pair
    kw = dict(max_new_tokens=4, return_dict_in_generate=True, output_scores=True, output_logits=True, pad_token_id=0)
    expected, got = both(model, decoder, prompts(), **kw)
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip([*got.scores, *got.logits], [*expected.scores, *expected.logits], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_beam_search_reorders_the_stage_cache(pair: tuple[PreTrainedModel, LocalDecoder]) -> None:
    """The beam search above is equal to HF's because the stage's cache rows follow the beams: at most one
    reorder per step, none that keeps every row in place."""
    model, decoder = pair
    decoder.calls.clear()
    generate(model, decoder, prompts(), max_new_tokens=8, num_beams=3, pad_token_id=0)
    steps = sum(kind == "step" for kind, _ in decoder.calls)
    reorders = [idx for kind, idx in decoder.calls if kind == "reorder"]
    assert reorders and len(reorders) < steps
    assert all(idx != list(range(6)) for idx in reorders)


@pytest.mark.parametrize("case", ["beam search, two returned", "min_p and repetition penalty"])
def test_split_over_two_stages_equals_hf(pair: tuple[PreTrainedModel, LocalDecoder], case: str) -> None:
    model = pair[0]
    decoder = SplitDecoder(model)
    ids = prompts(length=7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded prompt as well
    expected, got = both(model, decoder, ids, attention_mask=mask, pad_token_id=0, **CASES[case])
    assert torch.equal(got, expected)
    caches = [[n for n, _ in rt.programs["generate"].module.named_buffers() if "_cache_" in n] for rt in decoder.stages]
    assert all(caches), f"each stage keeps its own layer's cache: {caches}"


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0", eos_token="w2")


def test_a_streamer_sees_the_tokens_as_hf_streams_them() -> None:
    model = gpt2()
    decoder = LocalDecoder(model)
    tokenizer = word_tokenizer()
    ids = tokenizer("w5 w9 w13 w7", return_tensors="pt").input_ids
    texts = []
    for run in (model.generate, lambda *a, **kw: generate(model, decoder, *a, **kw)):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
        torch.manual_seed(3)
        kw = dict(max_new_tokens=8, do_sample=True, streamer=streamer)
        worker = threading.Thread(target=run, args=(ids,), kwargs=kw)
        worker.start()
        texts.append(list(streamer))
        worker.join(timeout=60)
        assert not worker.is_alive()
    assert texts[0] == texts[1] and "".join(texts[1]).split()


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("assistant_model", "model"),
        ("output_attentions", True),
        ("output_hidden_states", True),
        ("cache_implementation", "static"),
        ("prefill_chunk_size", 4),
        ("inputs_embeds", torch.zeros(1, 3, 32)),
    ],
)
def test_an_unsupported_argument_is_refused_naming_itself(argument: str, value: Any) -> None:
    model = gpt2()
    decoder = LocalDecoder(model)
    with pytest.raises(GenerationError, match=argument) as refused:
        generate(model, decoder, prompts(), max_new_tokens=3, **{argument: model if value == "model" else value})
    assert str(refused.value).endswith(UNSUPPORTED[argument])  # and says what to do instead
    assert decoder.calls == []  # refused before anything went to the workers


def test_other_decoding_modes_are_refused_before_the_hub_is_asked() -> None:
    model = gpt2()
    decoder = LocalDecoder(model)
    with pytest.raises(GenerationError, match="contrastive search"):
        generate(model, decoder, prompts(), max_new_tokens=3, penalty_alpha=0.6, top_k=4)
    assert decoder.calls == []


def test_a_generation_longer_than_the_cache_is_refused_before_anything_is_sent() -> None:
    model = gpt2()
    decoder = LocalDecoder(model)
    with pytest.raises(GenerationError, match="max_seq_len"):
        generate(model, decoder, prompts(length=10), max_new_tokens=MAX_LEN)
    assert decoder.calls == []
