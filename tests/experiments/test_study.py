"""The study engine (experiments/study.py): learning rates from validation only, resumable records, equal
budgets, and the aggregation checked against an independent computation; one real tiny study."""

from __future__ import annotations

import json
import math
import statistics

import pytest

import experiments.study as study_mod
from lsq.errors import LsqError
from experiments.study import Job, Study, StudyConfig, job_record, load_study_config
from experiments.study_report import read_records
from experiments.study_report import lr_table, markdown_table, mean_se, summarize
from lsq.records import StudyRecord
from tests.lsq.tiny import (
    built_once,
    count_trainings,
    save_tiny_bert,
    save_tiny_llama,
    write_causal_jsonl,
    write_classification_csv,
)


def small(**changes) -> StudyConfig:
    raw = dict(tasks=("movie", "nyt"), methods=("direct", "post", "cont"), ranks=(1, 4), seeds=(0, 1), steps=8,
               recover_steps=2, lrs=(1e-3, 3e-3), select_rank=4, select_seed=0)
    raw.update(changes)
    return StudyConfig(**raw)


def record(**fields) -> StudyRecord:
    """A record with made-up settings and sizes, ``fields`` changed."""
    base = dict(key="movie/s0/direct-r1/lr0.001", task="movie", method="direct", rank=1, seed=0, lr=1e-3, steps=8,
                train_seconds=1.0, wall_seconds=0.0, val_score=0.5, test_score=0.5, lora_params=10,
                trainable_params=10, adapter_bytes=40, test_examples=50)
    return StudyRecord(**{**base, **fields})


def fake_runner(calls: list[Job]):
    """Validation prefers lr 1e-3, test prefers 3e-3: a study that peeks at test would choose 3e-3."""

    def run(job: Job, study: Study) -> StudyRecord:
        calls.append(job)
        good = job.lr == 1e-3
        base = 0.6 + 0.01 * job.rank + 0.001 * job.seed
        return job_record(job, study, {
            "val_score": base + (0.1 if good else 0.0), "test_score": base + (0.0 if good else 0.1),
            "test_macro_f1": base, "lora_params": 100 * job.rank, "trainable_params": 100 * job.rank + 10,
            "adapter_bytes": 400 * job.rank, "test_examples": 50, "steps": study.config.steps, "train_seconds": 1.0})

    return run


def test_learning_rates_come_from_validation_and_every_cell_uses_them(tmp_path, monkeypatch):
    calls: list[Job] = []
    monkeypatch.setattr(study_mod, "run_job", fake_runner(calls))
    cfg = small()
    records = Study(cfg, tmp_path, log=lambda _: None).run_all()

    assert all(isinstance(r, StudyRecord) and r.chosen and r.budget == cfg.steps for r in records)
    chosen = [r for r in records if r.method in cfg.methods]
    assert {r.lr for r in chosen} == {1e-3}  # the test split would have said 3e-3
    cells = {(r.task, r.method, r.rank, r.seed) for r in chosen}
    assert cells == {(t, m, k, s) for t in cfg.tasks for m in cfg.methods for k in cfg.ranks for s in cfg.seeds}
    # the grid ran once per method at the selection rank and seed, for every rate
    tried = {(j.task, j.method, j.lr) for j in calls if j.rank == cfg.select_rank and j.seed == cfg.select_seed}
    assert {("movie", m, lr) for m in cfg.methods for lr in cfg.lrs} <= tried  # chosen on the first task
    assert not any(t == "nyt" and lr == 3e-3 for t, _, lr in tried)  # and only there
    # post and cont squeeze sources of their own budgets, each trained once per seed and rate
    sources = [j for j in calls if j.method.startswith("source")]
    assert len(sources) == len({(j.task, j.method, j.seed, j.lr) for j in sources})
    assert all(j.rank == cfg.source_rank for j in sources)


def test_rates_are_chosen_per_rank_from_each_methods_own_grid(tmp_path, monkeypatch):
    """Validation prefers the smallest rate at rank 1 and the largest at rank 4 (test the opposite):
    each rank gets its own rate, AdaLoRA is tuned over its own grid, and the report flags edge choices."""
    calls: list[Job] = []

    def run(job: Job, study: Study) -> StudyRecord:
        calls.append(job)
        grid = sorted(study.config.grid(job.method))
        want = grid[0] if job.rank == 1 else grid[-1]
        val = 0.7 + (0.1 if job.lr == want else 0.0) + 0.001 * job.seed
        return job_record(job, study, {
            "val_score": val, "test_score": 1.5 - val, "test_macro_f1": val, "lora_params": 10 * job.rank,
            "trainable_params": 10, "adapter_bytes": 40, "test_examples": 50, "steps": study.config.steps,
            "train_seconds": 1.0})

    monkeypatch.setattr(study_mod, "run_job", run)
    cfg = small(methods=("direct", "post", "adalora"), select_rank=None, lrs=(1e-3, 3e-3, 1e-2),
                method_lrs={"adalora": (1e-2, 3e-2, 1e-1)})
    study = Study(cfg, tmp_path, log=lambda _: None)
    records = study.run_all()

    lr = {(r.task, r.method, r.rank): r.lr for r in records}
    for task in cfg.tasks:
        assert lr[(task, "direct", 1)] == lr[(task, "post", 1)] == 1e-3
        assert lr[(task, "direct", 4)] == lr[(task, "post", 4)] == 1e-2
        assert (lr[(task, "adalora", 1)], lr[(task, "adalora", 4)]) == (1e-2, 1e-1)
        assert lr[(task, "source", cfg.source_rank)] == 1e-2  # chosen on its own validation (rank 64 is not 1)
    assert {j.lr for j in calls if j.method == "adalora"} == {1e-2, 3e-2, 1e-1}
    assert not any(j.task == "nyt" and j.lr == 3e-3 for j in calls)  # nyt ran the chosen rates only
    table = lr_table(records, cfg)
    assert "| direct | 0.001, 0.003, 0.01 | 0.001 (edge) | 0.01 (edge) |" in table
    assert "| adalora | 0.01, 0.03, 0.1 | 0.01 (edge) | 0.1 (edge) |" in table
    assert "choice(s) at the end of their grid" in table
    middle = lr_table([record(method="direct", rank=1, lr=3e-3)], cfg)
    assert "(edge)" not in middle and "| direct | 0.001, 0.003, 0.01 | 0.003 |" in middle


def test_records_are_an_output_not_a_cache(tmp_path, monkeypatch):
    calls: list[Job] = []
    monkeypatch.setattr(study_mod, "run_job", fake_runner(calls))
    study = Study(small(), tmp_path, log=lambda _: None)
    study.run_all()
    n = len(calls)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == n and len({json.loads(x)["key"] for x in lines}) == n
    assert read_records(tmp_path / "records.jsonl") == list(study.records.values())  # one record a line, as run
    # a second study asks its steps again (they reuse their finished work, see the real study below)
    Study(small(steps=9), tmp_path, log=lambda _: None).run_all()
    assert len(calls) == 2 * n and len((tmp_path / "records.jsonl").read_text().splitlines()) == 2 * n


def test_a_diverged_rate_is_never_chosen(tmp_path, monkeypatch):
    calls: list[Job] = []
    inner = fake_runner(calls)

    def run(job, study):
        rec = inner(job, study)
        if job.lr == 1e-3:  # the rate validation would prefer blows up
            rec = job_record(job, study, study_mod.diverged_scores(rec.steps, "accuracy"))
        return rec

    monkeypatch.setattr(study_mod, "run_job", run)
    s = Study(small(methods=("direct",)), tmp_path, log=lambda _: None)
    assert s.choose_lr("direct") == 3e-3
    # the diverged record is logged with NaN scores, and reads back as it was made
    [line] = [x for x in (tmp_path / "records.jsonl").read_text().splitlines() if '"diverged": true' in x]
    assert '"val_score": NaN' in line and '"test_score": NaN' in line
    [back] = [r for r in read_records(tmp_path / "records.jsonl") if r.diverged]
    assert back.lr == 1e-3 and math.isnan(back.val_score) and math.isnan(back.train_seconds) and back.lora_params == 0


def test_records_written_before_the_study_metric_still_load(tmp_path):
    """A records file of an older study (val_accuracy/test_accuracy, no metric/val_score/test_score) reads as
    accuracy records."""
    old = {"val_accuracy": 0.58, "test_accuracy": 0.6, "test_macro_f1": 0.59, "lora_params": 42240,
           "trainable_params": 43010, "adapter_bytes": 182224, "test_examples": 250, "steps": 50, "train_seconds": 4.9,
           "key": "movie/s0/direct-r1/lr0.001", "budget": 50, "wall_seconds": 5.2, "task": "movie", "seed": 0,
           "method": "direct", "rank": 1, "lr": 0.001, "fraction": None}
    (tmp_path / "records.jsonl").write_text(json.dumps(old) + "\n" + json.dumps({**old, "seed": 1}) + "\n")
    recs = read_records(tmp_path / "records.jsonl")
    assert [(r.metric, r.val_score, r.test_score, r.seed) for r in recs] == [("accuracy", 0.58, 0.6, 0), ("accuracy", 0.58, 0.6, 1)]
    assert summarize(recs)[("movie", "direct", 1)]["mean"] == pytest.approx(0.6)


def test_summary_and_table_against_a_hand_computation():
    recs = []
    for task, shift in (("a", 0.0), ("b", 0.2)):
        for seed, acc in enumerate((0.5, 0.6, 0.9)):
            recs.append(record(task=task, method="direct", rank=2, seed=seed, lr=1e-3, test_score=acc + shift,
                               lora_params=10))
            recs.append(record(task=task, method="cont", rank=2, seed=seed, lr=2e-3, test_score=0.7 + shift,
                               lora_params=10))
    out = summarize(recs)
    m, se = out[("a", "direct", 2)]["mean"], out[("a", "direct", 2)]["se"]
    assert m == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert se == pytest.approx(statistics.stdev([0.5, 0.6, 0.9]) / math.sqrt(3))
    # the task mean: per seed the mean over tasks, then over seeds
    per_seed = [(0.5 + 0.7) / 2, (0.6 + 0.8) / 2, (0.9 + 1.1) / 2]
    assert out[("mean", "direct", 2)]["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert out[("mean", "direct", 2)]["se"] == pytest.approx(statistics.stdev(per_seed) / math.sqrt(3))
    assert out[("mean", "cont", 2)]["se"] == pytest.approx(0.0)
    table = markdown_table(out, ["direct", "cont"], [2])
    assert "| a | 2 | 66.7 ± 12.0 | **70.0 ± 0.0** |" in table
    assert "| mean | 2 |" in table.splitlines()[-1]
    assert mean_se([3.0]) == (3.0, 0.0)


def test_bad_study_settings_are_refused_in_one_line():
    with pytest.raises(LsqError, match="select_rank: 3 is not one of ranks"):
        load_study_config("quick", ["select_rank=3"])
    with pytest.raises(LsqError, match="recover_steps"):
        load_study_config("quick", ["recover_steps=40"])
    with pytest.raises(LsqError, match="unknown preset"):
        load_study_config("huge", [])


@pytest.mark.slow
def test_a_real_tiny_study(tmp_path_factory, tmp_path, monkeypatch):
    """Every method really trains, squeezes and scores on a tiny BERT; budgets are equal."""
    model = built_once(tmp_path_factory, "tiny-bert", save_tiny_bert)
    data = write_classification_csv(tmp_path / "reviews.csv", n=120)
    cfg = StudyConfig(tasks=("tiny",), sources={"tiny": str(data)}, model=str(model), ranks=(1, 2), seeds=(0,),
                      source_rank=8, steps=6, recover_steps=2, lrs=(5e-3,), select_rank=2, batch_size=8,
                      max_eval=20, max_length=16)
    records = Study(cfg, tmp_path / "study", log=lambda _: None).run_all()
    assert all(r.train_seconds > 0 for r in records)

    # run again after a kill that cut one training step short: only that step runs again, from its
    # folder, and every other record comes back from the steps' own folders, unchanged
    steps_root = tmp_path / "study" / "steps"
    [cut] = [p for p in steps_root.glob("direct-r1-*/record.json")]
    cut.unlink()
    trained = count_trainings(monkeypatch)
    again = Study(cfg, tmp_path / "study", log=lambda _: None).run_all()
    assert trained == ["direct"]
    strip = lambda recs: sorted(r.model_dump_json(exclude={"wall_seconds", "train_seconds"}) for r in recs)  # noqa: E731
    assert strip(again) == strip(records)

    by = {(r.method, r.rank): r for r in records}
    assert set(by) == {(m, k) for m in cfg.methods for k in (1, 2)} | {("source", 8)}
    for (method, k), r in by.items():
        assert 0.0 <= r.test_accuracy <= 1.0 and r.test_examples > 0
        assert r.steps == cfg.steps, (method, k)  # one budget for all (cont: 4 at rank 8 + 2 recovery)
    for k in (1, 2):  # squeezed and direct adapters at rank k have the same LoRA size; AdaLoRA keeps rank-8 shapes
        assert by[("post", k)].lora_params == by[("cont", k)].lora_params == by[("direct", k)].lora_params
        assert by[("post", k)].retained_energy <= 1.0
    assert by[("post", 1)].lora_params * 2 == by[("post", 2)].lora_params


@pytest.mark.slow
def test_a_decoder_study_chooses_and_reports_its_own_metric(tmp_path_factory, tmp_path):
    """model_task causal_lm: every job scored by the configured metric (here exact_match), the same number as
    the evaluate step's own on validation and test; a classification metric is refused for a decoder."""
    from lsq.data import DataConfig, load_data
    from lsq.evaluate import evaluate_splits
    from lsq.models import ModelConfig

    model = built_once(tmp_path_factory, "tiny-llama", save_tiny_llama)
    data = write_causal_jsonl(tmp_path / "colours.jsonl", n=80)
    cfg = StudyConfig(tasks=("colours",), sources={"colours": str(data)}, model=str(model), model_task="causal_lm",
                      metric="exact_match", max_new_tokens=3, methods=("direct", "cont"), ranks=(2,), seeds=(0,),
                      source_rank=8, steps=6, recover_steps=2, lrs=(5e-3,), method_lrs={"cont": (5e-3,)},
                      batch_size=8, max_eval=12, max_length=24)
    records = Study(cfg, tmp_path / "study", log=lambda _: None).run_all()
    assert {(r.method, r.rank) for r in records} == {("direct", 2), ("cont", 2)}
    direct = next(r for r in records if r.method == "direct")
    assert direct.metric == "exact_match" and direct.test_accuracy is None and direct.val_accuracy is None
    [adapter] = [p.parent for p in (tmp_path / "study" / "steps").glob("direct-r2-*/adapter/adapter_config.json")]
    scores = evaluate_splits(adapter, ModelConfig(name=str(model), task="causal_lm"),
                             DataConfig(source=str(data), task="causal_lm", max_eval=12, max_length=24, max_new_tokens=3),
                             data=load_data(cfg.data("colours")))
    assert direct.val_score == scores["validation"]["exact_match"]
    assert direct.test_score == scores["test"]["exact_match"]
    with pytest.raises(ValueError, match="metric: 'accuracy' is not a causal_lm score"):
        StudyConfig(model_task="causal_lm")


def test_in_squeeze_front_loaded_stages(tmp_path):
    """in_first_fraction puts that share of the budget at the source rank; the rest is split evenly."""
    assert study_mod.front_loaded(50, 7, 0.6) == [30, 4, 4, 3, 3, 3, 3]
    assert study_mod.front_loaded(6, 4, 0.9) == [3, 1, 1, 1]  # every later stage keeps a step
    assert study_mod.front_loaded(10, 1, 0.5) == [10]
    for first in (None, 0.6):
        study = Study(StudyConfig(in_first_fraction=first), tmp_path / str(first), log=lambda _: None)
        for rank, stages in ((1, 7), (8, 4)):
            cfg = study_mod.job_train_config(study, Job("movie", 0, "in", rank, 1e-3), "in", rank, 50)
            assert len(cfg.stage_ranks) == stages and sum(cfg.stage_steps) == 50
            assert cfg.stage_steps[0] == (30 if first else 50 // stages + 1)
    with pytest.raises(LsqError, match="in_first_fraction"):
        load_study_config("quick", ["in_first_fraction=1.5"])
