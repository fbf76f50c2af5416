"""split(): one captured whole model, cut into stage programs that load like any stage and, run one after the
other (forward in order, backward in reverse, values passed by name), compute what the eager model computes: the
loss, the other outputs and every parameter gradient (tied ones summed across the parts that hold them), on a
batch and sequence length other than the example's. profile(): the cost units the partitioner balances."""

from __future__ import annotations

import functools
import itertools

import models as M
import msgspec
import pytest
import torch

from tensorlink.ir import IRError, Split, StageProgram, Unit, capture, load, profile, split
from tensorlink.ir import schema as s
from tensorlink.ir.capture import DEFAULT_MAX_BATCH

pytestmark = pytest.mark.timeout(300)
RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Same reduction order in the parts and in eager (see test_equivalence)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the models -------------------------------------------------------------------------------------------------


def _gpt2() -> torch.nn.Module:
    return M.gpt2(n_layer=3)


CASES = {
    # name: (builder, inputs(batch, seq) -> (args, kwargs))
    "gpt2": (_gpt2, lambda b, t: ((), M.lm_inputs(b, t))),
    "llama": (M.llama, lambda b, t: ((), M.lm_inputs(b, t))),
    "mlp": (M.mlp_loss, lambda b, t: (M.mlp_loss_inputs(b, t), {})),
}


@functools.cache
def _captured(name: str) -> StageProgram:
    build, inputs = CASES[name]
    args, kwargs = inputs(M.EXAMPLE_BATCH, M.EXAMPLE_SEQ)
    return capture(build(), args, example_kwargs=kwargs or None, max_seq_len=M.MAX_SEQ, train=True)


def _sizes(prog: StageProgram, batch: int, seq: int) -> dict[str, int]:
    """The program's batch and sequence symbols (dims 0 and 1 of its first input) at these sizes."""
    first = prog.program.signature.inputs[0].shape
    return {first[0]: batch, first[1]: seq}


def _ranges(units: list[Unit], n: int) -> dict[str, int]:
    """Contiguous ranges of units balanced by FLOPs (stage k starts at the first unit with k/n of the work before
    it), every stage non-empty."""
    before = list(itertools.accumulate([0.0] + [u.flops for u in units]))
    cuts = [0]
    for k in range(1, n):
        i = next(i for i in range(len(units)) if before[i] >= before[-1] * k / n)
        cuts.append(min(max(i, cuts[-1] + 1), len(units) - (n - k)))
    return {q: sum(i >= c for c in cuts[1:]) for i, u in enumerate(units) for q in u.params}


def _edges(units: list[Unit], n: int) -> dict[str, int]:
    """First unit on stage 0, last unit on stage n-1, everything else in the middle."""
    return {q: 0 if i == 0 else n - 1 if i == len(units) - 1 else 1 for i, u in enumerate(units) for q in u.params}


# --- running the parts like a pipeline ----------------------------------------------------------------------------


def _user_values(prog: StageProgram, sp: Split, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    ordered = [*args, *(kwargs[k] for k in prog.program.signature.keywords)]
    return dict(zip(sp.user_inputs, ordered, strict=True))


def run_pipeline(
    sp: Split, modules: list, user: dict[str, torch.Tensor]
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Forward part by part: part k gets each user input at input_stage and everything else from part k-1's outputs
    (never from further back: pass-through is the parts' job). Backward in reverse: each part's outputs get the
    gradients of the next part's inputs of the same name. Returns the model outputs and the parameter gradients,
    summed over the parts that hold a tied parameter."""
    received: list[list[torch.Tensor]] = []
    produced: list[tuple[torch.Tensor, ...]] = []
    prev: dict[str, torch.Tensor] = {}
    for part, module in zip(sp.parts, modules, strict=True):
        ins = []
        for v in part.inputs:
            if sp.input_stage.get(v) == part.index:
                t = user[v]
            else:
                assert v in prev, f"part {part.index} input {v} is not an output of part {part.index - 1}"
                t = prev[v].detach()
            ins.append(t.requires_grad_(t.is_floating_point()))
        outs = module(*ins)
        assert isinstance(outs, tuple) and len(outs) == len(part.outputs)
        received.append(ins)
        produced.append(outs)
        prev = dict(zip(part.outputs, outs, strict=True))
    outputs = list(produced[-1])
    grads_in: dict[str, torch.Tensor] = {}
    for k in reversed(range(len(sp.parts))):
        part = sp.parts[k]
        if k == len(sp.parts) - 1:
            loss = outputs[0]
            pairs = [(loss, torch.ones_like(loss))]
        else:
            pairs = [(o, grads_in[v]) for v, o in zip(part.outputs, produced[k], strict=True) if v in grads_in]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads_in = {v: t.grad for v, t in zip(part.inputs, received[k], strict=True) if t.grad is not None}
    grads: dict[str, torch.Tensor] = {}
    for module in modules:
        for name, param in module.named_parameters():
            if param.grad is not None:
                grads[name] = grads[name] + param.grad if name in grads else param.grad.clone()
    return outputs, grads


def _eager(model: torch.nn.Module, args: tuple, kwargs: dict, tie_groups: list[list[str]]):
    model.zero_grad()
    out = model(*args, **kwargs)
    outs = [out] if isinstance(out, torch.Tensor) else [v for v in out.values() if isinstance(v, torch.Tensor)]
    outs[0].backward()
    canonical = {alias: g[0] for g in tie_groups for alias in g}
    grads = {canonical.get(n, n): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


def _close(got: torch.Tensor, exp: torch.Tensor, what: str) -> None:
    assert got.shape == exp.shape, f"{what}: shape {tuple(got.shape)} vs eager {tuple(exp.shape)}"
    err = (got.detach().double() - exp.double()).abs().max().item()
    scale = exp.double().abs().max().item()
    assert err <= RTOL * max(scale, 1e-12), f"{what}: max abs diff {err:g} (eager max {scale:g})"


def _check_against_eager(name: str, sp: Split) -> None:
    prog = _captured(name)
    build, inputs = CASES[name]
    args, kwargs = inputs(M.CHECK_BATCH, M.CHECK_SEQ)
    modules = [load(part.program.to_bytes()) for part in sp.parts]
    outs, grads = run_pipeline(sp, modules, _user_values(prog, sp, args, kwargs))
    eager_outs, eager_grads = _eager(build(), args, kwargs, prog.program.tie_groups)
    assert len(outs) == len(eager_outs)
    for i, (got, exp) in enumerate(zip(outs, eager_outs, strict=True)):
        _close(got, exp, f"{name} output {i}")
    assert sorted(grads) == sorted(eager_grads)
    for param, exp in eager_grads.items():
        _close(grads[param], exp, f"{name} grad {param}")


# --- split: equal to eager ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_parts_compute_what_eager_computes(name: str, n: int) -> None:
    prog = _captured(name)
    units = profile(prog, _sizes(prog, M.CHECK_BATCH, M.CHECK_SEQ))
    owner = _ranges(units, n)
    assert sorted(set(owner.values())) == list(range(n))
    sp = split(prog, owner, n)
    assert len(sp.parts) == n
    assert sp.parts[-1].outputs == sp.model_outputs
    _check_against_eager(name, sp)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_edge_layout_keeps_inputs_and_labels_at_the_ends(name: str) -> None:
    """input_ids only reaches part 0 and labels only the last part; the middle sees hidden states only (the causal
    mask and the positions are rebuilt in each part, never sent)."""
    prog = _captured(name)
    units = profile(prog, _sizes(prog, M.CHECK_BATCH, M.CHECK_SEQ))
    sp = split(prog, _edges(units, 3), 3)
    assert sp.input_stage == {"input_ids": 0, "labels": 2}
    needs = {v: [p.index for p in sp.parts if v in p.inputs] for v in ("input_ids", "labels")}
    assert needs == {"input_ids": [0], "labels": [2]}
    values = prog.program.values
    middle = sp.parts[1]
    for v in (*middle.inputs, *middle.outputs):
        assert values[v].dtype == "float32", f"the middle part receives or sends {v} ({values[v]})"
    _check_against_eager(name, sp)


def test_tied_embedding_is_held_by_first_and_last_part() -> None:
    prog = _captured("gpt2")
    units = profile(prog, _sizes(prog, M.CHECK_BATCH, M.CHECK_SEQ))
    sp = split(prog, _edges(units, 3), 3)
    assert sp.ties == {"transformer.wte.weight": (0, 2)}
    assert "transformer.wte.weight" in sp.parts[0].params and "transformer.wte.weight" in sp.parts[2].params
    assert "transformer.wte.weight" not in sp.parts[1].params


def test_sizes_are_never_sent_between_parts() -> None:
    for name in CASES:
        prog = _captured(name)
        values = prog.program.values
        sym_nodes = {
            n.name for n in prog.program.graph.nodes if n.target.startswith("operator.") or "sym_size" in n.target
        }
        for n in (2, 3):
            sp = split(prog, _ranges(profile(prog, _sizes(prog, 3, 12)), n), n)
            for part in sp.parts:
                for v in (*part.inputs, *part.outputs):
                    assert v not in sym_nodes and values[v].dtype is not None, f"{name}: part {part.index} passes {v}"
                assert not part.program.program.values, "stage programs carry no capture metadata"


def test_a_value_passes_through_the_part_it_skips() -> None:
    """MLP [inp | mid1 mid2 | norm out]: h from part 0 reaches part 2 through part 1; y goes to part 2 only."""
    prog = _captured("mlp")
    units = profile(prog, _sizes(prog, 3, 12))
    assert [u.params[0].split(".")[0] for u in units] == ["inp", "mid1", "mid2", "norm", "out"]
    stage_of = {"inp": 0, "mid1": 1, "mid2": 1, "norm": 2, "out": 2}
    sp = split(prog, {q: stage_of[q.split(".")[0]] for u in units for q in u.params}, 3)
    skipped = set(sp.parts[0].outputs) & set(sp.parts[1].inputs) & set(sp.parts[1].outputs) & set(sp.parts[2].inputs)
    assert len(skipped) == 1, (sp.parts[0].outputs, sp.parts[1].inputs, sp.parts[1].outputs, sp.parts[2].inputs)
    assert sp.input_stage == {"x": 0, "y": 2}
    assert sp.parts[2].program.program.buffers == ["scale"]
    assert not sp.parts[0].program.program.buffers and not sp.parts[1].program.program.buffers
    _check_against_eager("mlp", sp)


def test_padding_mask_goes_to_the_part_that_builds_the_attention_mask() -> None:
    """With an attention_mask the causal mask depends on a user input: it is built in the first part with
    attention, and the user sends attention_mask there (not to part 0, which only embeds)."""
    model = _gpt2()
    example = M.lm_inputs(2, 8) | {"attention_mask": M.padding_mask(2, 8)}
    prog = capture(model, (), example_kwargs=example, max_seq_len=M.MAX_SEQ)
    units = profile(prog, _sizes(prog, 3, 12))
    sp = split(prog, _edges(units, 3), 3)
    assert sp.input_stage == {"input_ids": 0, "attention_mask": 1, "labels": 2}
    check = M.lm_inputs(3, 12) | {"attention_mask": M.padding_mask(3, 12)}
    outs, grads = run_pipeline(sp, [load(p.program.to_bytes()) for p in sp.parts], _user_values(prog, sp, (), check))
    eager_outs, eager_grads = _eager(_gpt2(), (), check, prog.program.tie_groups)
    for got, exp in zip(outs, eager_outs, strict=True):
        _close(got, exp, "padded outputs")
    for param, exp in eager_grads.items():
        _close(grads[param], exp, f"padded grad {param}")


def test_batchnorm_buffers_stay_with_their_layer_and_update_like_eager() -> None:
    model = M.cnn_loss()
    prog = capture(model, M.image_inputs(2))
    batch = prog.program.signature.inputs[0].shape[0]
    units = profile(prog, {batch: 5})
    owner = _ranges(units, 2)
    assert owner["net.bn1.weight"] == 0 and owner["net.bn2.weight"] == 1
    sp = split(prog, owner, 2)
    for k, bn in ((0, "bn1"), (1, "bn2")):
        held = sp.parts[k].program.program.buffers
        assert sorted(held) == sorted(f"net.{bn}.{b}" for b in ("running_mean", "running_var", "num_batches_tracked"))
    modules = [load(p.program.to_bytes()) for p in sp.parts]
    (x,) = M.image_inputs(5)
    outs, grads = run_pipeline(sp, modules, {sp.user_inputs[0]: x})
    eager = M.cnn_loss()
    eager_outs, eager_grads = _eager(eager, (x,), {}, [])
    _close(outs[0], eager_outs[0], "cnn loss")
    for param, exp in eager_grads.items():
        _close(grads[param], exp, f"cnn grad {param}")
    state = {k: v for module in modules for k, v in module.state_dict().items()}
    for name, exp in eager.state_dict().items():
        assert torch.equal(state[name], exp), f"{name} differs from eager after one step"


class _Counted(torch.nn.Module):
    """A step counter read by the first layer and updated in place at the end, after the second: one buffer that
    two parts would hold, and only one would update."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b(self.a(x) * self.steps).sum()
        self.steps.add_(1)
        return out


def test_a_buffer_updated_in_one_part_and_read_in_another_is_refused() -> None:
    prog = capture(_Counted(), (torch.randn(2, 4),))
    with pytest.raises(IRError, match=r"buffers \['steps'\] are updated in place but used by parts"):
        split(prog, {"a.weight": 0, "a.bias": 0, "b.weight": 1, "b.bias": 1}, 2)
    assert len(split(prog, dict.fromkeys(prog.program.parameters, 0), 1).parts) == 1


class _Flat(torch.nn.Module):
    """The middle layer works on (B*T, 32): a stage input whose first dim is an expression, not a symbol."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x)).reshape(-1, 32)
        z = torch.relu(self.mid(h))
        return ((self.out(z).view(x.shape[0], x.shape[1], 8) - y) ** 2).mean()


def test_an_expression_dim_becomes_a_fresh_symbol_with_its_range() -> None:
    """Part 1 receives (B*T, 32): its dim gets a fresh symbol ranging over B*T at capture's bounds; the last part
    re-derives B and T from y (its other input), never from x, which only part 0 receives."""
    torch.manual_seed(0)
    model = _Flat().train()
    prog = capture(model, M.mlp_loss_inputs(2, 8), max_seq_len=M.MAX_SEQ)
    owner = {q: ["inp", "mid", "out"].index(q.split(".")[0]) for q in prog.program.parameters}
    sp = split(prog, owner, 3)
    sig = sp.parts[1].program.program.signature
    (spec,) = sig.inputs
    assert spec.shape[1] == 32 and isinstance(spec.shape[0], str)
    assert sig.symbols[spec.shape[0]] == [2, DEFAULT_MAX_BATCH * M.MAX_SEQ]
    assert sp.input_stage == {"x": 0, "y": 2} and "x" not in sp.parts[2].inputs
    args = M.mlp_loss_inputs(3, 12)
    modules = [load(p.program.to_bytes()) for p in sp.parts]
    outs, grads = run_pipeline(sp, modules, dict(zip(sp.user_inputs, args, strict=True)))
    eager_outs, eager_grads = _eager(model, args, {}, [])
    _close(outs[0], eager_outs[0], "flat loss")
    for param, exp in eager_grads.items():
        _close(grads[param], exp, f"flat grad {param}")


def test_eval_program_splits_like_the_training_program() -> None:
    """The same owner map puts every parameter in the same part of an eval capture without labels; its parts
    chain to the eager logits."""
    train = _captured("gpt2")
    owner = _ranges(profile(train, _sizes(train, 3, 12)), 3)
    model = _gpt2()
    ids = M.token_inputs(M.EXAMPLE_BATCH, M.EXAMPLE_SEQ)[0]
    ev = capture(model, (ids,), max_seq_len=M.MAX_SEQ, train=False)
    a, b = split(train, owner, 3), split(ev, owner, 3)
    assert [p.params for p in a.parts] == [p.params for p in b.parts]
    check = M.token_inputs(M.CHECK_BATCH, M.CHECK_SEQ)[0]
    modules = [load(p.program.to_bytes(), train=False) for p in b.parts]
    values: dict[str, torch.Tensor] = {}
    for part, module in zip(b.parts, modules, strict=True):
        ins = [check if v in b.input_stage else values[v] for v in part.inputs]
        with torch.no_grad():
            values = dict(zip(part.outputs, module(*ins), strict=True))
    with torch.no_grad():
        expected = model.eval()(check).logits
    _close(values[b.model_outputs[0]], expected, "eval logits")


# --- split: errors ------------------------------------------------------------------------------------------------


def test_owner_map_errors_say_what_to_fix() -> None:
    prog = _captured("gpt2")
    units = profile(prog, _sizes(prog, 3, 12))
    owner = _ranges(units, 2)
    missing = dict(owner)
    del missing["transformer.ln_f.bias"]
    with pytest.raises(IRError, match="missing.*transformer.ln_f.bias"):
        split(prog, missing, 2)
    with pytest.raises(IRError, match="lm_head.weight.*tied to 'transformer.wte.weight'"):
        split(prog, {**owner, "lm_head.weight": 1}, 2)
    with pytest.raises(IRError, match="unknown.*nope"):
        split(prog, {**owner, "nope": 0}, 2)
    with pytest.raises(IRError, match=r"0\.\.1"):
        split(prog, {**owner, "transformer.ln_f.bias": 2}, 2)
    with pytest.raises(IRError, match=r"stage\(s\) \[1\] would run nothing"):
        split(prog, {q: 0 if st == 0 else 2 for q, st in owner.items()}, 3)
    with pytest.raises(ValueError, match="n_stages"):
        split(prog, owner, 0)
    bare = StageProgram(msgspec.structs.replace(prog.program, values={}), prog.weights)
    with pytest.raises(IRError, match="metadata"):
        split(bare, owner, 2)


def test_single_stage_is_the_whole_model() -> None:
    prog = _captured("mlp")
    sp = split(prog, dict.fromkeys(prog.program.parameters, 0), 1)
    assert sp.parts[0].outputs == sp.model_outputs and sp.ties == {}
    _check_against_eager("mlp", sp)


# --- profile ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_units_cover_every_parameter_once_in_first_use_order(name: str) -> None:
    prog = _captured(name)
    p = prog.program
    units = profile(prog, _sizes(prog, 3, 12))
    flat = [q for u in units for q in u.params]
    assert sorted(flat) == sorted(p.parameters) and len(flat) == len(set(flat))
    targets = {ph.name: ph.target for ph in p.graph.placeholders if ph.kind == "parameter"}
    first_use: list[str] = []
    for node in p.graph.nodes:
        for ref in _refs([*node.args, *node.kwargs.values()]):
            if ref in targets and targets[ref] not in first_use:
                first_use.append(targets[ref])
    assert flat[: len(first_use)] == first_use
    assert all(u.flops > 0 and u.param_bytes > 0 for u in units)


def _refs(args: list) -> list[str]:
    out: list[str] = []
    for arg in args:
        if isinstance(arg, s.Ref):
            out.append(arg.node)
        elif isinstance(arg, s.List):
            out += _refs(arg.items)
    return out


def test_gpt2_profile_counts_matmuls_attention_and_the_tied_head() -> None:
    """Exact matmul FLOPs at batch 3, seq 12: c_attn (with SDPA after it), and the tied LM head, which counts in
    the unit current where it runs (ln_f's), not where wte was first used (the embedding)."""
    prog = _captured("gpt2")
    b, t, d, v, heads = 3, 12, 64, M.VOCAB, 4
    units = {u.params[0]: u for u in profile(prog, _sizes(prog, b, t))}
    head = 2 * b * t * d * v
    attn = 2 * b * t * d * 3 * d + 2 * (2 * b * heads * t * t * (d // heads))
    assert units["transformer.h.0.attn.c_attn.bias"].flops == attn
    assert units["transformer.h.0.mlp.c_fc.bias"].flops >= 2 * b * t * d * 4 * d
    ln_f = units["transformer.ln_f.weight"]
    assert head < ln_f.flops < 1.1 * head
    assert units["transformer.wte.weight"].flops < 0.05 * head  # a gather: ELEMENT_COST per element, no matmul
    block = sum(u.flops for name, u in units.items() if name.startswith("transformer.h.0."))
    assert ln_f.flops > 0.1 * block  # the head matters to the partitioner even at vocab 128
    assert units["transformer.wte.weight"].param_bytes == v * d * 4


def test_profile_needs_every_size() -> None:
    prog = _captured("mlp")
    with pytest.raises(ValueError, match="dynamic dims"):
        profile(prog, {})
