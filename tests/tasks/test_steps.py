"""Pieces of tasks/steps.py that decide retries and what Prefect keeps (the tasks themselves run in tests/flows)."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

import tasks.promotion
import tasks.steps
from lsq.errors import LsqError
from tasks.steps import retry_unless_bad_input


def test_bad_input_is_not_retried_but_other_failures_are():
    assert retry_unless_bad_input(None, None, Failed(data=RuntimeError("connection reset"))) is True
    assert retry_unless_bad_input(None, None, Failed(data=LsqError("data.source: no such file"))) is False
    assert retry_unless_bad_input(None, None, Completed(data=1)) is True


def test_no_task_asks_prefect_to_persist_or_cache_its_result():
    """Results stay in the steps' work folders as validated JSON; Prefect writes no (pickled) result file."""
    from prefect import Task

    found = [t for m in (tasks.steps, tasks.promotion) for t in vars(m).values() if isinstance(t, Task)]
    assert len(found) >= 8
    for t in found:
        assert t.persist_result is False and t.cache_policy is NO_CACHE, t.name
