"""Scoring through lm-evaluation-harness (PyPI ``lm-eval``, the optional extra ``lsq[eval]``).

Decoder adapters are usually compared the way their users score them: ``lm_eval --model hf --model_args
pretrained=BASE,peft=ADAPTER``. Two pieces serve that, both offline:

- :func:`write_task` writes one split of lsq's causal-LM data (``{prompt, answer[, choices]}``) as a JSON
  lines file and a task YAML that lm-eval reads from a local folder (``--include_path``). Rows with
  ``choices`` become a ``multiple_choice`` task scored by ``acc``; rows without, a ``generate_until``
  task scored by ``exact_match`` on greedy output (case, punctuation and whitespace ignored).
- :func:`harness_scores` runs ``lm_eval.simple_evaluate`` on a base model (a local folder) with or
  without an adapter, on lsq's task or on tasks the user wrote, and returns ``{task: {metric: value}}``.

Prompts render as lsq trained them: a tokenizer with a chat template gets the prompt as a user turn
(lm-eval's ``apply_chat_template``, no extra BOS: the template carries its own special tokens), and the
choices that multiple choice scores are framed as lsq's SFT answers are, the template's end-of-turn after
them (:func:`answer_frame`). So on a chat-template model the harness's ``acc`` is lsq's
``choice_accuracy`` computed by other code (tests/lsq/test_harness.py checks they are equal). Without a
template lm-eval joins prompt and choice with one space, its own convention, and may differ from lsq.
``exact_match`` uses lm-eval's own options (whitespace removed, lower case, ASCII punctuation removed);
lsq's :func:`~lsq.objectives.normalize_answer` collapses whitespace and removes Unicode punctuation, so
the two agree on answers of words and numbers and can differ on e.g. "new york" against "newyork".

lm-eval is imported only inside these functions: lsq works without the extra, and a call without it
raises one :class:`~lsq.errors.LsqError` line. The metrics used here, ``acc`` and ``exact_match``, are
computed locally (others, e.g. BLEU through ``evaluate.load``, download code: lm-eval issues #1071,
#1723), and :func:`harness_scores` runs with the Hub and datasets offline unless the caller set
otherwise (:func:`offline`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import datasets.config
import huggingface_hub.constants as hub
import yaml

from lsq.data import load_data
from lsq.errors import LsqError
from lsq.models import device_of, dtype_of, load_tokenizer, resolve_model_path
from lsq.objectives import chat_texts

INSTALL_HINT = "install lsq[eval] (lm-eval) to score through lm-evaluation-harness"
# exact_match's normalisation (lm-eval's own options): whitespace dropped, then case, then punctuation.
EXACT_MATCH_OPTIONS = {"ignore_case": True, "ignore_punctuation": True, "regexes_to_ignore": [r"\s+"]}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*")


def require_lm_eval():
    """The ``lm_eval`` package, or one LsqError line saying how to get it."""
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        raise LsqError(INSTALL_HINT) from None
    return lm_eval


def answer_frame(tokenizer) -> tuple[str, str]:
    """``(before, after)``: the text around an answer in lsq's SFT rows for ``tokenizer``. With a chat
    template: what the template puts between the assistant header and the answer (a space, a thinking
    block; usually nothing) and after it (the end-of-turn, e.g. ``"<|im_end|>\\n"``). Without one:
    nothing before and the eos token after (lsq appends eos). ``("", "")`` when a template hides the answer."""
    if getattr(tokenizer, "chat_template", None):
        probe = "lsqanswer"
        _, tail = chat_texts(tokenizer, "lsqprompt", probe)
        at = tail.find(probe)
        return (tail[:at], tail[at + len(probe):]) if at >= 0 else ("", "")
    return "", tokenizer.eos_token or ""


def write_task(data_cfg, split: str, folder: str | os.PathLike, name: str, *, tokenizer=None,
               kind: Literal["auto", "multiple_choice", "generate_until"] = "auto", data=None) -> str:
    """Write ``split`` of the causal-LM data ``data_cfg`` names as an lm-eval task in ``folder``; return its name.

    Files: ``{folder}/{name}.jsonl`` (per example ``prompt`` and ``answer``; for multiple choice also
    ``choices``, ``gold``, the answer's index, and ``continuations``, the choices as lm-eval scores them)
    and ``{folder}/{name}.yaml``. ``tokenizer``: the model's; each choice is then framed as lsq's SFT
    rows frame an answer (:func:`answer_frame`: the chat template's end-of-turn after it), so multiple
    choice scores what lsq's choice accuracy scores, and generation stops at that end-of-turn too.
    ``kind`` auto: multiple choice when the rows carry choices, else generation (exact match on at most
    ``data_cfg.max_new_tokens`` greedy tokens). ``data``: the loaded DatasetDict, if at hand.
    """
    if not _NAME.fullmatch(name):
        raise LsqError(f"harness task name: letters, digits, '_' and '-', starting with a letter (got {name!r})")
    if data_cfg.task != "causal_lm":
        raise LsqError(f"data.task: the harness scores causal_lm data, not {data_cfg.task!r}")
    data = data if data is not None else load_data(data_cfg)
    if split not in data or len(data[split]) == 0:
        raise LsqError(f"split {split!r} is missing or empty")
    rows = data[split]
    if kind == "auto":
        kind = "multiple_choice" if "choices" in rows.column_names else "generate_until"
    if kind == "multiple_choice" and "choices" not in rows.column_names:
        raise LsqError("harness: multiple choice needs data.choices_column (the rows carry no choices)")
    before, after = answer_frame(tokenizer) if tokenizer is not None else ("", "")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_file = (folder / f"{name}.jsonl").resolve()
    with data_file.open("w") as f:
        for row in rows:
            out = {"prompt": row["prompt"], "answer": row["answer"]}
            if kind == "multiple_choice":
                out.update(choices=row["choices"], gold=row["choices"].index(row["answer"]),
                           continuations=[before + c + after for c in row["choices"]])
            f.write(json.dumps(out) + "\n")
    task: dict[str, Any] = {
        "task": name, "dataset_path": "json",  # datasets' arrow copy beside the task, not in the user's cache
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(folder.resolve() / ".cache")},
        "test_split": "test", "output_type": kind, "doc_to_text": "prompt",
    }
    if kind == "multiple_choice":
        task.update(doc_to_choice="continuations", doc_to_target="gold", target_delimiter=" ",
                    metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    else:
        until = [after.strip()] if after.strip() else []  # lm-eval adds the eos token itself
        task.update(doc_to_target="answer", target_delimiter=" ",
                    generation_kwargs={"until": until, "max_gen_toks": data_cfg.max_new_tokens,
                                       "do_sample": False, "temperature": 0.0},
                    metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                  **EXACT_MATCH_OPTIONS}])
    task["metadata"] = {"version": 1.0, "lsq_source": str(data_cfg.source), "lsq_split": split, "rows": len(rows)}
    chat = ",add_bos_token=False --apply_chat_template" if getattr(tokenizer, "chat_template", None) else ""
    head = (f"# split {split!r} of {data_cfg.source} ({len(rows)} rows), written by lsq.harness.write_task. Run:\n"
            f"# lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER{chat} --include_path {folder.resolve()} "
            f"--tasks {name}\n")
    (folder / f"{name}.yaml").write_text(head + yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return name


def harness_scores(adapter_dir: str | os.PathLike | None, model_cfg, tasks: Sequence[str],
                   include_path: str | os.PathLike | None = None, limit: int | float | None = None,
                   batch_size: int = 8) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from ``lm_eval.simple_evaluate`` with lm-eval's ``hf`` model.

    The base model is the local folder :func:`lsq.models.resolve_model_path` gives for
    ``model_cfg.name``, in lsq's dtype on lsq's device, with the PEFT adapter ``adapter_dir`` on top
    (None: the base alone). ``tasks`` are task names in the YAMLs under ``include_path`` (lm-eval's
    bundled tasks are looked at only for names not found there; most need a dataset download).
    ``limit``: the first N documents of each task (a float below 1: that share). Metric keys drop
    lm-eval's ``,none`` filter suffix (``acc``, ``acc_stderr``, ``exact_match``).
    """
    lm_eval = require_lm_eval()
    tasks = list(tasks)
    if not tasks:
        raise LsqError("harness: name at least one task")
    if include_path is not None and not Path(include_path).is_dir():
        raise LsqError(f"harness include folder: no such folder {str(include_path)!r}")
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise LsqError(f"{adapter_dir}: adapter folder not found")
    if model_cfg.task != "causal_lm":
        raise LsqError(f"model.task: the harness scores causal LMs (got {model_cfg.task!r})")
    if model_cfg.quantization != "none":
        raise LsqError(f"model.quantization: the harness loads the base unquantized (got {model_cfg.quantization!r})")
    tokenizer = load_tokenizer(model_cfg)
    if tokenizer.eos_token is None:  # lm-eval decodes it as the stop of every generation and the empty context
        raise LsqError(f"model.name: the tokenizer of {model_cfg.name!r} has no eos token, which lm-eval needs")
    chat = bool(getattr(tokenizer, "chat_template", None))  # None when chat_template=off
    model_args: dict[str, Any] = {
        "pretrained": resolve_model_path(model_cfg.name), "dtype": str(dtype_of(model_cfg)).removeprefix("torch."),
        "device": str(device_of(model_cfg)), "trust_remote_code": model_cfg.trust_remote_code,
    }
    if chat:
        model_args["add_bos_token"] = False  # the rendered template carries its own special tokens, as in training
    if adapter_dir is not None:
        model_args["peft"] = str(adapter_dir)
    with offline():
        manager = _task_manager(tasks, include_path)
        out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, task_manager=manager,
                                      limit=limit, batch_size=batch_size, apply_chat_template=chat,
                                      log_samples=False)
    return {task: _metrics(values) for task, values in out["results"].items()}


def _task_manager(tasks: list[str], include_path):
    """A TaskManager that knows every name in ``tasks``: the include folder alone (instant), else with
    lm-eval's bundled tasks too (about 6 s to index); an unknown name is one LsqError line."""
    from lm_eval.tasks import TaskManager

    folder = str(include_path) if include_path else None
    manager = TaskManager(include_path=folder, include_defaults=False)
    if all(t in manager.all_tasks for t in tasks):
        return manager
    local = sorted(manager.all_tasks)
    manager = TaskManager(include_path=folder)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"tasks in {folder}: {', '.join(local) or 'none'}" if folder else "no include folder given"
        raise LsqError(f"harness: unknown task {', '.join(map(repr, unknown))} ({where})")
    return manager


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` as ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "," in key:
            metric, filt = key.split(",", 1)
            out[metric if filt == "none" else key] = float(value)
    return out


def scores_table(scores: dict[str, dict[str, float]]) -> str:
    """``task  metric  value  stderr``, one row per task and metric."""
    rows = [("task", "metric", "value", "stderr")]
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            if not metric.endswith("_stderr"):
                stderr = metrics.get(f"{metric}_stderr")
                shown = f"{stderr:.4f}" if stderr is not None and math.isfinite(stderr) else ""
                rows.append((task, metric, f"{value:.4f}", shown))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip()
                     for r in rows)


@contextmanager
def offline() -> Iterator[None]:
    """The Hub and datasets offline for the body, unless the caller set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE
    (either way: a caller who set them to 0 keeps the network). Without it ``datasets.load_dataset("json",
    data_files=...)``, as lm-eval loads every task, asks the Hub first. huggingface_hub and datasets read
    the variables once, at import, so their copies are switched too; all restored on exit (process-wide
    settings: not for threads that need the network meanwhile)."""
    env = [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if k not in os.environ]
    flags = [(hub, "HF_HUB_OFFLINE")] if "HF_HUB_OFFLINE" in env else []
    if "HF_DATASETS_OFFLINE" in env:
        flags += [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
    saved = [(module, name, getattr(module, name)) for module, name in flags if hasattr(module, name)]
    os.environ.update(dict.fromkeys(env, "1"))
    for module, name, _ in saved:
        setattr(module, name, True)
    try:
        yield
    finally:
        for k in env:
            os.environ.pop(k, None)
        for module, name, value in saved:
            setattr(module, name, value)
