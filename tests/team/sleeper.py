"""A flow that only sleeps, silently, for the process tests: it imports the ``flows`` package first, as every lsq
flow run does (``flows/__init__.py`` ties a flow run to its lsq worker)."""

import time

from prefect import flow

import flows  # noqa: F401 - the import every lsq flow run makes first


@flow(name="lsq-test-sleeper", persist_result=False)
def sleeper(seconds: float = 600.0) -> None:
    time.sleep(seconds)
