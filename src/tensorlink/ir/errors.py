"""Errors of the Stage IR."""


class IRError(ValueError):
    """A stage program that must not run: malformed, tampered, over a cap, or using a forbidden op."""


class CaptureError(ValueError):
    """A model that cannot become a stage program; the message names the module and the reason."""
