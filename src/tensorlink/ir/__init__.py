"""Stage IR: run a stage of any PyTorch model on a worker without ever running the user's code.

``capture`` (user side) exports a module with torch.export into a JSON graph of allow-listed aten
operators plus safetensors weights; ``load`` (worker side) validates every part of it and returns a
module that interprets it. ``split`` (user side) cuts one captured whole model into pipeline stage
programs, and ``profile`` gives the partitioner its cost units. Workers never call torch.export.load on
peer bytes: it unpickles (sample inputs, weights flagged ``use_pickle``) and exec()s guard code.
"""

from tensorlink.ir.capture import capture, cross_stage_ties
from tensorlink.ir.errors import CaptureError, IRError
from tensorlink.ir.loader import StageModule, load
from tensorlink.ir.program import StageProgram
from tensorlink.ir.split import Split, StagePart, Unit, profile, split

__all__ = [
    "CaptureError",
    "IRError",
    "Split",
    "StageModule",
    "StagePart",
    "StageProgram",
    "Unit",
    "capture",
    "cross_stage_ties",
    "load",
    "profile",
    "split",
]
