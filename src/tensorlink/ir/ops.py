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

OPS_VERSION = 1

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
)  # fmt: skip

# Python-level functions export emits for symbolic sizes and tuple outputs. Only operations under which a
# size can never shrink as an input dim grows (add, mul, floordiv by a literal), so that the dry run at the
# declared maximum shapes bounds every smaller shape too: (K - batch) or (K // batch) are refused, and so are
# negative literals (tensorlink.ir.argcheck checks their arguments).
PY_OPS: dict[str, Callable[..., Any]] = {
    "operator.getitem": operator.getitem,
    "operator.add": operator.add,
    "operator.mul": operator.mul,
    "operator.floordiv": operator.floordiv,
}

# What one call costs one dry run, in the cost units of tensorlink.ir.argcheck.MAX_COST (any other op: 1), measured
# on a 2-core VM with torch 2.13 (`python benchmarks/ir_fuzz.py --time-ops`, and the worst-case programs of
# tests/ir/test_tamper.py): composites that decompose into many aten calls on meta (attention's math path, the
# losses, the norms) and ops implemented by Python references (clamp, tril) cost 0.5-4 ms; diff loops its order.
DRY_RUN_WEIGHT: dict[str, int] = {
    "aten.cross_entropy_loss.default": 11,
    "aten.scaled_dot_product_attention.default": 10,
    "aten.clamp.default": 7,
    "aten.batch_norm.default": 6,
    "aten.group_norm.default": 5,
    "aten.diff.default": 4,
    **dict.fromkeys(
        (
            "aten.layer_norm.default", "aten.rms_norm.default", "aten.nll_loss.default", "aten.tril.default",
            "aten.triu.default", "aten.clamp_min.default",
        ),
        3,
    ),
    **dict.fromkeys(
        (
            "aten.log_softmax.int", "aten.mse_loss.default", "aten.gelu.default", "aten.arange.default",
            "aten.arange.start", "aten.arange.start_step", "aten.cumsum.default", "aten.where.ScalarOther",
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
