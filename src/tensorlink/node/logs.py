"""Log set-up: our lines readable, libp2p's warnings kept but its known noise filtered.

py-libp2p sets its logger to propagate=False and prints through Python's last-resort handler; DHT
streams log thousands of harmless "Failed to read DHT message" warnings, and shutdown prints
LifecycleError tracebacks (both seen with py-libp2p 0.8.1).
"""

from __future__ import annotations

import logging

_NOISE = (
    "Failed to read DHT message",
    "LifecycleError",
    "Failed to open stream",
    "fail to deliver message to subscription",
    "Error in peer connection handler",
    "Failed to upgrade",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(marker in text for marker in _NOISE)


def setup_logging(verbosity: int) -> None:
    """0: our INFO and libp2p's ERROR; 1: our DEBUG; 2: libp2p's DEBUG too."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(_DropNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("tensorlink").setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    libp2p = logging.getLogger("libp2p")
    libp2p.propagate = True
    libp2p.handlers[:] = []
    libp2p.setLevel(logging.DEBUG if verbosity >= 2 else logging.ERROR)
    for name, logger in logging.Logger.manager.loggerDict.items():
        if name.startswith("libp2p.") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.NOTSET)  # some set their own level; let them inherit libp2p's
            logger.handlers[:] = []
            logger.propagate = True
