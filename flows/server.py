"""Prefect's temporary server, booted early: a light module (prefect only, imported lazily)."""

from __future__ import annotations

import threading


def boot_temporary_server() -> threading.Thread | None:
    """Start Prefect's temporary server now, in a thread, when this process will need one.

    With no ``PREFECT_API_URL``, the first flow run starts a temporary server (a uvicorn subprocess
    that imports Prefect's server, about 10 s on 2 cores) and waits for it. Booted from here, before
    this module imports torch, transformers and mlflow, it comes up on the other core meanwhile. Join
    the thread before the first flow run. ``None`` when an API URL is set or temporary servers are off.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    thread = threading.Thread(target=SubprocessASGIServer().start, name="prefect-server-boot", daemon=True)
    thread.start()
    return thread
