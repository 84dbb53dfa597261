"""Create what the deployments expect on a Prefect server: a process work pool and the compute limit.

    python -m deployments.setup [--pool lsq-process] [--slots N]

- work pool ``lsq-process`` (type process: flow runs are subprocesses of ``prefect worker start``),
  for ``deployments/prefect.yaml``; ``deployments.serve`` needs no pool;
- tag concurrency limit ``lsq-compute``: at most N task runs with that tag at once (training,
  squeezing, evaluation; see ``tasks/steps.py``). N defaults to one per GPU, 1 without one.

Idempotent: an existing pool is left as it is, an existing limit is set to N. Talks to PREFECT_API_URL
(the CLI equivalents: ``prefect work-pool create lsq-process --type process`` and
``prefect concurrency-limit create lsq-compute N``). A failure is one line ``setup: error: ...`` on
stderr: exit status 1 when the server is unreachable or refuses, 2 for bad input.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists, PrefectException

from lsq.errors import one_line
from tasks import COMPUTE_TAG

POOL = "lsq-process"


def default_slots() -> int:
    """One compute slot per CUDA device this process may use, 1 on a machine without one. Counted
    without torch (whose import took most of this command's 31 s): ``CUDA_VISIBLE_DEVICES`` when set,
    else the GPUs ``nvidia-smi -L`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d for d in visible.split(",") if d.strip()]
        return max(1, len(devices) if "-1" not in devices else len(devices[:devices.index("-1")]))
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 1
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1
    return max(1, sum(line.startswith("GPU ") for line in listed.splitlines()))


def create_pool(name: str, description: str) -> bool:
    """A process work pool named ``name`` (left as it is when it exists); True if it was created now."""
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template(),
                description=description))
            return True
        except ObjectAlreadyExists:
            return False


def setup(pool: str = POOL, slots: int | None = None) -> dict[str, object]:
    """Create the work pool (if missing) and set the ``lsq-compute`` tag limit; what the server now holds."""
    slots = default_slots() if slots is None else slots
    if slots < 1:
        raise ValueError(f"slots: {slots} must be at least 1")
    created = create_pool(pool, f"lsq flow runs as local subprocesses of `prefect worker start --pool {pool}`")
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=COMPUTE_TAG, concurrency_limit=slots)  # an upsert on the server
        limit = client.read_concurrency_limit_by_tag(COMPUTE_TAG)
        return {"pool": client.read_work_pool(pool).name, "pool_created": created,
                "tag": limit.tag, "slots": limit.concurrency_limit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.setup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", default=POOL, help=f"work pool name (default {POOL})")
    parser.add_argument("--slots", type=int, default=None, help="concurrent lsq-compute task runs (default: GPUs or 1)")
    args = parser.parse_args(argv)
    try:
        state = setup(args.pool, args.slots)
    except (httpx.HTTPError, PrefectException, RuntimeError, OSError) as exc:  # unreachable, refused
        from prefect.settings import PREFECT_API_URL

        print(f"setup: error: Prefect API {PREFECT_API_URL.value()}: {type(exc).__name__}: {one_line(exc)}",
              file=sys.stderr)
        return 1
    except ValueError as exc:  # bad input (--slots 0)
        print(f"setup: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"work pool {state['pool']} ({'created' if state['pool_created'] else 'exists'}); "
          f"tag limit {state['tag']} = {state['slots']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
