"""The registered model: a PEFT adapter served as an MLflow pyfunc (models-from-code).

``tasks.tracking.register_variant`` logs this file with ``python_model=<this path>``,
``artifacts={"adapter": <adapter folder>}`` and ``model_config``: ``model`` (the fields of
``lsq.models.ModelConfig``: base model name, task, dtype, ...), ``label_names``, ``max_length``,
``max_new_tokens``. (MLflow also logs model_config as run params: ``model/name``, ``label_names``...)
Loading rebuilds base + adapter offline through ``lsq.models`` (no Hub id is recorded, unlike
``mlflow.transformers``): the base model must be reachable by its name on the loading machine
(``builtin:minilm``, a local folder, or a cached Hub id) and ``lsq`` must be importable.

``predict`` takes a list of strings or a DataFrame with a ``text`` column (MLflow turns it into the
list: the ``list[str]`` type hint is the model's signature) and returns one string per input: the
label name (classification) or the greedy reply (causal LM). A causal LM sees each input exactly as
training saw prompts (:func:`lsq.objectives.prompt_ids`): a user turn in the tokenizer's chat template,
ending with the assistant header, when the tokenizer has one (and ``model.chat_template`` is not off),
else the raw text; it answers with the generated text only (special tokens skipped, stripped), at most
``max_new_tokens`` tokens (``params`` may override it when called on the python model; MLflow's
wrapper drops params, the logged signature having no params schema). The generation is the one that
scores exact match (:func:`lsq.objectives.generate_answers`: greedy, ``GENERATE_BATCH`` left-padded
prompts at a time, stopping at the end of turn).
"""

# No `from __future__ import annotations`: MLflow reads predict's type hints for the signature.
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

GENERATE_BATCH = 8  # causal LM: prompts generated together (left-padded)


class LsqAdapterModel(PythonModel):
    def load_context(self, context) -> None:
        from peft import PeftModel

        from lsq.models import ModelConfig, load_base_model, load_tokenizer

        cfg = dict(context.model_config or {})
        model_cfg = ModelConfig(**cfg["model"])
        self.task = model_cfg.task
        self.label_names = [str(x) for x in cfg.get("label_names") or []]
        self.max_length = int(cfg.get("max_length", 256))
        self.max_new_tokens = int(cfg.get("max_new_tokens", 16))
        self.tokenizer = load_tokenizer(model_cfg)
        num_labels = len(self.label_names) if self.task == "classification" else None
        base = load_base_model(model_cfg, num_labels)
        self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).eval()
        self.device = next(self.model.parameters()).device

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        texts = _texts(model_input)
        if not texts:
            return []
        if self.task == "classification":
            return self._classify(texts)
        from lsq.objectives import generate_answers

        max_new_tokens = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        return generate_answers(self.model, self.tokenizer, texts, max_new_tokens, GENERATE_BATCH, self.device,
                                self.max_length)

    def _classify(self, texts: list[str]) -> list[str]:
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**batch.to(self.device)).logits  # (N, num_labels)
        ids = logits.argmax(-1).tolist()
        return [self.label_names[i] if i < len(self.label_names) else str(i) for i in ids]


def _texts(model_input) -> list[str]:
    """The input strings (also when called on the python model directly with a str, Series or DataFrame)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[column].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        return _texts(model_input.get("text", next(iter(model_input.values()), [])))
    return [str(x) for x in list(model_input)]


mlflow.models.set_model(LsqAdapterModel())
