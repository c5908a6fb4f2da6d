"""Wake-ups for job watchers: one asyncio.Event per watched job, replaced after every change.

Watchers re-read the event log from SQLite after each wake-up, so a signal carries nothing
and a missed one costs at most the safety timeout, never an event.
"""

from __future__ import annotations

import asyncio


class JobSignals:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def notify(self, job_id: str) -> None:
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        for job_id in list(self._events):
            self.notify(job_id)

    async def wait(self, job_id: str, timeout: float) -> None:
        """Returns at the job's next change or after `timeout` seconds, whichever is first.

        The Event is taken before the first suspension, so a caller that read the log just
        before awaiting this cannot miss a change made in between.
        """
        event = self._events.setdefault(job_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
