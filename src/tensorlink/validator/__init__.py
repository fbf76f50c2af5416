"""Validators: job admission, partitioning and matching (health, proof-of-learning checks and settlement come later)."""

from tensorlink.validator.client import request_job
from tensorlink.validator.matching import JobRefused, plan_job
from tensorlink.validator.service import JobService

__all__ = ["JobRefused", "JobService", "plan_job", "request_job"]
