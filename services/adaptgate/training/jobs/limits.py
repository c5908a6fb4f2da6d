"""What one server allows its jobs: how many run at once, for how long, and the LoRA rank it can serve."""

from __future__ import annotations

from dataclasses import dataclass

from adaptgate.errors import ResourceExhausted

DEFAULT_MAX_JOB_SECONDS = 6 * 3600


@dataclass(frozen=True)
class JobLimits:
    """What one server allows: jobs in flight per tenant and in all (0 = no limit), a job's wall-clock
    seconds, and the LoRA rank its adapter store accepts (training a rank publishing refuses wastes the run)."""

    active_per_tenant: int = 4
    active_total: int = 32
    max_job_seconds: int = DEFAULT_MAX_JOB_SECONDS
    max_lora_rank: int = 16

    def time_limit(self, max_seconds: int) -> int:
        """A job's limit: what it asked for (0 = the server's), never above the server's."""
        return min(max_seconds or self.max_job_seconds, self.max_job_seconds)

    def check_room(self, tenant: str, tenant_active: int, total_active: int) -> None:
        """Refuses one more job when the tenant, or the server, is at its limit of queued and running jobs."""
        if self.active_per_tenant and tenant_active >= self.active_per_tenant:
            raise ResourceExhausted(
                f"tenant {tenant!r} already has {tenant_active} queued or running jobs (the limit is "
                f"{self.active_per_tenant}); wait for one to finish or cancel one"
            )
        if self.active_total and total_active >= self.active_total:
            raise ResourceExhausted(
                f"the server already has {total_active} queued or running jobs (the limit is {self.active_total}); "
                "submit again when one has finished"
            )
