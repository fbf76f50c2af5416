"""Suite-wide settings: GPU tests skip with a reason where no CUDA device is usable; nothing else skips."""

from __future__ import annotations

import pytest


def _cuda_reason() -> str | None:
    import torch

    from tensorlink import _C

    if not torch.cuda.is_available():
        return "needs a CUDA GPU: torch sees none on this machine"
    if not _C.cuda_available():
        return "needs tensorlink._C built with CUDA (a CUDA toolkit at build time) and a visible device"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = _cuda_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
