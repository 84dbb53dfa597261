"""One pipeline's registry writes, as a separate process: ``python -m tests.tasks.registry_racer '<json>'``.

Used by tests/tasks/test_registry_concurrency.py to race two processes on one sqlite store. The
JSON names the store, the model, a shared adapter (and its run), this process's own adapter (its
run and score) and two rendezvous (files): every racer creates its file and waits for the others'
before it creates its version of the shared adapter, and again before it promotes. Prints one JSON
line: the shared version, its own version and its promotion decision.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def rendezvous(mine: str, everyone: list[str], timeout: float = 120) -> None:
    Path(mine).touch()
    deadline = time.monotonic() + timeout
    while not all(Path(p).exists() for p in everyone):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rendezvous: {[p for p in everyone if not Path(p).exists()]} never came")
        time.sleep(0.01)


def main(job: dict) -> dict:
    from lsq.models import ModelConfig
    from lsq.variants import Variant, decide
    from tasks import tracking
    from tasks.tracking import model_registry, store

    store.RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)  # two processes on one sqlite file: be patient
    uri, model, cfg = job["uri"], job["model"], ModelConfig(name=job["base"], device="cpu")
    data = {"lsq.dataset_fingerprint": "d1"}
    real = model_registry._ensure_registered_model

    def gated(*args):  # both racers have looked for the shared adapter (and found nothing) before either creates
        rendezvous(*job["created"])
        return real(*args)

    model_registry._ensure_registered_model = gated
    shared = tracking.register_variant(uri, model, job["shared_run"], Variant.model_validate(job["shared"]), cfg,
                                       {**data, "test_accuracy": "0.5"}, job["labels"])
    model_registry._ensure_registered_model = real
    own = Variant.model_validate(job["own"])
    version = tracking.register_variant(uri, model, job["own_run"], own, cfg,
                                        {**data, "test_accuracy": str(job["score"])}, job["labels"])
    client = tracking.client_for(uri)

    def against(champion: str | None):
        time.sleep(0.5)  # scoring the champion takes a while: long enough for the other racer to read the alias
        score = None if champion is None else float(client.get_model_version(model, champion).tags["test_accuracy"])
        return decide({own.label: job["score"]}, {own.label: 1000}, 0.0, score)

    rendezvous(*job["promoting"])
    decision = tracking.promote_alias(uri, model, "champion", against, {own.label: version})
    return {"shared": shared, "own": version, "decision": decision.model_dump()}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
