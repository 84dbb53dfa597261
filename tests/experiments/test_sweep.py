"""The budget sweep (experiments/sweep.py): per-budget choices from validation only (rates, In-Squeeze's
first-stage share), one pinned code version, the plan, crossings and ladder costs checked against
hand computations, and one real tiny sweep that resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import experiments.study as study_mod
import experiments.sweep as sweep_mod
from lsq.errors import LsqError
from experiments.study import Job, Study, StudyConfig, job_record
from experiments.sweep import Ladder, Sweep, SweepConfig, ladder_costs, load_sweep_config
from experiments.sweep_report import by_budget, crossings, ladder_section, report, write_report
from lsq.records import StudyRecord
from tests.experiments.test_study import record
from tests.lsq.tiny import built_once, count_trainings, save_tiny_bert, write_classification_csv

DOCS = Path(__file__).resolve().parents[2] / "docs"


def small(**changes) -> SweepConfig:
    study = dict(tasks=("movie", "nyt"), methods=("direct", "post", "cont", "in"), ranks=(1, 4), seeds=(0, 1),
                 lrs=(1e-3, 3e-3), method_lrs={"post": (1e-3, 3e-3), "cont": (1e-3, 3e-3), "in": (1e-3, 3e-3)},
                 in_fractions=(None, 0.5), select_rank=4)
    study.update(changes.pop("study", {}))
    return SweepConfig(study=StudyConfig(**study), **{"budgets": (8, 20), "ladder_budget": None, **changes})


def validation_runner(calls: list[tuple[int, Job]]):
    """Validation prefers lr 3e-3 at 8 steps and 1e-3 at 20, and the share 0.5; test prefers the others."""

    def run(job: Job, study: Study) -> StudyRecord:
        calls.append((study.config.steps, job))
        want = 3e-3 if study.config.steps == 8 else 1e-3
        good = (job.lr == want) + (job.fraction == 0.5)
        base = 0.6 + 0.01 * job.rank + 0.001 * job.seed + 0.002 * study.config.steps
        return job_record(job, study, {
            "val_score": base + 0.05 * good, "test_score": base + 0.05 * (2 - good), "test_macro_f1": base,
            "lora_params": 10 * job.rank, "trainable_params": 10 * job.rank, "adapter_bytes": 40 * job.rank,
            "test_examples": 50, "steps": study.config.steps, "train_seconds": float(study.config.steps)})

    return run


def test_each_budget_chooses_rates_and_stage_shares_on_validation(tmp_path, monkeypatch):
    calls: list[tuple[int, Job]] = []
    monkeypatch.setattr(study_mod, "run_job", validation_runner(calls))
    cfg = small()
    records = Sweep(cfg, tmp_path, log=lambda _: None).run_all()

    for budget, want in ((8, 3e-3), (20, 1e-3)):
        rows = [r for r in records if r.budget == budget]
        assert {r.lr for r in rows if r.method != "source"} == {want}  # test would have said the other
        assert {r.fraction for r in rows if r.method == "in"} == {0.5}
        assert {r.fraction for r in rows if r.method != "in"} == {None}
        assert {(r.task, r.method, r.rank, r.seed) for r in rows if r.method != "source"} == {
            (t, m, k, s) for t in cfg.study.tasks for m in cfg.study.methods for k in cfg.study.ranks
            for s in cfg.study.seeds}
        assert all(r.key.startswith(f"T{budget}/") and r.chosen for r in rows)
    # recovery inside each budget: 20% of it, at least one step
    assert [cfg.at(t).recover_steps for t in (8, 20)] == [2, 4]
    # the share grid ran on the selection task and seed only, at each rank, at the chosen rate
    equal = {(t, j.task, j.seed, j.rank, j.lr) for t, j in calls if j.method == "in" and j.fraction is None}
    assert {(task, seed) for _, task, seed, _, _ in equal} == {("movie", 0)}
    assert {(t, k, lr) for t, _, _, k, lr in equal} >= {(8, 1, 3e-3), (8, 4, 3e-3), (20, 1, 1e-3), (20, 4, 1e-3)}
    # the plan bounds what ran, budget by budget, and every job that ran was planned
    plan = Sweep.plan_of(cfg)
    for budget in (8, 20):
        ran = {j for t, j in calls if t == budget}
        planned = sweep_mod.planned_jobs(cfg.at(budget))
        assert len(ran) <= plan[budget]["jobs"] == len(planned)
        assert {(j.task, j.seed, j.method, j.rank) for j in ran} == {(j.task, j.seed, j.method, j.rank) for j in planned}


def test_the_report_says_how_many_seeds_each_budget_had(tmp_path, monkeypatch):
    monkeypatch.setattr(study_mod, "run_job", validation_runner([]))
    cfg = small(seeds_at={20: (0,)})
    records = Sweep(cfg, tmp_path, log=lambda _: None).run_all()
    assert {r.seed for r in records if r.budget == 20} == {0}
    assert "± standard error over seeds (1 at 20 steps, 2 at 8 steps);" in report(cfg, records, "cmd", 1.0)
    same = [r for r in records if r.budget == 8]
    assert "± standard error over 2 seeds;" in report(cfg, same, "cmd", 1.0)


def test_the_code_version_is_pinned(tmp_path, monkeypatch):
    monkeypatch.setattr(study_mod, "run_job", validation_runner([]))
    cfg = small(budgets=(8,))
    first = Sweep(cfg, tmp_path, log=lambda _: None)
    again = Sweep(cfg, tmp_path, log=lambda _: None)
    assert again.code == first.code and again.study(8).code == first.code
    monkeypatch.setattr(sweep_mod, "code_version", lambda: "other-code")  # code that can change adapters or scores
    with pytest.raises(LsqError, match="started with lsq code .* this is other-code"):
        Sweep(cfg, tmp_path, log=lambda _: None)
    monkeypatch.setattr(sweep_mod, "code_version", lambda: first.code)
    with pytest.raises(LsqError, match="other settings"):
        Sweep(small(budgets=(8, 16)), tmp_path, log=lambda _: None)


def test_crossings_against_a_hand_computation():
    def cell(mean, se=0.005):
        return {"mean": mean, "se": se, "n": 3, "lr": None, "lora_params": 1}

    summaries = {
        50: {("mean", "in", 1): cell(0.60), ("mean", "cont", 1): cell(0.70), ("mean", "direct", 1): cell(0.65)},
        200: {("mean", "in", 1): cell(0.702), ("mean", "cont", 1): cell(0.70), ("mean", "direct", 1): cell(0.66)},
        600: {("mean", "in", 1): cell(0.75), ("mean", "cont", 1): cell(0.71), ("mean", "direct", 1): cell(0.70)},
    }
    lines = crossings(summaries, [1], pairs=(("in", "cont"), ("direct", "cont"), ("direct", "in")))
    assert lines[0].endswith("in overtakes cont between 50 and 600 steps")  # 200 is a tie: no crossing there
    assert "-10.0, +0.2, +4.0" in lines[0]
    assert lines[1].endswith("no crossing in this range")  # direct stays below cont
    assert lines[2].endswith("in overtakes direct between 50 and 200 steps")


def test_ladder_costs_against_a_hand_computation():
    c = StudyConfig(ranks=(1, 2, 4), steps=100, recover_steps=20, source_rank=64, seeds=(0,), tasks=("movie",))
    direct = [record(task="movie", seed=0, method="direct", rank=k, train_seconds=10.0 + k) for k in (1, 2, 4)]
    cont = [record(task="movie", seed=0, method="cont", rank=k, train_seconds=50.0 + k) for k in (1, 2, 4)]
    source = [record(task="movie", seed=0, method="source-cont", rank=64, train_seconds=40.0)]
    costs = ladder_costs(direct + cont, source, 0.5, c)
    [row] = costs["rows"]
    assert row["direct_steps"] == 300 and row["direct_step_rank"] == 100 * 7
    assert row["squeeze_steps"] == 80 + 3 * 20 and row["squeeze_step_rank"] == 80 * 64 + 20 * 7
    assert row["direct_seconds"] == pytest.approx(37.0)
    assert row["squeeze_seconds"] == pytest.approx(40.0 + 0.5 + (11 + 12 + 14))  # the source counted once
    assert costs["mean"]["direct_steps"] == 300
    # the ladder's table names the score its records carry, and one seed has no standard error to show
    config = SweepConfig(budgets=(100,), ladder_budget=100, ladder_ranks=(1, 2, 4), ladder_seeds=(0,), study=c.model_copy(
        update={"seeds": (0, 1), "model_task": "causal_lm", "metric": "exact_match"}))
    scored = [r.model_copy(update={"metric": "exact_match", "test_score": 0.7 + 0.01 * r.rank}) for r in direct + cont]
    text = ladder_section(Ladder(records=scored, sources=source, squeeze_seconds=0.5, costs=costs), config)
    assert "Test exact match (%), one seed:" in text and "| 2 | 72.0 | 72.0 |" in text


def test_a_sweep_summary_written_by_older_code_reports_as_it_did():
    """docs/sweep-full.json (records from before metric/val_score/test_score) loads as records, and today's report
    of them is the one in docs/sweep-full.md; its ladder's costs come out of its records again."""
    kept = json.loads((DOCS / "sweep-full.json").read_text())
    config = SweepConfig.model_validate(kept["config"])
    records = [StudyRecord.model_validate(r) for r in kept["records"]]
    old = kept["ladder"]
    ladder = Ladder(records=[StudyRecord.model_validate(r) for r in old["records"]],
                    sources=[StudyRecord.model_validate(r) for r in old["sources"]],
                    squeeze_seconds=old["squeeze_seconds"], costs=old["costs"])
    text = report(config, records, kept["command"], kept["seconds"], ladder)
    assert text.split("\nCommand: ")[0] == (DOCS / "sweep-full.md").read_text().split("\nCommand: ")[0]
    assert ladder_costs(ladder.records, ladder.sources, ladder.squeeze_seconds, config.ladder()) == old["costs"]
    assert "| 1 | 78.7 ± 0.5 | 75.3 ± 5.3 |" in ladder_section(ladder, config)


def test_bad_sweep_settings_are_refused_in_one_line():
    for bad, words in ((["budgets=[2]"], "budgets"), (["budgets=[50,50]"], "budgets"),
                       (["ladder_ranks=[64]"], "ladder_ranks"), (["ladder_tasks=[nyt]"], "ladder_tasks"),
                       (["seeds_at={99: [0]}"], "seeds_at"), (["seeds_at={16: [5]}"], "seeds_at"), (["in_fractions=[1.5]"], "in_fractions"),
                       (["in_fractions=[0.5]", "in_first_fraction=0.6"], "in_fractions"), (["bogus=1"], "bogus")):
        with pytest.raises(LsqError, match=words) as err:
            load_sweep_config("quick", bad)
        assert "\n" not in str(err.value)
    assert load_sweep_config("quick", ["seeds=[3]", "select_seed=3"]).study.seeds == (3,)  # study fields bare
    assert load_sweep_config("quick", ["study.max_eval=20"]).study.max_eval == 20
    fewer = load_sweep_config("quick", ["seeds=[0, 1]", "seeds_at={16: [0]}"])
    assert fewer.at(8).seeds == (0, 1) and fewer.at(16).seeds == (0,)
    with pytest.raises(LsqError, match="preset"):
        load_sweep_config("huge", [])


@pytest.mark.slow
def test_a_real_tiny_sweep_with_its_ladder_resumes(tmp_path_factory, tmp_path, monkeypatch):
    """Two budgets and the ladder really train, squeeze and score on a tiny BERT; a rerun after a
    cut step trains only that step and gives the same records; the report and plot are written."""
    model = built_once(tmp_path_factory, "tiny-bert", save_tiny_bert)
    data = write_classification_csv(tmp_path / "reviews.csv", n=120)
    cfg = SweepConfig(budgets=(6, 10), ladder_budget=10, ladder_ranks=(1, 2), study=StudyConfig(
        tasks=("tiny",), sources={"tiny": str(data)}, model=str(model), methods=("direct", "post", "cont", "in"),
        ranks=(1,), seeds=(0,), source_rank=8, lrs=(5e-3,), method_lrs={"post": (5e-3,), "cont": (5e-3,), "in": (5e-3,)},
        in_fractions=(None, 0.5), batch_size=8, max_eval=20, max_length=16))
    sweep = Sweep(cfg, tmp_path / "sweep", log=lambda _: None)
    records = sweep.run_all()
    ladder = sweep.run_ladder()
    assert {r.budget for r in records} == {6, 10}
    assert all(r.steps == r.budget for r in records if r.method != "post")
    assert ladder.squeeze_seconds > 0 and ladder.costs["rows"]
    assert all(r.chosen for r in ladder.records) and {r.method for r in ladder.sources} == {"source-cont"}
    row = ladder.costs["rows"][0]
    assert row["direct_steps"] == 2 * 10 and row["squeeze_steps"] == 8 + 2 * 2
    assert row["direct_seconds"] > 0 and row["squeeze_seconds"] > 0
    # the ladder reused the sweep's own rank-1 direct run at 10 steps (one steps folder)
    assert len(list((tmp_path / "sweep" / "steps").glob("direct-r1-*"))) == 2  # 6 and 10 steps
    text = write_report(cfg, records, tmp_path, "cmd", 1.0, ladder)
    assert (tmp_path / "sweep.png").stat().st_size > 0 and "## What one run saves" in text
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert {row["budget"] for row in summary["summary"]} == {6, 10}
    # every chosen record is kept beside the summary, so the numbers outlive the run folder
    assert [StudyRecord.model_validate(r) for r in summary["records"]] == records
    assert summary["records"] == [r.model_dump(mode="json") for r in records]
    assert [StudyRecord.model_validate(r) for r in summary["ladder"]["records"]] == list(ladder.records)

    [cut] = list((tmp_path / "sweep" / "steps").glob("in-r1-*"))[:1]
    (cut / "record.json").unlink()
    trained = count_trainings(monkeypatch)
    again = Sweep(cfg, tmp_path / "sweep", log=lambda _: None).run_all()
    assert trained == ["in"]
    strip = lambda recs: sorted(r.model_dump_json(exclude={"wall_seconds", "train_seconds"}) for r in recs)  # noqa: E731
    assert strip(again) == strip(records)
    assert by_budget(again, cfg.study.methods).keys() == {6, 10}


def test_the_plan_estimates_minutes_from_measured_costs_by_hand():
    """Each job: its steps at the seconds per step of its (mean) rank, interpolated between the measured lowest and
    source ranks, plus one scoring; In-Squeeze at the mean of its stages' ranks (8, 4, 2, 1 from 8 to 1)."""
    cfg = SweepConfig(budgets=(10,), ladder_budget=None, ladder_ranks=(1,), study=StudyConfig(
        tasks=("movie",), methods=("direct", "in"), ranks=(1,), seeds=(0,), source_rank=8, lrs=(1e-3,),
        method_lrs={"in": (1e-3,)}, recover_steps=2))
    times = {"movie": {"step_low": 2.0, "step_source": 9.0, "scoring": 30.0}}
    direct = 10 * 2.0 + 30
    in_rank = (8 + 4 + 2 + 1) / 4
    in_sq = 10 * (2.0 + 7.0 * (in_rank - 1) / 7) + 30
    plan = Sweep.plan_of(cfg, times)
    assert plan[10]["jobs"] == 2 and plan[10]["optimizer_steps"] == 20
    assert plan[10]["estimated_minutes"] == round((direct + in_sq) / 60, 1) == plan["total_estimated_minutes"]
    assert "estimated_minutes" not in Sweep.plan_of(cfg)[10]  # nothing measured: steps only


def test_tasks_scored_differently_are_reported_per_task_with_their_floor():
    """exact match on one task and choice accuracy on another are never averaged together."""
    rows = [record(task=t, metric=m, method=meth, rank=1, seed=s, budget=8, test_score=0.5 + 0.1 * s + (meth == "in") * 0.2,
                   key=f"T8/{t}/s{s}/{meth}-r1")
            for t, m in (("addition", "exact_match"), ("tweets", "choice_accuracy"))
            for meth in ("direct", "in") for s in (0, 1)]
    floor = [record(task="addition", metric="exact_match", method="base", rank=0, test_score=0.0, val_score=0.02),
             record(task="tweets", metric="choice_accuracy", method="base", rank=0, test_score=0.71, val_score=0.7)]
    cfg = small(budgets=(8,), study={"tasks": ("addition", "tweets"), "methods": ("direct", "in"), "ranks": (1,),
                                     "model_task": "causal_lm", "metric": "auto", "select_rank": None,
                                     "method_lrs": {"in": (1e-3,)}})
    summary = by_budget(rows, cfg.study.methods)[8]
    assert not any(task == "mean" for task, _, _ in summary)
    text = report(cfg, rows, "cmd", 1.0, floor=floor)
    assert "Test exact match (addition), choice accuracy (tweets) (%), per task ± standard error over 2 seeds" in text
    assert "mean over" not in text
    assert "zero-shot, the same splits and scoring), test (validation): addition 0.0 (2.0), tweets 71.0 (70.0)." in text
    assert "| 1 | 8 | 55.0 ± 5.0 | **75.0 ± 5.0** |" in text  # per task: (0.5, 0.6) and (0.7, 0.8)
    assert text.count("Where the order changes") == 2
    assert "- rank 1, direct - in (points, at 8 steps): -20.0: in ahead" in text  # one budget: who leads, or a tie
    assert "sampling error, up to ±7.1 points" in text  # 50 test rows


@pytest.mark.slow
def test_a_real_tiny_decoder_sweep_scores_each_task_by_its_own_metric(tmp_path_factory, tmp_path):
    """metric auto on a tiny chat decoder: choice accuracy where the data has choices, exact match where it has not;
    the zero-shot floor is the base model's own scoring; the plan's measured costs are this machine's."""
    from lsq.evaluate import evaluate_splits
    from lsq.models import ModelConfig
    from tests.lsq.tiny import save_chat_llama, write_causal_jsonl

    model = built_once(tmp_path_factory, "chat-llama", save_chat_llama)
    plain = tmp_path / "plain.jsonl"  # the colour rows without their choices: scored by exact match
    plain.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "choices"}) + "\n"
                             for line in write_causal_jsonl(tmp_path / "rows.jsonl", n=80).read_text().splitlines()))
    cfg = SweepConfig(budgets=(4,), ladder_budget=None, ladder_ranks=(1,), study=StudyConfig(
        tasks=("plain", "tweets"), sources={"plain": str(plain)}, model=str(model), model_task="causal_lm",
        metric="auto", max_new_tokens=3, methods=("direct", "post"), ranks=(1,), seeds=(0,), source_rank=4, lrs=(5e-3,),
        method_lrs={"post": (5e-3,)}, batch_size=8, max_train=40, max_eval=12, max_length=128))
    sweep = Sweep(cfg, tmp_path / "sweep", log=lambda _: None)
    records = sweep.run_all()
    assert {(r.task, r.metric) for r in records} == {("plain", "exact_match"), ("tweets", "choice_accuracy")}
    floor = sweep.zero_shot()
    assert [(r.task, r.method, r.rank, r.lora_params) for r in floor] == [("plain", "base", 0, 0), ("tweets", "base", 0, 0)]
    for r in floor:
        scores = evaluate_splits(None, ModelConfig(name=str(model), task="causal_lm"), cfg.study.data(r.task),
                                 ("validation", "test"), 64)
        assert (r.val_score, r.test_score) == (scores["validation"][r.metric], scores["test"][r.metric])
    text = write_report(cfg, records, tmp_path, "cmd", 1.0, floor=floor)
    assert "exact match (plain), choice accuracy (tweets)" in text and (tmp_path / "sweep.png").stat().st_size > 0
    assert [StudyRecord.model_validate(r) for r in json.loads((tmp_path / "sweep_summary.json").read_text())["floor"]] == floor
    times = sweep.measure(steps=2)
    assert set(times) == {"plain", "tweets"} and all(v > 0 for t in times.values() for v in t.values())
    assert Sweep.plan_of(cfg, times)["total_estimated_minutes"] > 0
