"""Helpers of the tasks/tracking/ tests: constants, tiny adapters, runs (fixtures: ``conftest.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lsq.api import PLOT_NAME, REPORT_NAME
from lsq.variants import Variant
from tasks import tracking

LABELS = ["neg", "pos"]
MODEL = "lsq-tiny-test"
EVALUATION = {"accuracy": 0.75, "macro_f1": 0.7, "trainable_params": 1234, "lora_params": 1000,
              "adapter_bytes": 5678, "split": "test", "examples": 40}
PARAMS = {"base_model": "tiny", "dataset": "cls.csv", "dataset_fingerprint": "abc123", "source_rank": 16, "rank": 4,
          "method": "post", "steps": 6, "learning_rate": 0.005, "seed": 0}


def build_template(folder: Path) -> None:
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = tracking.client_for(uri)  # creates and migrates the schema once per session
    client.search_experiments()
    client.search_registered_models()


def save_adapter(base: Path, folder: Path, rank: int, seed: int) -> None:
    """A LoRA adapter of rank ``rank`` on the tiny BERT, with non-zero B (and head) so it changes predictions."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS))
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank,
                                             target_modules=["query", "value"]))
    for name, p in model.named_parameters():
        if "lora_B" in name or "classifier" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(folder)
    (folder.parent / REPORT_NAME).write_text(json.dumps({"rank": rank, "retained_energy": 0.9}))
    (folder.parent / PLOT_NAME).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16))


def child_run(uri: str, variant: Variant, parent: str | None = None, experiment: str = "lsq-test") -> tuple[str, str]:
    """(parent run, child run of ``variant``): a new parent unless one is given."""
    exp = tracking.ensure_experiment(uri, experiment)
    parent = parent or tracking.start_pipeline_run(uri, experiment, "pipeline", {"seed": 0}, {})
    params = {**PARAMS, "rank": variant.rank}
    return parent, tracking.log_variant_run(uri, exp, parent, variant, params, EVALUATION)


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out
