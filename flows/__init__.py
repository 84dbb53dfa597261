"""Prefect flows of lsq. Importing this package (before prefect) has lsq's and the tasks' own loggers
(In-Squeeze's resize lines, the tracking warnings) recorded at INFO as flow- and task-run logs, so they
show in the Prefect UI beside Prefect's; an operator's own ``PREFECT_LOGGING_EXTRA_LOGGERS`` or
logger levels win."""

import logging
import os

_OWN_LOGGERS = ("lsq", "tasks")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(_OWN_LOGGERS))
for _name in _OWN_LOGGERS:
    if logging.getLogger(_name).level == logging.NOTSET:  # Prefect copies handlers to extra loggers, not levels
        logging.getLogger(_name).setLevel(logging.INFO)
