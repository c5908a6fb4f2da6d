"""Finetuning jobs: the records and the manager that runs them (one import for the api layer)."""

from __future__ import annotations

from adaptgate.training.job_manager import JobManager
from adaptgate.training.job_records import JobEvent, JobRecord, JobSpec, JobState, Publish, PublishRequest
from adaptgate.training.runner import Runner, TrainingFailed

__all__ = [
    "JobEvent", "JobManager", "JobRecord", "JobSpec", "JobState", "Publish", "PublishRequest", "Runner", "TrainingFailed",
]
