"""Validators: job admission, partitioning and matching (health, proof-of-learning checks and settlement come later)."""

from tensorlink.validator.client import request_job
from tensorlink.validator.matching import JobRefused, plan_job
from tensorlink.validator.service import JOB_PROTOCOL, JobService

__all__ = ["JOB_PROTOCOL", "JobRefused", "JobService", "plan_job", "request_job"]
