"""Remote: the user's thread's hold on one offloaded model's pipeline.

The pipeline is opened on first use, for what that use needs (training, evaluation or generation), and
opened again with training memory when a job that never trained starts training (its workers' weights are
still the model's own, so nothing is lost). Every job is asked for under a client (an identity) of its own,
as validators expect (they admit one job per owner identity at a time).

Every call into the client's loop goes through here, so the user sees one PipelineError, never a group of
them; after a failure in a running job the pipeline is closed and every later call fails at once with the
first error, instead of waiting on workers that may have dropped the job.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from tensorlink.pipeline.client import Client
from tensorlink.pipeline.driver import Pipeline, Settings
from tensorlink.pipeline.job import PipelineError, one_error
from tensorlink.pipeline.programs import Program
from tensorlink.wire.stage import ProgramKey

log = logging.getLogger(__name__)
T = TypeVar("T")
CLOSE_S = 15.0  # a failed job's close: the workers also drop a job whose owner went away


class OffloadError(ValueError):
    """The model or the arguments cannot be offloaded as given; the message says how to fix it."""


Connect = Callable[[], tuple[Client, str]]  # a started client and the validator it reached


class Remote:
    def __init__(self, connect: Connect, settings: Settings, *, fused: bool) -> None:
        self.connect = connect
        self.client, self.validator = connect()
        self.asked = False  # this client asked a validator for a job (the next job needs a new client)
        self.settings = settings
        self.fused = fused  # the backward runs with the forward (outputs="loss")
        self.pipeline: Pipeline | None = None
        self.failed: BaseException | None = None
        self.optimizer: tuple[str, dict[str, Any]] | None = None  # made on the workers once a job trains

    @property
    def trains(self) -> bool:
        """A training job is open (its workers hold gradients and optimizer state)."""
        return self.pipeline is not None and "train" in self.pipeline.programs

    def require(self) -> Pipeline:
        """The open pipeline; an error at once if it failed or was never opened."""
        if self.failed is not None:
            raise PipelineError(
                f"this offloaded model's pipeline failed earlier and was closed ({self.failed}); its workers no "
                "longer hold its state: offload the model again"
            )
        if self.pipeline is None:
            raise OffloadError("the pipeline starts on the first forward or generate() call; run one first")
        return self.pipeline

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(pipeline, *args)`` on the client's loop. A failure closes the pipeline for good (see module)."""
        pipeline = self.require()
        try:
            return self.client.call(fn, pipeline, *args)
        except Exception as exc:
            self.failed = one_error(exc)
            self._close(pipeline)
            if self.failed is exc:
                raise
            raise self.failed from exc

    def open(self, program: Program, key: ProgramKey) -> Pipeline:
        """Open a pipeline whose first program is ``program`` (closing the one open now); a set-up error leaves
        none open, so the next call sets up again."""
        if self.failed is not None:
            self.require()
        if self.pipeline is not None:
            self._close(self.pipeline)
            self.pipeline = None
        if self.asked:
            self.client.close()
            self.client, self.validator = self.connect()
        self.asked = True
        try:
            self.pipeline = self.client.call(
                lambda: Pipeline.open(self.client, self.validator, self.settings, program, key=key, fused=self.fused)
            )
        except Exception as exc:
            error = one_error(exc)
            if error is exc:
                raise
            raise error from exc
        if key == "train" and self.optimizer is not None:
            name, hyper = self.optimizer
            self.call(lambda p: p.make_optimizer(name, hyper))
        return self.pipeline

    def restart(self) -> None:
        """Close the open pipeline, whose workers' weights are no longer the model's; the next call opens one again
        (the optimizer is made there again, its state new)."""
        if self.failed is not None:
            self.require()
        if self.pipeline is not None:
            self._close(self.pipeline)
            self.pipeline = None

    def load(self, key: ProgramKey, program: Program) -> None:
        self.call(lambda p: p.load(key, program))

    def _close(self, pipeline: Pipeline) -> None:
        async def close() -> None:
            with trio.move_on_after(CLOSE_S):
                await pipeline.close()

        try:
            self.client.call(close)
        except Exception as exc:  # the network may be gone already
            log.info("closing the pipeline: %s", exc)

    def close(self) -> None:
        """Release the workers and stop the client."""
        if self.pipeline is not None and self.failed is None:
            self._close(self.pipeline)
        self.pipeline = None
        self.client.close()
