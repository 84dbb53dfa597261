"""promotion.metric: checked against the task when the config loads; ``auto`` resolved on the training labels."""

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from lsq.errors import LsqError
from lsq.pipeline_config import load_pipeline_config, resolve_promotion


def labelled(positives: int, total: int = 100) -> DatasetDict:
    features = Features({"text": Value("string"), "label": ClassLabel(names=["ham", "spam"])})
    rows = {"text": [f"t{i}" for i in range(total)], "label": [1] * positives + [0] * (total - positives)}
    return DatasetDict(train=Dataset.from_dict(rows, features=features))


@pytest.mark.parametrize("overrides, message", [
    (["promotion.metric=f1"], "promotion.metric: 'f1' is not a classification metric; use one of auto, accuracy, macro_f1"),
    (["promotion.metric=loss"], "promotion.metric: 'loss' is not a classification metric"),
    (["model.task=causal_lm", "data.task=causal_lm", "data.source=x.jsonl", "promotion.metric=accuracy"],
     "promotion.metric: 'accuracy' is not a causal_lm metric; use one of auto, exact_match, choice_accuracy, "
     "answer_accuracy, loss"),
    (["promotion.metric=exact_match"], "promotion.metric: 'exact_match' is not a classification metric"),
    (["model.task=causal_lm", "data.task=causal_lm", "data.source=x.jsonl", "data.max_new_tokens=0"],
     "data.max_new_tokens: Input should be greater than or equal to 1"),
    (["promotion.servable_only=true"], "promotion.servable_only: classification adapters save their head"),
])
def test_bad_promotion_settings_are_refused_in_one_line_at_load(overrides, message):
    with pytest.raises(LsqError) as err:
        load_pipeline_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_loss_is_lower_is_better_and_a_contrary_setting_is_refused():
    cfg = load_pipeline_config(None, ["model.task=causal_lm", "data.task=causal_lm", "data.source=x.jsonl", "promotion.metric=loss"])
    assert cfg.promotion.higher_is_better is False
    with pytest.raises(LsqError, match="greater_is_better: loss is lower is better"):
        load_pipeline_config(None, ["model.task=causal_lm", "data.task=causal_lm", "data.source=x.jsonl", "promotion.metric=loss",
                                    "promotion.greater_is_better=true"])


def test_auto_picks_macro_f1_on_imbalanced_labels_and_accuracy_on_balanced_ones():
    cfg = load_pipeline_config()
    assert cfg.promotion.metric == "auto"
    imbalanced, why = resolve_promotion(cfg, labelled(13))
    assert imbalanced.promotion.metric == "macro_f1"
    assert "macro_f1" in why and "spam" in why and "13.0%" in why
    balanced, why = resolve_promotion(cfg, labelled(45))
    assert balanced.promotion.metric == "accuracy" and "45.0%" in why
    explicit, why = resolve_promotion(load_pipeline_config(None, ["promotion.metric=accuracy"]), labelled(13))
    assert explicit.promotion.metric == "accuracy" and "set in the config" in why


def sft(choices: bool) -> DatasetDict:
    rows = {"prompt": ["What is 2 + 3?", "What is 4 + 4?"], "answer": ["5", "8"]}
    if choices:
        rows["choices"] = [["5", "6"], ["8", "9"]]
    return DatasetDict(train=Dataset.from_dict(rows))


def test_auto_on_a_decoder_picks_exact_match_without_choices_and_choice_accuracy_with_them():
    cfg = load_pipeline_config(None, ["model.task=causal_lm", "data.task=causal_lm", "data.source=x.jsonl"])
    generated, why = resolve_promotion(cfg, sft(choices=False))
    assert generated.promotion.metric == "exact_match" and "no choices" in why
    chosen, why = resolve_promotion(cfg, sft(choices=True))
    assert chosen.promotion.metric == "choice_accuracy" and "has choices" in why
