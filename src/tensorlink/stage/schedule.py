"""Micro-batch schedules: the order in which one stage runs forwards (F) and backwards (B).

GPipe runs every forward, then every backward (activation memory: all micro-batches). 1F1B runs
``n_stages - stage - 1`` forwards to fill the pipeline, then alternates one forward and one backward,
then drains (activation memory: at most ``n_stages`` micro-batches; the same bubble as GPipe,
(p-1)/(m+p-1) of the step). Sends never block a stage (each link queues them), so neither order can
deadlock as long as every stage follows the same schedule.
"""

from __future__ import annotations

from typing import Literal

Schedule = Literal["gpipe", "1f1b"]
SCHEDULES: tuple[Schedule, ...] = ("gpipe", "1f1b")
Action = tuple[Literal["F", "B"], int]


def actions(schedule: Schedule, stage: int, n_stages: int, micro_batches: int, backward: bool) -> list[Action]:
    """The F/B order of ``stage`` for one step; forwards only when ``backward`` is False."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} is outside 0..{n_stages - 1}")
    forwards: list[Action] = [("F", m) for m in range(micro_batches)]
    if not backward:
        return forwards
    backwards: list[Action] = [("B", m) for m in range(micro_batches)]
    if schedule == "gpipe":
        return forwards + backwards
    warmup = min(n_stages - stage - 1, micro_batches)
    order: list[Action] = forwards[:warmup]
    for i in range(micro_batches - warmup):
        order += [forwards[warmup + i], backwards[i]]
    return order + backwards[micro_batches - warmup :]
