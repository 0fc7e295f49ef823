"""The web UI's periodic update (jointdiff.ui.app._tick) at the function level: a job
number that is not in the queue is reported on the page and the updates go on."""

from __future__ import annotations

import pytest

pytest.importorskip("gradio")

from jointdiff.jobs.queue import JobQueue  # noqa: E402
from jointdiff.ui.app import _tick  # noqa: E402


def test_a_job_number_that_does_not_exist_is_reported_and_ticks_go_on(tmp_path):
    queue = JobQueue(tmp_path / "app", start=False)
    try:
        page, status, *_rest, table, gallery = _tick(queue, 42, {})
        assert "job 42 does not exist" in status and "jd-error-text" in status
        assert table == [] and gallery == []
        again = _tick(queue, 42, page)  # the next tick works the same (nothing raised, nothing stuck)
        assert "job 42 does not exist" in again[1]
        assert _tick(queue, None, page)[1] == "No job yet."
    finally:
        queue.close()
