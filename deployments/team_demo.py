"""A whole team stack on one machine, from packages alone, and one pipeline run across two workers.

    python -m deployments.team_demo [--config configs/team-demo.yaml] [--keep FOLDER] [key=value ...]

Starts on 127.0.0.1: PostgreSQL, an S3 object store (SeaweedFS) and an MLflow server on both
(``deployments/stack.py``), a Prefect server, a control worker (pool ``lsq-control``: runs the
pipeline's own flow run) and two unit workers (pool ``lsq-gpu``, one flow run at a time each: one
per GPU on real machines). Each worker has its own folder, ``HOME`` and cache, and no folder is
shared between them: units exchange adapters and records only through ``storage.root`` in the
object store, and the registry only through the MLflow server. It deploys the unit flow and the
pipeline, runs the pipeline deployment, prints what ran where, and stops every process it started,
also on failure, Ctrl-C or SIGTERM. A failure is one line ``team_demo: error: ...`` on stderr
(a server that did not start: its name, command line, port and last output) and exit status 1
(2 for bad input). Otherwise the last line on stdout is one JSON object::

    {"tracking_backend": "postgresql://lsq@127.0.0.1:PORT/mlflow", "artifact_root": "s3://lsq/mlflow",
     "storage_root": "s3://lsq/runs", "workers": {"worker-a": ["source-r32", ...], ...},
     "versions": [{"version": "1", "label": "source-r32", "artifact_uri": "s3://lsq/mlflow/..."}, ...],
     "champion": "cont-r4"}
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from flows.server import terminate_on_sigterm
from lsq.errors import LsqError, one_line
from lsq.processes import ServerFailed

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "team-demo.yaml"
CONTROL_POOL = "lsq-control"
UNIT_WORKERS = ("worker-a", "worker-b")


def team_config(config: str | Path, overrides: list[str], tracking_uri: str, storage_root: str) -> dict[str, Any]:
    """The pipeline config as one mapping (passed whole to the deployment: no shared config file)."""
    from lsq.pipeline_config import load_pipeline_config

    cfg = load_pipeline_config(config, [f"tracking.tracking_uri={tracking_uri}", f"storage.root={storage_root}",
                                        "orchestration.runner=work-pool", *overrides])
    return cfg.model_dump(mode="json")


def summary(tracking_uri: str, cfg: dict[str, Any], artifact_root: str) -> dict[str, Any]:
    """What the latest pipeline run of ``cfg`` ran where and registered, read back from the MLflow server alone."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    name = cfg["tracking"]["registered_model"]
    [parent] = client.search_runs([experiment.experiment_id], f"tags.`lsq.registered_model` = '{name}'", order_by=["attributes.start_time DESC"],
                                  max_results=1)
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    workers: dict[str, list[str]] = {}
    for child in sorted(children, key=lambda r: r.info.start_time):
        workers.setdefault(child.data.tags.get("lsq.worker", "?"), []).append(child.data.tags["lsq.variant"])
    by_run = {c.info.run_id: c for c in children}
    versions = []
    for v in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
        if v.run_id in by_run:
            uri = by_run[v.run_id].info.artifact_uri.replace("mlflow-artifacts:", artifact_root, 1)
            versions.append({"version": v.version, "label": by_run[v.run_id].data.tags["lsq.variant"],
                             "worker": by_run[v.run_id].data.tags.get("lsq.worker"), "artifact_uri": f"{uri}/adapter"})
    champion = client.get_model_version_by_alias(name, cfg["promotion"]["champion_alias"])
    return {"workers": workers, "versions": versions,
            "champion": client.get_run(champion.run_id).data.tags.get("lsq.variant")}


def in_object_store(store, versions: list[dict[str, Any]]) -> int:
    """Check that every version's adapter files are objects in the store (read with its own keys)."""
    client = store.client()
    for v in versions:
        prefix = v["artifact_uri"].removeprefix(f"s3://{store.bucket}/")
        names = {o["Key"].rsplit("/", 1)[-1] for o in
                 client.list_objects_v2(Bucket=store.bucket, Prefix=prefix + "/").get("Contents", [])}
        if not {"adapter_config.json", "adapter_model.safetensors"} <= names:
            raise RuntimeError(f"version {v['version']}: no adapter files under {v['artifact_uri']}")
    return len(versions)


def load_from_third_folder(tracking_uri: str, name: str, versions: list[dict[str, Any]], folder: Path) -> int:
    """Download every version's adapter through the tracking server alone (no object-store credentials)
    into ``folder``, a machine of its own, and check it against the digest registered with it."""
    import os

    from mlflow import MlflowClient

    from lsq.workdir import adapter_digest
    from tasks.tracking import download_adapter
    from tasks.tracking.model_registry import DIGEST_TAG

    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("AWS_", "MLFLOW_S3_"))}
    try:
        client = MlflowClient(tracking_uri)
        for v in versions:
            local = download_adapter(tracking_uri, name, v["version"], str(folder / f"v{v['version']}"))
            registered = client.get_model_version(name, v["version"]).tags[DIGEST_TAG]
            if adapter_digest(local) != registered:
                raise RuntimeError(f"version {v['version']}: the adapter loaded through {tracking_uri} is not the "
                                   f"one registered ({registered[:12]})")
    finally:
        os.environ.update(hidden)
    return len(versions)


def run_demo(folder: Path, config: str | Path, overrides: list[str], heartbeat_timeout: float = 90.0,
             cpus: dict[str, str] | None = None, out=print) -> dict[str, Any]:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments import team
    from deployments.processes import PrefectServer, Worker
    from deployments.stack import TeamServers
    from flows.server import drain_prefect_workers

    started = time.perf_counter()
    with ExitStack() as stack:
        servers = stack.enter_context(TeamServers(folder / "servers"))
        store = servers.object_store
        prefect = stack.enter_context(PrefectServer(folder / "prefect"))
        out(f"servers up in {time.perf_counter() - started:.0f} s: MLflow {servers.tracking_uri} "
            f"(backend {servers.postgres.redacted_uri}, artifacts s3://{store.bucket}/mlflow), "
            f"S3 {store.endpoint_url}, Prefect {prefect.api_url}")
        storage_root = f"s3://{store.bucket}/runs"
        cfg = team_config(config, overrides, servers.tracking_uri, storage_root)
        with temporary_settings({PREFECT_API_URL: prefect.api_url}):
            stack.callback(drain_prefect_workers)
            team.setup(team.UNIT_POOL, heartbeat_timeout)
            team.create_pool(CONTROL_POOL, "lsq pipelines: the flow runs that dispatch units and register")
            deployment = team.deploy_pipeline("team-demo", cfg, CONTROL_POOL)
            # workers see the tracking URL and the storage root's credentials; the MLflow server alone
            # holds the credentials of its artifact store
            env = {"MLFLOW_TRACKING_URI": servers.tracking_uri, **store.env()}
            for name, pool in (("control", CONTROL_POOL), *((w, team.UNIT_POOL) for w in UNIT_WORKERS)):
                worker = Worker(name, folder / name, pool, prefect.api_url, env=env, cpus=(cpus or {}).get(name))
                stack.callback(worker.stop)
                worker.start()
            out(f"workers: control ({CONTROL_POOL}), {', '.join(UNIT_WORKERS)} ({team.UNIT_POOL}), "
                f"each in its own folder under {folder}")
            ran = time.perf_counter()
            run = run_deployment(deployment, timeout=None)
            seconds = time.perf_counter() - ran
            if not run.state.is_completed():
                raise RuntimeError(f"pipeline flow run {run.name} ended {run.state.name}: {run.state.message}; "
                                   f"logs under {folder}")
        result = summary(servers.tracking_uri, cfg, f"s3://{store.bucket}/mlflow")
        stored = in_object_store(store, result["versions"])
        checked = load_from_third_folder(servers.tracking_uri, cfg["tracking"]["registered_model"],
                                         result["versions"], folder / "reader")
        out(f"{stored} versions stored in s3://{store.bucket}/mlflow; {checked} loaded through "
            f"{servers.tracking_uri} into a fourth folder with no S3 keys, digests match")
        result = {"tracking_backend": servers.postgres.redacted_uri, "artifact_root": f"s3://{store.bucket}/mlflow",
                  "storage_root": storage_root, **result, "pipeline_seconds": round(seconds, 1)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.team_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG), help="pipeline YAML (default configs/team-demo.yaml)")
    parser.add_argument("--keep", metavar="FOLDER", help="work in FOLDER and keep it (logs, databases); "
                        "default: a temporary folder, removed at the end")
    parser.add_argument("--heartbeat-timeout", type=float, default=90.0,
                        help="seconds without a heartbeat before a unit's flow run counts as crashed")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings that differ from the config")
    args = parser.parse_args(argv)
    terminate_on_sigterm()
    folder = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="lsq-team-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = run_demo(folder, args.config, list(args.overrides), args.heartbeat_timeout,
                          out=lambda line: print(line, flush=True))
    except (ServerFailed, RuntimeError, OSError) as exc:  # a server that did not start, a run that failed
        print(f"team_demo: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except LsqError as exc:  # bad input (the config, an override)
        print(f"team_demo: error: {one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print("\nwhat ran where:")
    for worker, labels in result["workers"].items():
        print(f"  {worker:10s} {', '.join(labels)}")
    print(f"registered: {len(result['versions'])} versions; champion {result['champion']}; "
          f"pipeline {result['pipeline_seconds']:.0f} s")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
