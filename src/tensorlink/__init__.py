"""TensorLink: train and run PyTorch models across peers on the internet.

The native extension ``tensorlink._C`` is required: there is no slow pure-Python fallback that could
hide a broken build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

try:
    from tensorlink import _C  # noqa: F401  (imported to fail early and loudly)
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "tensorlink's native extension tensorlink._C is not built or does not load "
        f"({exc}). Build it from the project root with `make install` (or "
        "`pip install --no-build-isolation -e .` inside a venv that already has torch==2.13.0)."
    ) from exc

__all__ = ["LocalSwarm", "OffloadError", "OffloadedModel", "offload"]

if TYPE_CHECKING:  # what __getattr__ returns, for type checkers and editors
    from tensorlink.local import LocalSwarm
    from tensorlink.pipeline.offload import OffloadedModel, OffloadError, offload


def __getattr__(name: str) -> object:
    """The public surface, imported on first use: a node process never pays for the pipeline's imports."""
    if name in ("offload", "OffloadedModel", "OffloadError"):
        from tensorlink.pipeline import offload

        return getattr(offload, name)
    if name == "LocalSwarm":
        from tensorlink.local import LocalSwarm

        return LocalSwarm
    raise AttributeError(f"module 'tensorlink' has no attribute {name!r}")
