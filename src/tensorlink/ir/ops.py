"""The curated, versioned allow-list of operators a stage program may call.

Not all of aten: ``aten::from_file`` reads files, and most of the 3,000 overloads are never needed by
the models we serve. Each entry was added because a supported model family emits it; an op that is
missing is a clear load error (and a one-line review to add it), never a silent fallback.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

OPS_VERSION = 2  # 2: the by-class review for the transformers zoo (see ATEN_OPS)

ATEN_OPS: frozenset[str] = frozenset(
    {
        # elementwise and arithmetic
        "aten.add.Tensor", "aten.add.Scalar", "aten.add_.Tensor", "aten.sub.Tensor", "aten.sub.Scalar",
        "aten.rsub.Scalar", "aten.mul.Tensor", "aten.mul.Scalar", "aten.div.Tensor", "aten.div.Scalar",
        "aten.div.Tensor_mode", "aten.neg.default", "aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor",
        "aten.rsqrt.default", "aten.sqrt.default", "aten.exp.default", "aten.log.default", "aten.abs.default",
        "aten.tanh.default", "aten.sigmoid.default", "aten.sin.default", "aten.cos.default", "aten.erf.default",
        "aten.reciprocal.default", "aten.square.default",
        "aten.clamp.default", "aten.clamp_min.default", "aten.minimum.default",
        "aten.maximum.default", "aten.where.self", "aten.where.ScalarOther", "aten.masked_fill.Scalar",
        "aten.masked_fill.Tensor", "aten.__and__.Tensor", "aten.__or__.Tensor", "aten.bitwise_not.default",
        "aten.logical_not.default", "aten.eq.Tensor", "aten.eq.Scalar", "aten.ne.Tensor", "aten.ne.Scalar",
        "aten.lt.Tensor", "aten.lt.Scalar", "aten.le.Tensor", "aten.le.Scalar", "aten.gt.Tensor",
        "aten.gt.Scalar", "aten.ge.Tensor", "aten.ge.Scalar",
        # activations and normalisation
        "aten.relu.default", "aten.gelu.default", "aten.silu.default", "aten.softmax.int",
        "aten._softmax.default", "aten.log_softmax.int", "aten.layer_norm.default", "aten.batch_norm.default",
        "aten.group_norm.default", "aten.rms_norm.default",
        # mode-dependent (see MODE_DEPENDENT)
        "aten.dropout.default", "aten.scaled_dot_product_attention.default",
        # linear algebra, convolution, pooling, embedding
        "aten.linear.default", "aten.addmm.default", "aten.mm.default", "aten.bmm.default",
        "aten.matmul.default", "aten.baddbmm.default", "aten.conv1d.default", "aten.conv2d.default",
        "aten.max_pool2d.default", "aten.avg_pool2d.default", "aten.adaptive_avg_pool2d.default",
        "aten.embedding.default",
        # losses and reductions
        "aten.cross_entropy_loss.default", "aten.nll_loss.default", "aten.mse_loss.default",
        "aten.sum.dim_IntList", "aten.sum.default", "aten.mean.dim", "aten.mean.default", "aten.amax.default",
        "aten.max.dim", "aten.cumsum.default", "aten.diff.default", "aten.argmax.default",
        # shape and indexing
        "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.flatten.using_ints",
        "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.transpose.int",
        "aten.permute.default", "aten.t.default", "aten.expand.default", "aten.contiguous.default",
        "aten.clone.default", "aten.alias.default", "aten.slice.Tensor", "aten.select.int",
        "aten.index.Tensor", "aten.gather.default", "aten.cat.default", "aten.stack.default",
        "aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "aten.unbind.int",
        "aten.repeat.default", "aten.tril.default", "aten.triu.default", "aten.sym_size.int",
        "aten.copy_.default", "aten.index_copy_.default", "aten.index_copy.default",
        "aten.detach.default", "aten.broadcast_tensors.default", "aten.pad.default", "aten.constant_pad_nd.default",
        # creation (shapes are bounded by the dry run) and conversion
        "aten.arange.default", "aten.arange.start", "aten.arange.start_step", "aten.full.default",
        "aten.zeros.default", "aten.ones.default", "aten.new_ones.default", "aten.new_zeros.default",
        "aten.full_like.default", "aten.zeros_like.default", "aten.ones_like.default", "aten.scalar_tensor.default",
        "aten.to.dtype", "aten.to.device", "aten.to.dtype_layout", "aten.type_as.default",
        "aten._to_copy.default", "aten._assert_tensor_metadata.default",
    }
    # Operator set 2, reviewed by class for the transformers zoo (benchmarks/zoo.py). Every op here has an output
    # whose shape follows from its input shapes and literal arguments, so the meta dry run counts its memory
    # (tensorlink.ir.memory); the index-taking ones check their indices against the indexed dim before running
    # (argcheck.bounded), so an out-of-range index is an IRError on every device, not a CUDA device-side assert.
    | {
        # pointwise math
        "aten.log1p.default", "aten.expm1.default", "aten.log2.default", "aten.exp2.default", "aten.sign.default",
        "aten.floor.default", "aten.ceil.default", "aten.round.default", "aten.trunc.default", "aten.tan.default",
        "aten.atan.default", "aten.atan2.default", "aten.sinh.default", "aten.cosh.default", "aten.asin.default",
        "aten.acos.default", "aten.remainder.Tensor", "aten.remainder.Scalar", "aten.fmod.Tensor",
        "aten.fmod.Scalar", "aten.floor_divide.default", "aten.isinf.default", "aten.isnan.default",
        "aten.isfinite.default", "aten.nan_to_num.default", "aten.lerp.Scalar", "aten.lerp.Tensor",
        "aten.addcmul.default", "aten.addcdiv.default", "aten.xlogy.Tensor", "aten.clamp.Tensor",
        "aten.clamp_max.default", "aten.clamp_min.Tensor", "aten.min.other", "aten.max.other", "aten.where.Scalar",
        "aten.where.ScalarSelf",
        "aten.logical_and.default", "aten.logical_or.default", "aten.logical_xor.default",
        "aten.bitwise_and.Tensor", "aten.bitwise_and.Scalar", "aten.bitwise_or.Tensor", "aten.bitwise_or.Scalar",
        "aten.bitwise_xor.Tensor", "aten.mul_.Tensor", "aten.div_.Tensor", "aten.masked_fill_.Scalar",
        "aten.fill_.Scalar", "aten.zero_.default", "aten.lift_fresh_copy.default", "aten.new_full.default",
        "aten.eye.default", "aten.eye.m",
        # uninitialised creation, zero-filled on the worker (ZERO_FILLED): empty's values are unspecified, so zeros
        # are a valid result, and the peer never reads what the worker's allocator held before
        "aten.empty.memory_format", "aten.empty_like.default", "aten.new_empty.default",
        # activations
        "aten.softplus.default", "aten.elu.default", "aten.leaky_relu.default", "aten.hardtanh.default",
        "aten.hardsigmoid.default", "aten.hardswish.default", "aten.mish.default", "aten.relu6.default",
        "aten.glu.default", "aten.celu.default", "aten.selu.default", "aten.prelu.default", "aten.silu_.default",
        "aten.relu_.default",
        # reductions (outputs sized by the input, or by a literal: histc's bins)
        "aten.logsumexp.default", "aten.linalg_vector_norm.default", "aten.norm.ScalarOpt_dim", "aten.min.default",
        "aten.max.default", "aten.min.dim", "aten.amin.default", "aten.argmin.default", "aten.prod.default",
        "aten.prod.dim_int", "aten.var.correction", "aten.std.correction", "aten.var_mean.correction",
        "aten.cumprod.default", "aten.histc.default", "aten.any.dim", "aten.any.default", "aten.all.dim",
        "aten.all.default",
        # sorting and top-k: k is checked against the dim on meta (a k past the dim fails the dry run)
        "aten.topk.default", "aten.sort.default", "aten.sort.stable", "aten.argsort.default",
        "aten.argsort.stable", "aten.kthvalue.default",
        # indexing, with bounds checks (argcheck.bounded)
        "aten.index_select.default", "aten.scatter.src", "aten.scatter.value", "aten.scatter_add.default",
        "aten.scatter_reduce.two", "aten.index_add.default", "aten.index_put.default", "aten.index_put_.default",
        "aten.take_along_dim.default", "aten.one_hot.default", "aten.scatter_.src", "aten.scatter_.value",
        "aten.scatter_add_.default",
        # shape and views
        "aten.unflatten.int", "aten.narrow.default", "aten.movedim.int", "aten.diagonal.default", "aten.roll.default",
        "aten.flip.default", "aten.squeeze.default", "aten.detach_.default", "aten.tensor_split.sections",
        "aten.tensor_split.indices", "aten.numpy_T.default", "aten.view_as.default",
        # linear algebra: einsum's equation is checked against a grammar (argcheck._STR_PATTERNS)
        "aten.einsum.default",
        "aten.repeat_interleave.self_int",
    }
)  # fmt: skip
# Kept out, by class:
# - output size set by tensor values (nonzero, unique, masked_select, bincount, repeat_interleave.Tensor and
#   .self_Tensor, tensor_split.tensor_indices_or_sections): the meta dry run cannot size them, so they would need
#   a bound of their own; none of the zoo's exportable architectures needs one, so they stay out.
# - random numbers beyond dropout (rand, randn, bernoulli, multinomial, normal): RNG state is not part of the IR.
# - files, storage and global state (from_file, set_, resize_, _foreach, the *_out overloads, copy to other devices).

# Python-level functions export emits for symbolic sizes and tuple outputs: getitem, and integer arithmetic on sizes
# (add, sub, mul, floordiv and mod by a literal, min, max; literals non-negative: tensorlink.ir.argcheck). A size
# may shrink as an input dim grows (K - seq, as the chunked scans of Mamba and gated delta nets compute), so the dry
# run at the declared maximum shapes does not bound smaller shapes by itself: tensorlink.ir.memory.ShapeGuard counts
# a forward at every new input shape before it runs (see test_size_that_shrinks_as_the_batch_grows_is_bounded).
PY_OPS: dict[str, Callable[..., Any]] = {
    "operator.getitem": operator.getitem,
    "operator.add": operator.add,
    "operator.mul": operator.mul,
    "operator.sub": operator.sub,
    "operator.floordiv": operator.floordiv,
    "operator.mod": operator.mod,
    "torch.sym_min": torch.sym_min,
    "torch.sym_max": torch.sym_max,
}

# What one call costs one dry run, in the cost units of tensorlink.ir.argcheck.MAX_COST (any other op: 1), measured
# on a 2-core VM with torch 2.13 (`python benchmarks/ir_fuzz.py --time-ops`, and the worst-case programs of
# tests/ir/test_tamper.py): composites that decompose into many aten calls on meta (attention's math path, the
# losses, the norms) and ops implemented by Python references (clamp, tril) cost 0.5-4 ms; diff loops its order.
# Operator set 2's entries were timed the same way against clamp and tril in one run (`--time-ops` on a list of
# ops, at load average 10, so ratios only): floor_divide, hardsigmoid, hardswish and xlogy cost about what clamp does.
DRY_RUN_WEIGHT: dict[str, int] = {
    "aten.cross_entropy_loss.default": 11,
    "aten.scaled_dot_product_attention.default": 10,
    "aten.clamp.default": 7,
    "aten.clamp.Tensor": 7,
    "aten.floor_divide.default": 8,
    "aten.hardsigmoid.default": 7,
    "aten.hardswish.default": 7,
    "aten.xlogy.Tensor": 6,
    "aten.logsumexp.default": 5,
    "aten.batch_norm.default": 6,
    "aten.group_norm.default": 5,
    "aten.diff.default": 4,
    **dict.fromkeys(
        (
            "aten.layer_norm.default", "aten.rms_norm.default", "aten.nll_loss.default", "aten.tril.default",
            "aten.triu.default", "aten.clamp_min.default", "aten.clamp_min.Tensor", "aten.softplus.default",
            "aten.glu.default",
        ),
        3,
    ),
    **dict.fromkeys(
        (
            "aten.celu.default", "aten.mish.default", "aten.clamp_max.default", "aten.elu.default", "aten.selu.default",
            "aten.relu6.default", "aten.leaky_relu.default", "aten.hardtanh.default",
        ),
        4,
    ),
    **dict.fromkeys(
        (
            "aten.log_softmax.int", "aten.mse_loss.default", "aten.gelu.default", "aten.arange.default",
            "aten.arange.start", "aten.arange.start_step", "aten.cumsum.default", "aten.where.ScalarOther",
            "aten.where.Scalar", "aten.where.ScalarSelf", "aten.all.default", "aten.any.default",
        ),
        2,
    ),
}  # fmt: skip

# Higher-order op for regions that run with gradients switched (e.g. rotary embeddings under no_grad).
SET_GRAD_REGION = "tl.set_grad_enabled"

# Mode-dependent ops: (position of the argument, keyword name) that carries the mode.
# dropout: train flag; batch_norm: training flag; SDPA: dropout_p (0 outside training).
MODE_DEPENDENT: dict[str, tuple[int, str]] = {
    "aten.dropout.default": (2, "train"),
    "aten.batch_norm.default": (5, "training"),
    "aten.scaled_dot_product_attention.default": (4, "dropout_p"),
}


def target_name(target: Any) -> str | None:
    """The IR name of a callable found in an exported graph, or None if the IR cannot express it."""
    if isinstance(target, torch._ops.OpOverload):
        name = f"aten.{target._opname}.{target._overloadname}" if target.namespace == "aten" else None
        return name
    for name, fn in PY_OPS.items():
        if target is fn:
            return name
    return None


ZERO_FILLED = frozenset({"aten.empty.memory_format", "aten.empty_like.default", "aten.new_empty.default"})


def _zero_filled(op: Callable[..., Any]) -> Callable[..., Any]:
    def zeroed(*args: Any, **kwargs: Any) -> Any:
        return op(*args, **kwargs).zero_()

    return zeroed


def _view_or_reshape(view: Callable[..., Any]) -> Callable[..., Any]:
    """aten.view, or a reshape (a copy) where the input's strides allow no view. Strides are not part of the IR:
    export records the capturing machine's kernels' strides, and another device's kernel (or the meta kernel of the
    dry run: SDPA's output is [B, H, L, E]-contiguous on meta and [B, L, H, E] on a CPU) may lay the same values out
    otherwise. A view that could not be taken was an error, so only programs that failed change. The dry run counts
    the copy where meta needs it; where only the device does, that one copy is outside tensorlink.ir.memory's count."""
    reshape = torch.ops.aten.reshape.default

    def viewed(x: Any, size: Any) -> Any:
        try:
            return view(x, size)
        except RuntimeError:
            if not isinstance(x, torch.Tensor) or x.is_contiguous():
                raise
            return reshape(x, size)

    return viewed


def resolve_for_run(name: str) -> Callable[..., Any]:
    """What the interpreter calls for an allow-listed name: ``resolve``, with uninitialised creation zero-filled and
    a view falling back to a reshape (_view_or_reshape)."""
    fn = resolve(name)
    if name in ZERO_FILLED:
        return _zero_filled(fn)
    return _view_or_reshape(fn) if name == "aten.view.default" else fn


def resolve(name: str) -> Callable[..., Any]:
    """The callable for an allow-listed name; anything else was refused before this is called."""
    if name in PY_OPS:
        return PY_OPS[name]
    _, op, overload = name.split(".")
    overload_packet = getattr(torch.ops.aten, op)
    fn = getattr(overload_packet, overload)
    if not isinstance(fn, torch._ops.OpOverload):
        raise TypeError(f"{name} is not an operator overload")
    return fn
