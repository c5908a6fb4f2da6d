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

    def listen(self, job_id: str) -> asyncio.Event:
        """The Event the job's next change sets. Take it *before* reading the log: reading awaits the
        database's thread, and a change made meanwhile then still wakes the watcher."""
        return self._events.setdefault(job_id, asyncio.Event())

    @staticmethod
    async def wait(change: asyncio.Event, timeout: float) -> None:
        """Returns at the change `listen` promised or after `timeout` seconds, whichever is first."""
        try:
            await asyncio.wait_for(change.wait(), timeout)
        except TimeoutError:
            pass
