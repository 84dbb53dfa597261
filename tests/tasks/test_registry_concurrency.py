"""Two pipelines registering and promoting at once, in threads and in separate processes, on one sqlite store.

Registration: the same adapter on the same data is one version, whoever creates it and however many
at once (each racer is held until every racer has looked and found nothing, so all of them create).
Promotion: the later promoter decides against the champion the earlier one set, and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from lsq.models import ModelConfig
from lsq.variants import decide
from tasks import tracking
from tasks.tracking import model_registry, promotion_lock
from tests.tasks.mlflow_store import LABELS, MODEL, child_run

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("mlflow_uri")
DATA = {"lsq.dataset_fingerprint": "d1"}


def _versions(uri: str) -> list:
    return tracking.client_for(uri).search_model_versions(f"name = '{MODEL}'")


def _register(uri, variant, base, score: float, run_id: str | None = None) -> str:
    run_id = run_id or child_run(uri, variant)[1]
    return tracking.register_variant(uri, MODEL, run_id, variant, ModelConfig(name=str(base)),
                                     {**DATA, "test_accuracy": str(score)}, LABELS)


def _against(uri: str, label: str, score: float, before=None):
    """What tasks/promotion.py passes to promote_alias: decide this run's winner against a version's recorded score."""
    client = tracking.client_for(uri)
    seen = []

    def against(version):
        seen.append(version)
        if before is not None:
            before(version)
        champion = None if version is None else float(client.get_model_version(MODEL, version).tags["test_accuracy"])
        return decide({label: score}, {label: 1000}, 0.0, champion)

    against.seen = seen
    return against


def _run_threads(*targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(fn):
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a racer hung"
    return errors


# ---------------------------------------------------------------------------------- registration
def test_threads_register_the_same_adapter_on_the_same_data_once(mlflow_uri, variants, base_dir, monkeypatch):
    n = 4
    v = variants[1]
    runs = [child_run(mlflow_uri, v)[1] for _ in range(n)]
    everyone_looked = threading.Barrier(n)
    real = model_registry._ensure_registered_model

    def gated(*args):  # called after the look for an existing version, before the creation
        everyone_looked.wait(timeout=60)
        return real(*args)

    monkeypatch.setattr(model_registry, "_ensure_registered_model", gated)
    got: dict[str, str] = {}
    errors = _run_threads(*[lambda r=r: got.__setitem__(r, _register(mlflow_uri, v, base_dir, 0.8, r)) for r in runs])
    assert not errors, errors
    [survivor] = _versions(mlflow_uri)
    assert str(survivor.version) == "1"  # n were created (1..n); the smallest is canonical
    assert got == {r: "1" for r in runs}  # every caller got its number: the one that exists
    assert survivor.run_id in runs and survivor.tags["lsq.last_run_id"] in runs
    assert survivor.tags["lsq.adapter_sha256"] == tracking.adapter_digest(v.adapter_dir)

    # idempotent afterwards: any of the runs again, or a new run, gets the same version and creates none
    assert _register(mlflow_uri, v, base_dir, 0.8, runs[-1]) == "1"
    assert _register(mlflow_uri, v, base_dir, 0.8) == "1"
    assert len(_versions(mlflow_uri)) == 1


def test_two_processes_register_the_same_adapter_once_and_promote_in_turn(mlflow_uri, variants, base_dir, tmp_path):
    shared, worse, better = variants[1], variants[0], variants[2]
    scores = {worse.label: 0.80, better.label: 0.90}
    jobs = []
    for name, own in (("a", worse), ("b", better)):
        jobs.append({
            "uri": mlflow_uri, "model": MODEL, "base": str(base_dir), "labels": LABELS,
            "shared": shared.model_dump(mode="json"), "shared_run": child_run(mlflow_uri, shared)[1],
            "own": own.model_dump(mode="json"), "own_run": child_run(mlflow_uri, own)[1], "score": scores[own.label],
            "created": [str(tmp_path / f"created-{name}"), [str(tmp_path / f"created-{x}") for x in "ab"]],
            "promoting": [str(tmp_path / f"promoting-{name}"), [str(tmp_path / f"promoting-{x}") for x in "ab"]],
        })
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.tasks.registry_racer", json.dumps(job)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for job in jobs]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    a, b = outs

    digest = tracking.adapter_digest(shared.adapter_dir)
    same = [mv for mv in _versions(mlflow_uri) if mv.tags["lsq.adapter_sha256"] == digest]
    assert len(same) == 1 and a["shared"] == b["shared"] == str(same[0].version)  # both got the one that exists
    assert len(_versions(mlflow_uri)) == 3

    # promotion: whoever went second compared against the champion the first one set
    first, second = (a, b) if a["decision"]["compared_to"] is None else (b, a)
    assert first["decision"]["compared_to"] is None and "no current champion" in first["decision"]["reason"]
    assert second["decision"]["compared_to"] == first["own"]
    assert f"compared with champion version {first['own']}" in second["decision"]["reason"]
    client = tracking.client_for(mlflow_uri)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == b["own"]  # the better one, either way
    if second is a:  # the worse one came second: kept as challenger
        assert a["decision"]["alias"] == "challenger"
        assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == a["own"]


# ------------------------------------------------------------------------------------- promotion
@pytest.mark.parametrize("later_is_better", [True, False])
def test_a_promotion_waits_for_the_one_in_progress_and_compares_with_its_champion(
        mlflow_uri, variants, base_dir, later_is_better):
    early, late = variants[0], variants[2]
    early_score, late_score = (0.80, 0.90) if later_is_better else (0.90, 0.80)
    v_early = _register(mlflow_uri, early, base_dir, early_score)
    v_late = _register(mlflow_uri, late, base_dir, late_score)
    inside = threading.Event()

    def hold(version):  # the early promoter is deciding (under the lock) when the late one starts
        inside.set()
        threading.Event().wait(0.4)

    early_against = _against(mlflow_uri, early.label, early_score, before=hold)
    late_against = _against(mlflow_uri, late.label, late_score)
    results = {}

    def promote_early():
        results["early"] = tracking.promote_alias(mlflow_uri, MODEL, "champion", early_against, {early.label: v_early})

    def promote_late():
        assert inside.wait(timeout=60)
        results["late"] = tracking.promote_alias(mlflow_uri, MODEL, "champion", late_against, {late.label: v_late})

    assert not _run_threads(promote_early, promote_late)
    assert early_against.seen == [None] and late_against.seen == [v_early]  # it read the alias after the move
    first, second = results["early"], results["late"]
    assert first.alias == "champion" and first.compared_to is None and "no current champion" in first.reason
    assert second.compared_to == v_early and f"compared with champion version {v_early}" in second.reason
    client = tracking.client_for(mlflow_uri)
    champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
    tags = client.get_model_version(MODEL, v_late).tags
    assert tags["lsq.reason"] == second.reason and tags["lsq.compared_to"] == v_early
    if later_is_better:
        assert second.alias == "champion" and champion == v_late
        assert "not worse than the champion's 0.8000" in second.reason
    else:
        assert second.alias == "challenger" and champion == v_early
        assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == v_late


def test_promote_refuses_a_winner_it_has_no_version_for(mlflow_uri, variants, base_dir):
    v = _register(mlflow_uri, variants[0], base_dir, 0.8)
    with pytest.raises(KeyError, match="post-r2"):
        tracking.promote_alias(mlflow_uri, MODEL, "champion", _against(mlflow_uri, variants[0].label, 0.8), {"other": v})
    assert tracking.alias_version(mlflow_uri, MODEL, "champion") is None


# ----------------------------------------------------------------------------------- which lock
def test_registry_lock_kinds(mlflow_uri, tmp_path, monkeypatch):
    with tracking.registry_lock(mlflow_uri, "my model") as how:
        assert how == f"file lock {tmp_path.resolve() / 'mlflow.db.my-model.promote.lock'}"
    with tracking.registry_lock(f"file://{tmp_path}/mlruns", MODEL) as how:
        assert how.startswith("file lock ") and how.endswith(f"mlruns.{MODEL}.promote.lock")
    taken = []

    def fake(kind):
        def lock(uri, model_name, timeout):
            taken.append((kind, uri))
            yield kind
        return contextmanager(lock)

    monkeypatch.setattr(promotion_lock, "advisory_lock", fake("advisory"))
    monkeypatch.setattr(promotion_lock, "lease_lock", fake("lease"))
    for uri, kind in (("postgresql://lsq:pw@db.example:5432/mlflow", "advisory"),
                      ("postgresql+psycopg2://db.example/mlflow", "advisory"),
                      ("http://127.0.0.1:5000", "lease"), ("https://mlflow.example", "lease"),
                      ("mysql://db.example/mlflow", "lease")):
        with tracking.registry_lock(uri, MODEL) as how:
            assert how == kind, uri
    assert [k for k, _ in taken] == ["advisory", "advisory", "lease", "lease", "lease"]


def test_the_lease_lock_lets_one_holder_in_at_a_time_and_leaves_nothing(mlflow_uri):
    """The lock of any MLflow store (a server above all): threads take it in turn; released, it is gone."""
    inside, most, order = [0], [0], []
    guard = threading.Lock()

    def hold(me):
        with promotion_lock.lease_lock(mlflow_uri, MODEL, timeout=120) as how:
            assert how == f"lease lsq-lock-{MODEL}"
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            order.append(me)
            threading.Event().wait(0.3)
            with guard:
                inside[0] -= 1

    assert not _run_threads(*[(lambda me=me: hold(me)) for me in range(3)])
    assert most[0] == 1 and sorted(order) == [0, 1, 2]
    assert promotion_lock._lock_tags(tracking.client_for(mlflow_uri), f"lsq-lock-{MODEL}") == (None, None)


def test_a_lease_whose_holder_was_killed_is_taken_over(mlflow_uri, caplog):
    """kill -9 of the holder: its lease stops being renewed; a waiter takes the lock over after lease_s."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom tasks.tracking.promotion_lock import lease_lock\n"
         f"with lease_lock({mlflow_uri!r}, {MODEL!r}, renew_s=0.2):\n"
         "    print('held', flush=True)\n    time.sleep(600)\n"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match="held by .*:%d:" % holder.pid):
            with promotion_lock.lease_lock(mlflow_uri, MODEL, timeout=2, lease_s=30):
                pass  # renewed every 0.2 s: never stale
        holder.kill()
        holder.wait(timeout=60)
        started = time.monotonic()
        with caplog.at_level("WARNING", logger="tasks.tracking.promotion_lock"):
            with promotion_lock.lease_lock(mlflow_uri, MODEL, timeout=120, lease_s=2) as how:
                assert how == f"lease lsq-lock-{MODEL}"
                owner, _ = promotion_lock._lock_tags(tracking.client_for(mlflow_uri), f"lsq-lock-{MODEL}")
                assert owner.split(":")[1] == str(os.getpid())
        assert time.monotonic() - started >= 2
        assert f":{holder.pid}:" in caplog.text and "taking over" in caplog.text
    finally:
        holder.kill()
        holder.wait()
