"""What MLflow and Prefect show after a pipeline run, photographed in a real browser (headless Chromium).

    python docs/screenshots.py                                        # a tiny pipeline in a temporary folder first
    python docs/screenshots.py --store sqlite:///mlruns/mlflow.db     # a finished store (after make demo): MLflow only

Starts ``mlflow server`` on 127.0.0.1 (a free port) over the store, waits until it answers, then runs
``chromium --headless --screenshot`` (Debian: ``apt-get install chromium``) on each page, with a fresh
browser profile (no remembered UI state: what a new visitor sees), into ``docs/screenshots/``:

- ``runs.png``: the runs table at the URL the pipeline prints (the parent run with its description
  and summary metrics, its variants under it);
- ``charts.png``: the same runs as charts: the variants compared (rank, size and metric on
  parallel axes, size against the metric, a bar chart per metric) and their training curves;
- ``parent.png``: the parent run (description with the decision, summary metrics, parameters);
- ``version.png``: the champion's model version (description, ``adapter_bytes`` tag).

With the tiny pipeline, it runs against a Prefect server with its UI (``prefect server start --ui``
on 127.0.0.1, its own folder), as a team's scheduled run would, and photographs:

- ``prefect-runs.png``: the flow runs (the pipeline and its sub-flow);
- ``prefect-flow-run.png``: the pipeline's sub-flow run: task runs named after their variant
  (``train cont-r4``, ``evaluate post-r2``, ``register ...``) and their log lines;
- ``prefect-artifact.png``: the variants table artifact, with links to the MLflow runs.

Every process it starts (pipeline, MLflow server, browser) ends with it, also on Ctrl-C or an error.
The tiny pipeline needs the MiniLM tokenizer in the Hugging Face cache (as the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deployments.common import child_env  # noqa: E402
from deployments.processes import PrefectServer  # noqa: E402
from lsq.processes import ServerProcess, die_with_parent_by, free_port  # noqa: E402

OUT = REPO / "docs" / "screenshots"
WINDOW = {"runs": "1800,800", "charts": "1800,2000", "parent": "1400,1800", "version": "1400,1100",
          "prefect-runs": "1600,900", "prefect-flow-run": "1600,1400", "prefect-artifact": "1400,1000"}
BROWSER_WAIT_MS = 60_000  # virtual time for the single-page app to fetch and draw (plots need about 60 s)


def tiny_store(folder: Path, prefect_api: str | None = None) -> str:
    """Run the pipeline on a tiny BERT and 48 rows (ranks 8 -> 4, 2) in ``folder`` (against the Prefect
    server at ``prefect_api``, else a temporary one); its tracking URI."""
    import yaml

    from tests.lsq.tiny import save_tiny_bert, write_classification_csv

    save_tiny_bert(folder / "tiny-bert")
    data = write_classification_csv(folder / "reviews.csv", n=48)
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    config = {
        "model": {"name": str(folder / "tiny-bert"), "device": "cpu"}, "data": {"source": str(data), "max_length": 16},
        "source_rank": 8, "target_ranks": [4, 2],
        "train": {"steps": 8, "batch_size": 8, "eval_batch_size": 32, "lr": 5e-3, "warmup_steps": 0,
                  "logging_steps": 1, "save_steps": 100, "seed": 0},
        "recover": {"steps": 4, "lr": 5e-3, "warmup_steps": 0}, "insqueeze": {"rank": 2},
        "tracking": {"tracking_uri": uri, "registered_model": "lsq-tiny"}, "output_dir": str(folder / "runs"),
    }
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    subprocess.run([sys.executable, "-m", "flows.squeeze_pipeline", str(folder / "tiny.yaml")], cwd=REPO, env=env,
                   check=True, start_new_session=True, preexec_fn=die_with_parent_by(signal.SIGTERM), timeout=1800)
    return uri


def pages(uri: str, base: str) -> dict[str, str]:
    """The pages to photograph, read from the store: runs view, charts, parent run, the champion's version.

    (A child run's own Model metrics tab is left out: it refreshes itself every few seconds, so its
    plots never settle in a headless browser; its curves are in ``charts.png``.)"""
    from mlflow import MlflowClient

    from tasks.promotion import run_url, runs_url

    client = MlflowClient(uri, registry_uri=uri)
    [model] = client.search_registered_models(max_results=1)
    champion = client.get_model_version_by_alias(model.name, "champion")
    child = client.get_run(champion.run_id)
    experiment, parent = child.info.experiment_id, child.data.tags["mlflow.parentRunId"]
    local, ml = "http://127.0.0.1:5000", "?workflowType=machine_learning"  # a fresh browser: the runs layout
    runs = runs_url(uri, experiment).replace(local, base)
    return {
        "runs": runs,
        "charts": runs + "&compareRunsMode=CHART",
        "parent": run_url(uri, experiment, parent).replace(local, base),
        "version": f"{base}/#/models/{model.name}/versions/{champion.version}{ml}",
    }


def prefect_pages(api_url: str) -> dict[str, str]:
    """The Prefect UI pages of the pipeline's run: the flow runs, the sub-flow run with its task runs, the
    variants table artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    base = api_url.removesuffix("/api")
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["lsq-pipeline-run"])))
        artifacts = [a for a in client.read_artifacts() if a.flow_run_id == run.id and a.type == "table"]
    shots = {"prefect-runs": f"{base}/runs", "prefect-flow-run": f"{base}/runs/flow-run/{run.id}"}
    if artifacts:
        shots["prefect-artifact"] = f"{base}/artifacts/artifact/{artifacts[0].id}"
    return shots


def screenshot(browser: str, url: str, png: Path, profile: Path, window: str = "1400,900") -> None:
    """One headless Chromium screenshot of ``url`` (its own process group, killed on timeout)."""
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={profile}", f"--window-size={window}", f"--virtual-time-budget={BROWSER_WAIT_MS}",
            f"--screenshot={png}", url]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=die_with_parent_by(signal.SIGKILL))
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        err = b"timed out"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # renderer and GPU helpers left behind, if any
        except ProcessLookupError:
            pass
        proc.wait()
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no {png.name}: {err.decode(errors='replace')[-2000:]}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="tracking URI of a finished pipeline run; omitted: run a tiny pipeline first")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the PNGs go (default {OUT})")
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args(argv)
    if not args.browser:
        parser.exit(2, "screenshots: error: no chromium on PATH (Debian: apt-get install chromium)\n")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lsq-screenshots-") as tmp:
        work = Path(tmp)
        prefect = None if args.store else PrefectServer(work / "prefect", ui=True)
        server = ServerProcess("mlflow server", work / "mlflow-server.log")
        port = free_port()

        def launch(uri: str) -> None:
            server.spawn([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                          "--port", str(port), "--workers", "1"], child_env(), work, signal.SIGTERM, ports=(port,))

        def relaunch() -> None:  # its port was taken before it could bind it
            nonlocal port
            port = free_port()
            launch(uri)

        try:
            if prefect is not None:
                prefect.start().wait()
            uri = args.store or tiny_store(work, prefect.api_url if prefect else None)
            launch(uri)
            server.wait_until(lambda: answers(f"http://127.0.0.1:{port}/health"), 180, "answer on /health",
                              respawn=relaunch)
            base = f"http://127.0.0.1:{port}"
            shots = pages(uri, base)
            if prefect is not None:
                shots.update(prefect_pages(prefect.api_url))
            for name, url in shots.items():
                started = time.perf_counter()
                screenshot(args.browser, url, args.out / f"{name}.png", work / f"profile-{name}", WINDOW[name])
                print(f"{args.out / (name + '.png')}  {url}  ({time.perf_counter() - started:.0f} s)")
            stable = {k: v.replace(base, "http://127.0.0.1:5000") for k, v in shots.items()}
            if prefect is not None:
                stable = {k: v.replace(prefect.api_url.removesuffix("/api"), "http://127.0.0.1:4200")
                          for k, v in stable.items()}
            (args.out / "pages.json").write_text(json.dumps(stable, indent=1) + "\n")
        finally:
            server.stop(signal.SIGTERM, 10)
            if prefect is not None:
                prefect.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
