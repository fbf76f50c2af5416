"""Stage: what the owner and the workers share to run a pipeline stage (links, schedules, StageRuntime, Session).

Below both sides: ``pipeline`` (the owner) and ``worker`` import from here and never from each other.
"""
