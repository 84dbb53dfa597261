"""The study as a Prefect flow: every record lands in MLflow as a child run of one parent run."""

from __future__ import annotations

import mlflow

import experiments.study as study_mod
from flows.study import study_flow
from tests.experiments.test_study import fake_runner


def test_study_flow_logs_every_record_to_mlflow(tmp_path, monkeypatch, mlflow_in_tmp):
    calls = []
    monkeypatch.setattr(study_mod, "run_job", fake_runner(calls))
    overrides = ["tasks=[movie, nyt]", "methods=[direct, cont]", "ranks=[1, 4]", "seeds=[0, 1]", "lrs=[0.001, 0.003]",
                 "select_rank=4"]
    text = study_flow(preset="quick", overrides=overrides, out=str(tmp_path / "study"), tracking_uri=mlflow_in_tmp)

    client = mlflow.MlflowClient(tracking_uri=mlflow_in_tmp)
    exp = client.get_experiment_by_name("lsq-study")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    keys = {line.split('"key": "')[1].split('"')[0] for line in (tmp_path / "study" / "records.jsonl").read_text().splitlines()}
    assert {c.data.tags["lsq.study_key"] for c in children} == keys and len(children) == len(calls) == len(keys)
    for c in children:
        assert {"test_score", "val_score", "lora_params", "train_seconds"} <= set(c.data.metrics)
        assert {"task", "method", "rank", "seed", "lr", "steps"} <= set(c.data.params)
    chosen = [c for c in children if c.data.params["method"] in ("direct", "cont")
              and c.data.params["lr"] == "0.001" and c.data.params["task"] == "nyt"]
    assert len(chosen) == 2 * 2 * 2  # nyt ran only at the rate chosen on movie's validation split
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"study.md", "study.png"} <= artifacts
    assert "| mean | 4 |" in text

    # a second flow run asks every job again (the steps, not the study, reuse finished work: see
    # tests/experiments/test_study.py) and logs every record under its own parent
    study_flow(preset="quick", overrides=overrides, out=str(tmp_path / "study"), tracking_uri=mlflow_in_tmp)
    assert len(calls) == 2 * len(keys)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == 2 * len(keys)


def test_sweep_flow_logs_every_budgets_records_to_mlflow(tmp_path, monkeypatch, mlflow_in_tmp):
    from flows.study import sweep_flow
    from tests.experiments.test_sweep import validation_runner

    calls = []
    monkeypatch.setattr(study_mod, "run_job", validation_runner(calls))
    overrides = ["budgets=[8, 20]", "ladder_budget=null", "tasks=[movie, nyt]", "seeds=[0, 1]", "lrs=[0.001, 0.003]",
                 "method_lrs={post: [0.001, 0.003], cont: [0.001, 0.003], in: [0.001, 0.003]}"]
    text = sweep_flow(preset="quick", overrides=overrides, out=str(tmp_path / "sweep"), tracking_uri=mlflow_in_tmp)

    client = mlflow.MlflowClient(tracking_uri=mlflow_in_tmp)
    exp = client.get_experiment_by_name("lsq-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.tags["lsq.kind"] == "sweep"
    keys = {c.data.tags["lsq.study_key"] for c in children}
    assert len(keys) == len(children) == len(calls)  # one child run per job, keys unique across budgets
    assert {c.data.params["budget"] for c in children} == {"8", "20"}
    assert {c.data.params.get("fraction") for c in children if c.data.params["method"] == "in"} == {None, "0.5"}
    assert {"sweep.md", "sweep.png", "sweep_summary.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "| 1 | 20 |" in text and "Where the order changes" in text
    assert (tmp_path / "sweep" / "sweep.md").read_text().strip() == text.strip()  # also beside the steps
