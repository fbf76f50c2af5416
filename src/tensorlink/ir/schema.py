"""The JSON schema of a stage program (msgspec): what a worker accepts, field by field."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

from tensorlink.wire.dtype_names import DTypeName

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.:\-]+\Z")]
MAX_NODES = 40_000  # in all graphs of a program; a 12-layer Llama with its loss has 838, so 126 layers about 8,500
MAX_ARGS = 64
MAX_LIST = 4096


class Ref(msgspec.Struct, tag="ref", forbid_unknown_fields=True):
    node: Name


class Lit(msgspec.Struct, tag="lit", forbid_unknown_fields=True):
    value: int | bool | str | None


class Float(msgspec.Struct, tag="float", forbid_unknown_fields=True):
    value: Annotated[str, msgspec.Meta(max_length=40)]  # repr(), so that inf/nan and every bit survive


class DType(msgspec.Struct, tag="dtype", forbid_unknown_fields=True):
    name: DTypeName


class Device(msgspec.Struct, tag="device", forbid_unknown_fields=True):
    """A device argument; the worker substitutes its own device, whatever was captured."""


class Layout(msgspec.Struct, tag="layout", forbid_unknown_fields=True):
    name: Literal["strided"]


class MemoryFormat(msgspec.Struct, tag="memory_format", forbid_unknown_fields=True):
    name: Literal["contiguous_format", "preserve_format", "channels_last"]


class List(msgspec.Struct, tag="list", forbid_unknown_fields=True):
    items: Annotated[list[Arg], msgspec.Meta(max_length=MAX_LIST)]


Arg = Union[Ref, Lit, Float, DType, Device, Layout, MemoryFormat, List]


class Node(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    target: Annotated[str, msgspec.Meta(max_length=128)]
    args: Annotated[list[Arg], msgspec.Meta(max_length=MAX_ARGS)]
    kwargs: Annotated[dict[Name, Arg], msgspec.Meta(max_length=MAX_ARGS)] = {}
    subgraph: Name | None = None  # for tl.set_grad_enabled


class Placeholder(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    kind: Literal["parameter", "buffer", "constant", "input"]
    target: Name | None = None  # the state name (parameters, buffers, constants)
    index: Annotated[int, msgspec.Meta(ge=0, le=MAX_ARGS)] | None = None  # position among user inputs


class Graph(msgspec.Struct, forbid_unknown_fields=True):
    placeholders: Annotated[list[Placeholder], msgspec.Meta(max_length=MAX_NODES)]
    nodes: Annotated[list[Node], msgspec.Meta(max_length=MAX_NODES)]
    outputs: Annotated[list[Arg], msgspec.Meta(max_length=MAX_LIST)]


Size = Annotated[int, msgspec.Meta(ge=0, le=2**31)]
Range = Annotated[list[Size], msgspec.Meta(min_length=2, max_length=2)]  # [min, max] of a dynamic dim
Dim = Union[Annotated[int, msgspec.Meta(ge=0, le=2**31)], Name]


class InputSpec(msgspec.Struct, forbid_unknown_fields=True):
    dtype: DTypeName
    shape: Annotated[list[Dim], msgspec.Meta(max_length=8)]


class Signature(msgspec.Struct, forbid_unknown_fields=True):
    positional: Annotated[int, msgspec.Meta(ge=0, le=MAX_ARGS)]
    keywords: Annotated[list[Name], msgspec.Meta(max_length=MAX_ARGS)]
    inputs: Annotated[list[InputSpec], msgspec.Meta(max_length=MAX_ARGS)]
    symbols: Annotated[dict[Name, Range], msgspec.Meta(max_length=MAX_ARGS)]  # dynamic dims: load dry-runs corners
    output: Literal["tensor", "tuple", "dict"]
    output_keys: Annotated[list[Name], msgspec.Meta(max_length=MAX_LIST)] = []


Expr = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]  # a sympy size expression: "s0", "s0*s1", "s1 + 1"


class ValueMeta(msgspec.Struct, forbid_unknown_fields=True):
    """What one value of the captured graph was, for splitting the program on the user's machine (workers
    ignore it, and split() leaves it out of stage programs): a tensor's dtype and shape, or a size's expression."""

    dtype: DTypeName | None = None  # None: not a tensor
    shape: Annotated[list[int | Expr], msgspec.Meta(max_length=16)] = []
    sym: Expr | None = None  # a size value (SymInt): its expression, e.g. "s70"


class Program(msgspec.Struct, forbid_unknown_fields=True):
    ops_version: int
    captured_train: bool
    signature: Signature
    graph: Graph
    subgraphs: dict[Name, Graph] = {}
    parameters: list[Name] = []
    buffers: list[Name] = []
    persistent_buffers: list[Name] = []
    constants: list[Name] = []
    buffer_mutations: dict[Name, Name] = {}  # output node name -> buffer updated with it
    tie_groups: list[list[Name]] = []
    # parameter name -> key of the storage it had at capture; equal keys in two stages captured in one
    # session mean one weight cut in two (GPT-2's wte and lm_head), whose gradients the pipeline must sum
    storage_keys: dict[Name, Annotated[str, msgspec.Meta(max_length=64)]] = {}
    # Capture metadata for split(): tensor and size values of the top-level graph (user inputs and nodes), and the
    # [min, max] of every size expression they use (capped like Signature.symbols). Empty in stage programs.
    values: dict[Name, ValueMeta] = {}
    dim_ranges: dict[Expr, Range] = {}
