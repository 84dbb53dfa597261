"""Pieces of tasks/steps.py that decide caching and retries (the tasks themselves run in tests/flows)."""

from __future__ import annotations

import shutil

from prefect.states import Completed, Failed

from lsq.errors import LsqError
from tasks.steps import output_token, retry_unless_bad_input


def test_output_token_lives_as_long_as_its_output(tmp_path):
    out = tmp_path / "source" / "adapter"
    first = output_token(out)  # before the first run: a token, so the first result is stored under a key
    assert first and (tmp_path / "source" / ".adapter.cache-token").read_text() == first
    assert output_token(out) != first  # still no output: the run that made `first` did not finish
    out.mkdir()
    kept = output_token(out)
    assert output_token(out) == kept == output_token(out)
    shutil.rmtree(out)  # someone deleted the adapter: the cached result must not be used
    assert output_token(out) != kept


def test_bad_input_is_not_retried_but_other_failures_are():
    assert retry_unless_bad_input(None, None, Failed(data=RuntimeError("connection reset"))) is True
    assert retry_unless_bad_input(None, None, Failed(data=LsqError("data.source: no such file"))) is False
    assert retry_unless_bad_input(None, None, Completed(data=1)) is True
