"""Prefect flows of lsq. Importing this package (before prefect) has lsq's and the tasks' own loggers
(In-Squeeze's resize lines, the tracking warnings) recorded at INFO as flow- and task-run logs, so they
show in the Prefect UI beside Prefect's; an operator's own ``PREFECT_LOGGING_EXTRA_LOGGERS`` or
logger levels win.

Under an lsq worker (``deployments.processes.Worker`` sets ``LSQ_EXIT_WITH_WORKER=1``) every flow run asks the
kernel to SIGKILL it when its worker dies: Prefect starts flow runs in sessions of their own, which a signal to
the worker's process group does not reach, so a stopped or lost worker would leave them running as orphans
(the pipeline's own flow run too). A lost worker takes its flow runs with it, as a lost machine would.
"""

import logging
import os
import signal

from lsq.processes import die_with_parent_by

_OWN_LOGGERS = ("lsq", "tasks")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(_OWN_LOGGERS))
for _name in _OWN_LOGGERS:
    if logging.getLogger(_name).level == logging.NOTSET:  # Prefect copies handlers to extra loggers, not levels
        logging.getLogger(_name).setLevel(logging.INFO)

if os.environ.get("LSQ_EXIT_WITH_WORKER") == "1":
    die_with_parent_by(signal.SIGKILL)()
