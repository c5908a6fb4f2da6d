"""Job progress off a terminal is a line every few seconds, not hundreds of redraws."""

from __future__ import annotations

import io

from adaptgate_client.cli.progress import JobProgress
from adaptgate_client.types import JobDetails, JobEvent, JobMetrics, JobState


def event(kind: str, progress: float, state: JobState = JobState.RUNNING, accuracy: float = 0.0, message: str = "") -> JobEvent:
    return JobEvent("job-1", 0, 0.0, state, kind, message, progress, JobMetrics(accuracy=accuracy), 3.0, JobDetails())


def feed(tty: bool) -> str:
    now = [0.0]
    out = io.StringIO()
    progress = JobProgress(out, tty=tty, every=5.0, clock=lambda: now[0])
    progress.update(event("state", 0.0, message="running"))
    for i in range(200):  # 20 s of progress events, ten a second
        now[0] += 0.1
        progress.update(event("progress", i / 200, message=f"embedded {i}/200 texts"))
        if i == 100:
            progress.update(event("eval", 0.5, accuracy=0.9, message="step 25/50"))
    progress.update(event("state", 1.0, JobState.SUCCEEDED, message="succeeded"))
    progress.close()
    return out.getvalue()


def test_off_a_terminal_progress_is_a_line_every_few_seconds_with_the_latest_metrics() -> None:
    text = feed(tty=False)
    lines = text.splitlines()
    assert "\r" not in text
    assert 5 <= len(lines) <= 9  # state, ~4 progress lines over 20 s, the eval, the end
    assert lines[0].startswith("[RUNNING]") and lines[-1].startswith("[SUCCEEDED] 100%")
    assert "acc=0.9000" in lines[-1] and "eta 3s" in lines[1]


def test_on_a_terminal_the_status_line_is_redrawn_in_place() -> None:
    text = feed(tty=True)
    assert text.count("\r") == 203 and text.count("\n") == 3  # one redraw per event; kept: 2 states and the eval
