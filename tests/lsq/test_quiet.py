"""Quiet by default: what misleads is not printed (the new head's MISSING load report, a deprecation
PEFT triggers, a progress bar per split), and what says something is (a load report that lists more)."""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

import datasets
import pytest
from safetensors.torch import load_file, save_file

from lsq.data import DataConfig, load_data
from lsq.models import ModelConfig, load_base_model
from tests.lsq.tiny import minilm_tokenizer, write_classification_csv


def save_tiny_encoder(folder: Path, drop: str | None = None) -> Path:
    """A tiny BERT encoder without a classification head (as a pretrained checkpoint is); ``drop``
    removes one of its weights from the file."""
    import torch
    from transformers import BertConfig, BertModel

    tok = minilm_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    if drop is not None:
        weights = load_file(folder / "model.safetensors")
        [key] = [k for k in weights if k.endswith(drop)]
        del weights[key]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture
def shown() -> list[str]:
    """What transformers' loggers print (their handler sits on the "transformers" logger, which the
    records of its modules reach; it writes to whichever stderr was current when it was made, so the
    records are read here, not from the stream)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    yield messages
    logging.getLogger("transformers").removeHandler(handler)


def test_a_new_classification_head_loads_without_a_report(tmp_path, shown):
    model = load_base_model(ModelConfig(name=str(save_tiny_encoder(tmp_path / "enc")), device="cpu"), num_labels=2)
    assert not any("LOAD REPORT" in m or "MISSING" in m for m in shown), shown
    assert model.classifier.weight.shape[0] == 2


def test_a_load_report_that_says_more_is_shown(tmp_path, shown):
    folder = save_tiny_encoder(tmp_path / "enc", drop="pooler.dense.weight")
    load_base_model(ModelConfig(name=str(folder), device="cpu"), num_labels=2)
    [report] = [m for m in shown if "LOAD REPORT" in m]
    assert "pooler.dense.weight" in report and "classifier.weight" in report
    # the report is held back only inside the load: the next load of a whole encoder is quiet again
    load_base_model(ModelConfig(name=str(save_tiny_encoder(tmp_path / "whole")), device="cpu"), num_labels=2)
    assert len([m for m in shown if "LOAD REPORT" in m]) == 1


def test_another_threads_report_during_a_load_is_shown(tmp_path, shown, monkeypatch):
    """Only the loading thread's report is held: one that another thread logs meanwhile passes."""
    from transformers import AutoModelForSequenceClassification

    folder = save_tiny_encoder(tmp_path / "enc")
    log = logging.getLogger("transformers.modeling_utils")
    real = AutoModelForSequenceClassification.from_pretrained

    def loading(*args, **kwargs):  # another thread logs while this one is inside the load
        other = threading.Thread(target=lambda: log.warning("LOAD REPORT from another thread"))
        other.start()
        other.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", loading)
    load_base_model(ModelConfig(name=str(folder), device="cpu"), num_labels=2)
    assert shown == ["LOAD REPORT from another thread"]


def test_wrapping_the_base_model_in_peft_gives_no_future_warning(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = load_base_model(ModelConfig(name=str(save_tiny_encoder(tmp_path / "enc")), device="cpu"), num_labels=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", append=True)  # behind lsq's own filters; resets "once" registries
        get_peft_model(model, LoraConfig(r=2, target_modules=["query"]))
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_splitting_draws_no_progress_bars_and_leaves_them_on(tmp_path, capfd):
    data = write_classification_csv(tmp_path / "reviews.csv", n=120)
    cfg = DataConfig(source=str(data), max_train=40, max_eval=10)
    assert datasets.is_progress_bar_enabled()
    splits = load_data(cfg)
    assert "Flattening the indices" not in capfd.readouterr().err
    assert datasets.is_progress_bar_enabled()  # the caller's setting is back
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 40, "validation": 10, "test": 10}
    assert all(ds._indices is None for ds in splits.values())  # later reads flatten nothing either


def test_progress_bars_stay_off_when_the_caller_turned_them_off(tmp_path):
    data = write_classification_csv(tmp_path / "reviews.csv", n=60)
    datasets.disable_progress_bars()
    try:
        load_data(DataConfig(source=str(data), max_train=20))
        assert not datasets.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()


def test_splits_in_several_threads_restore_the_bars_once(tmp_path):
    data = write_classification_csv(tmp_path / "reviews.csv", n=120)
    errors = []

    def split(seed):
        try:
            load_data(DataConfig(source=str(data), max_train=30, seed=seed))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=split, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and datasets.is_progress_bar_enabled()


def test_tokenising_a_small_split_draws_no_bar_and_a_large_one_does(tmp_path, capfd, monkeypatch):
    import lsq.objectives as objectives

    tok = minilm_tokenizer()
    rows = datasets.Dataset.from_dict({"text": ["a fine film"] * 30, "label": [1] * 30})
    out = objectives.tokenize_classification(rows, tok, 16)
    assert len(out) == 30 and "tokenize" not in capfd.readouterr().err
    assert datasets.is_progress_bar_enabled()
    monkeypatch.setattr(objectives, "QUIET_ROWS", 10)  # long work keeps its progress
    objectives.tokenize_classification(rows.map(lambda r: {"text": r["text"] + "!"}), tok, 16)
    assert "tokenize" in capfd.readouterr().err
