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


@pytest.mark.parametrize("first_to_write", ["better", "worse"])
def test_without_a_shared_lock_compare_and_set_ends_on_the_better_version(
        mlflow_uri, variants, base_dir, monkeypatch, first_to_write):
    """No lock: both decide against "no champion" and both pass the check before writing; the writes
    land one after the other, inside the other's settling time. Either order ends with the better one."""
    @contextmanager
    def no_lock(uri, model_name):
        yield "compare-and-set"

    monkeypatch.setattr(promotion_lock, "registry_lock", no_lock)
    worse, better = variants[0], variants[2]
    v_worse, v_better = _register(mlflow_uri, worse, base_dir, 0.80), _register(mlflow_uri, better, base_dir, 0.90)
    both_checked = threading.Barrier(2)
    first_written, second_written = threading.Event(), threading.Event()
    real_set_alias = promotion_lock.set_alias
    calls = {"better": 0, "worse": 0}

    def set_alias(*args):
        me = threading.current_thread().name
        calls[me] += 1
        if calls[me] == 1:  # the first write of each: both have read "no champion" and checked it
            both_checked.wait(timeout=60)
            if me != first_to_write:
                assert first_written.wait(timeout=60)
        real_set_alias(*args)
        (first_written if me == first_to_write else second_written).set()

    def settle():  # the second write lands while the first writer settles (no sleeping in the test)
        if threading.current_thread().name == first_to_write:
            assert second_written.wait(timeout=60)

    monkeypatch.setattr(promotion_lock, "set_alias", set_alias)
    monkeypatch.setattr(promotion_lock, "_settle", settle)
    against = {"worse": _against(mlflow_uri, worse.label, 0.80), "better": _against(mlflow_uri, better.label, 0.90)}
    versions = {"worse": {worse.label: v_worse}, "better": {better.label: v_better}}
    results, errors = {}, []

    def promote(me):
        try:
            results[me] = tracking.promote_alias(mlflow_uri, MODEL, "champion", against[me], versions[me])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(me,), name=me) for me in ("worse", "better")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert against["worse"].seen[0] is None and against["better"].seen[0] is None  # a real race
    client = tracking.client_for(mlflow_uri)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == v_better
    if first_to_write == "better":  # the better one saw the worse one overwrite it, and decided again
        assert against["better"].seen == [None, v_worse]
        assert client.get_model_version(MODEL, v_better).tags["lsq.compared_to"] == v_worse
    else:  # the worse one saw the better one replace it; it compared with it and kept it
        assert against["worse"].seen == [None, v_better]
        assert results["worse"].alias == "challenger" and results["worse"].compared_to == v_better
        assert f"compared with champion version {v_better}" in results["worse"].reason


def test_promote_refuses_a_winner_it_has_no_version_for(mlflow_uri, variants, base_dir):
    v = _register(mlflow_uri, variants[0], base_dir, 0.8)
    with pytest.raises(KeyError, match="post-r2"):
        tracking.promote_alias(mlflow_uri, MODEL, "champion", _against(mlflow_uri, variants[0].label, 0.8), {"other": v})
    assert tracking.alias_version(mlflow_uri, MODEL, "champion") is None


# ----------------------------------------------------------------------------------- which lock
def test_registry_lock_kinds(mlflow_uri, tmp_path, monkeypatch, caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with tracking.registry_lock(mlflow_uri, "my model") as how:
        assert how == f"file lock {tmp_path.resolve() / 'mlflow.db.my-model.promote.lock'}"
    with tracking.registry_lock(f"file://{tmp_path}/mlruns", MODEL) as how:
        assert how.startswith("file lock ") and how.endswith(f"mlruns.{MODEL}.promote.lock")

    server = "postgresql://lsq:s3cret@db.example:5432/mlflow"
    # no Prefect API: compare-and-set, and no server started
    with temporary_settings(restore_defaults={PREFECT_API_URL}), tracking.registry_lock(server, MODEL) as how:
        assert how == "compare-and-set"

    def unreachable(name):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(promotion_lock, "_prefect_limit", unreachable)
    with caplog.at_level("WARNING", logger="tasks.tracking.promotion_lock"), tracking.registry_lock(server, MODEL) as how:
        assert how == "compare-and-set"
    assert "connection refused" in caplog.text and "s3cret" not in caplog.text and "lsq:***@db.example" in caplog.text

    taken = []

    @contextmanager
    def fake_concurrency(names, occupy=1, timeout_seconds=None, strict=False, **kwargs):
        taken.append((names, occupy, strict))
        yield

    import prefect.concurrency.sync

    monkeypatch.setattr(promotion_lock, "_prefect_limit", lambda name: True)
    monkeypatch.setattr(prefect.concurrency.sync, "concurrency", fake_concurrency)
    with tracking.registry_lock(server, "my model") as how:
        assert how == "prefect limit lsq-registry-my-model"
    assert taken == [("lsq-registry-my-model", 1, True)]
