"""Promotion chooses on the validation split and reports the test score beside it (tasks.promotion.decide_promotion)."""

import pytest

from lsq.errors import LsqError
from lsq.pipeline_config import load_pipeline_config
from lsq.records import Registered
from tasks.promotion import decide_promotion, promotion_metric, reported_metric


def row(label: str, val: float, test: float, size: int, serving: str = "yes: --max-lora-rank 8") -> Registered:
    metrics = {"val_macro_f1": val, "test_macro_f1": test}
    return Registered(label=label, method="cont", rank=int(label[-1]), run_id=f"run-{label}", version=label[-1],
                      adapter_bytes=size, metric=val, metrics=metrics, test_metric=test, serving=serving)


def test_the_winner_is_chosen_on_validation_even_when_test_disagrees():
    cfg = load_pipeline_config(None, ["promotion.metric=macro_f1", "promotion.tolerance=0"])
    assert (promotion_metric(cfg), reported_metric(cfg)) == ("val_macro_f1", "test_macro_f1")
    # on test, cont-r4 would win (0.90 > 0.70); on validation cont-r8 is better (0.85 > 0.60)
    rows = [row("cont-r8", val=0.85, test=0.70, size=2000), row("cont-r4", val=0.60, test=0.90, size=1000)]
    decision = decide_promotion(cfg, rows, None)
    assert decision.winner == "cont-r8" and decision.alias == "champion"
    assert decision.reason.startswith("by val_macro_f1 (validation split): ")
    assert "test_macro_f1 0.7000 (reported, not used to choose)" in decision.reason
    # the champion is compared on validation too: its 0.9 beats 0.85, so the winner is only challenger
    assert decide_promotion(cfg, rows, 0.9).alias == "challenger"


def test_servable_only_leaves_out_adapters_servers_cannot_load():
    cfg = load_pipeline_config(None, ["model.task=causal_lm", "data.task=causal_lm", "data.source=x.jsonl",
                                      "promotion.metric=answer_accuracy", "promotion.servable_only=true"])
    rows = [Registered(label=f"cont-r{k}", method="cont", rank=k, run_id=f"r{k}", version=str(k), adapter_bytes=k * 100,
                       metric=score, metrics={}, test_metric=score, serving=serving)
            for k, score, serving in ((8, 0.9, "no: per-module alphas (alpha_pattern)"), (4, 0.7, "yes: --max-lora-rank 8"))]
    decision = decide_promotion(cfg, rows, None)
    assert decision.winner == "cont-r4" and "servable adapters only" in decision.reason
    with pytest.raises(LsqError, match="promotion.servable_only: no variant is servable"):
        decide_promotion(cfg, rows[:1], None)


def test_a_metric_that_was_not_measured_is_named():
    cfg = load_pipeline_config(None, ["promotion.metric=accuracy"])
    with pytest.raises(LsqError, match="promotion.metric: val_accuracy was not measured for cont-r8"):
        decide_promotion(cfg, [row("cont-r8", 0.5, 0.5, 10).model_copy(update={"metric": None})], None)


def test_the_pipeline_ends_with_a_table_of_every_variant():
    from flows.squeeze_pipeline import variants_table
    from lsq.records import Decision, PipelineResult

    rows = (row("cont-r8", 0.85, 0.70, 2000, "no: modules_to_save (classifier)"), row("cont-r4", 0.60, 0.90, 1_000_000))
    result = PipelineResult(parent_run_id="p", tracking_uri="sqlite:///x.db", experiment="lsq", registered_model="m",
                            decision=Decision(winner="cont-r8", alias="champion", reason="r"), variants=rows,
                            promotion_metric="macro_f1")
    lines = variants_table(result).splitlines()
    assert lines[0].split() == ["variant", "rank", "val_macro_f1", "test_macro_f1", "bytes", "vLLM"]
    assert lines[1].split() == ["*", "cont-r8", "8", "0.8500", "0.7000", "2,000", "no"]
    assert lines[2].split() == ["cont-r4", "4", "0.6000", "0.9000", "1,000,000", "yes"]
