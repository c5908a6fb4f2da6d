"""Finetuning jobs as the gateway runs them: records, checks at submit, the job store, and the manager.

The api layer imports `jobs.manager` (JobManager) and `jobs.records` (JobSpec, JobRecord, ...).
"""
