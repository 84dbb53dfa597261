"""Task objectives: tokenisation, batching and metrics for classification and causal-LM SFT.

Classification: rows ``{text, label}``; metrics accuracy and macro-F1.
Causal LM: rows ``{prompt, answer[, choices]}``; the loss covers the answer tokens only (prompt
labels are -100); metrics are the eval loss, the teacher-forced answer-token accuracy, the exact match
of the greedily generated answer (:func:`normalize_answer` on both sides), and, when rows carry
``choices``, multiple-choice accuracy by summed answer log-likelihood (the paper's setup).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterator
from contextlib import nullcontext

import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from transformers import GenerationConfig

from lsq.data_sources import no_progress_bars
from lsq.errors import LsqError

IGNORE = -100


def tokenize_classification(dataset, tokenizer, max_length: int):
    """Map ``{text, label}`` rows to ``{input_ids, attention_mask, labels}``."""

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        return enc

    return _tokenized(dataset, encode, _map_fingerprint(dataset, tokenizer, max_length, "cls"))


# below this many rows tokenising takes a second or two: no progress bar (one per split and per run is noise)
QUIET_ROWS = 50_000


def _tokenized(dataset, encode, fingerprint: str):
    with no_progress_bars() if len(dataset) < QUIET_ROWS else nullcontext():
        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenize",
                           new_fingerprint=fingerprint)


def _map_fingerprint(dataset, tokenizer, max_length: int, kind: str) -> str:
    """The fingerprint of a tokenized dataset from what determines it, instead of datasets hashing the
    tokenizer through dill on every map (about 0.4 s per call)."""
    vocab = getattr(tokenizer, "vocab_size", 0)
    text = f"{dataset._fingerprint}|{tokenizer.name_or_path}|{type(tokenizer).__name__}|{vocab}|{len(tokenizer)}|{max_length}|{kind}|{getattr(tokenizer, 'chat_template', None)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def chat_prompt(tokenizer, prompt: str) -> str:
    """``prompt`` as a user turn in the tokenizer's chat template, ending with the assistant header."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def chat_texts(tokenizer, prompt: str, answer: str) -> tuple[str, str]:
    """``(prompt text, answer text)`` in the tokenizer's chat template: the user turn with the assistant
    header, then the rest of the rendered conversation (the answer and the template's end-of-turn)."""
    head = chat_prompt(tokenizer, prompt)
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    whole = tokenizer.apply_chat_template(turns, tokenize=False)
    if not whole.startswith(head):
        raise LsqError("model.chat_template: the tokenizer's template renders the prompt differently inside a "
                       "conversation; set model.chat_template=off")
    return head, whole[len(head):]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as SFT training feeds it to the model, and so as serving must: the user turn
    and assistant header of the chat template when the tokenizer has one, else the raw prompt with the
    tokenizer's own special tokens (BOS, or BERT-style [CLS] ... [SEP])."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def _sft_ids(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer (+ eos) and labels masking the prompt; the answer is kept on truncation.

    A tokenizer with a chat template (instruction-tuned decoders) gets the prompt as a user turn and the
    answer as the assistant's reply, the template's own special tokens included; the loss covers the
    reply and its end-of-turn. Without one: the raw prompt, then the answer and eos."""
    if getattr(tokenizer, "chat_template", None):
        head, tail = chat_texts(tokenizer, prompt, answer)
        p = tokenizer(head, add_special_tokens=False)["input_ids"]
        a = tokenizer(tail, add_special_tokens=False)["input_ids"]
    else:
        p = prompt_ids(tokenizer, prompt)
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            a = a + [tokenizer.eos_token_id]
    a = a[:max_length]
    p = p[-(max_length - len(a)) :] if max_length > len(a) else []
    return p + a, [IGNORE] * len(p) + a


def tokenize_causal_lm(dataset, tokenizer, max_length: int):
    """Map ``{prompt, answer}`` rows to ``{input_ids, attention_mask, labels}`` (loss on the answer only)."""

    def encode(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, answer in zip(batch["prompt"], batch["answer"]):
            ids, labels = _sft_ids(tokenizer, prompt, answer, max_length)
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    return _tokenized(dataset, encode, _map_fingerprint(dataset, tokenizer, max_length, "sft"))


class PadCollator:
    """Right-pads ``input_ids`` (pad id), ``attention_mask`` (0) and token ``labels`` (-100)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        }
        token_labels = isinstance(rows[0]["labels"], list)
        batch["labels"] = (
            torch.full((len(rows), width), IGNORE, dtype=torch.long)
            if token_labels
            else torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        )
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(r["input_ids"])
            batch["attention_mask"][i, :n] = 1
            if token_labels:
                batch["labels"][i, :n] = torch.tensor(r["labels"])
        return batch


def _batches(dataset, collator, batch_size: int, device) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield {k: v.to(device) for k, v in collator(rows).items()}


@torch.no_grad()
def classification_metrics(model: nn.Module, dataset, collator, batch_size: int, device) -> dict[str, float]:
    """Accuracy and macro-F1 of ``model`` on a tokenised classification split."""
    model.eval()
    preds, labels = [], []
    for batch in _batches(dataset, collator, batch_size, device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        preds += logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    return {"accuracy": float(accuracy_score(labels, preds)), "macro_f1": float(f1_score(labels, preds, average="macro"))}


def _answer_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: summed log-likelihood of the labelled tokens, correct-token count and labelled count.

    Only the positions some row has a label at are projected onto the vocabulary (``logits_to_keep``, which
    transformers' causal LMs take: the answers are a few tokens of each row, the vocabulary tens of thousands
    wide); a model without it gets every position projected and the same numbers."""
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = (labels != IGNORE).any(0).nonzero().squeeze(-1)  # (K,) positions any row needs
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    try:
        logits = model(**inputs, logits_to_keep=keep).logits.float()  # (B, K, V)
    except TypeError:  # a model whose forward has no logits_to_keep
        logits = model(**inputs).logits[:, :-1][:, keep].float()
    labels = labels[:, keep]  # (B, K)
    mask = labels != IGNORE
    target = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, K)
    logp = target - torch.logsumexp(logits, -1)
    correct = (logits.argmax(-1) == labels) & mask
    return (logp * mask).sum(1), correct.sum(1), mask.sum(1)


@torch.no_grad()
def causal_lm_metrics(model: nn.Module, dataset, collator, batch_size: int, device, raw=None, tokenizer=None,
                      max_length=256, max_new_tokens: int | None = None) -> dict[str, float]:
    """Eval loss and answer-token accuracy on a tokenised split; with the raw split (``raw``) also
    ``exact_match`` of greedy generation (when ``max_new_tokens`` is given) and, when it has a ``choices``
    column, ``choice_accuracy``: the choice with the highest summed log-likelihood."""
    model.eval()
    nll = correct = count = 0.0
    for batch in _batches(dataset, collator, batch_size, device):
        lp, c, n = _answer_logprobs(model, batch)
        nll -= float(lp.sum())
        correct += float(c.sum())
        count += float(n.sum())
    metrics = {"loss": nll / max(count, 1.0), "answer_accuracy": correct / max(count, 1.0)}
    if raw is not None and max_new_tokens is not None:
        answers = generate_answers(model, tokenizer, raw["prompt"], max_new_tokens, batch_size, device, max_length)
        metrics["exact_match"] = sum(map(exact_match, answers, raw["answer"])) / max(len(raw), 1)
    if raw is not None and "choices" in raw.column_names:
        metrics["choice_accuracy"] = _choice_accuracy(model, raw, tokenizer, collator, batch_size, device, max_length)
    return metrics


def _choice_accuracy(model: nn.Module, raw, tokenizer, collator, batch_size: int, device, max_length: int) -> float:
    """Share of rows whose answer is the choice of highest summed log-likelihood: every (row, choice) pair
    scored once, ``batch_size`` pairs per forward pass; a tie goes to the first choice."""
    pairs = [(i, choice) for i, choices in enumerate(raw["choices"]) for choice in choices]
    prompts = raw["prompt"]
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        rows = []
        for i, choice in pairs[start:start + batch_size]:
            ids, labels = _sft_ids(tokenizer, prompts[i], choice, max_length)
            rows.append({"input_ids": ids, "labels": labels})
        lp, _, _ = _answer_logprobs(model, {k: v.to(device) for k, v in collator(rows).items()})
        scores += lp.tolist()
    best: dict[int, tuple[float, str]] = {}
    for (i, choice), score in zip(pairs, scores):
        if i not in best or score > best[i][0]:
            best[i] = (score, choice)
    return sum(best[i][1] == answer for i, answer in enumerate(raw["answer"])) / max(len(raw), 1)


def normalize_answer(text: str) -> str:
    """The form exact match compares: lower case, punctuation (Unicode category P) removed, runs of
    whitespace as one space, stripped. ``" Positive."`` -> ``"positive"``, ``"4,200"`` -> ``"4200"``."""
    kept = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
    return " ".join(kept.split())


def exact_match(prediction: str, answer: str) -> bool:
    """Whether a generated answer equals the reference once both are normalised (:func:`normalize_answer`)."""
    return normalize_answer(prediction) == normalize_answer(answer)


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, prompts, max_new_tokens: int, batch_size: int, device,
                     max_length: int = 256) -> list[str]:
    """Greedy answers to ``prompts``, rendered as training renders them (:func:`prompt_ids`, the last
    ``max_length`` tokens kept), in batches of ``batch_size`` left-padded prompts of similar length, at most
    ``max_new_tokens`` each, stopping at the end of turn (eos). Returns the decoded new text, special tokens
    dropped and stripped, in the order of ``prompts``."""
    if max_new_tokens < 1:
        raise LsqError(f"max_new_tokens: must be at least 1 (got {max_new_tokens})")
    model.eval()
    ids = [prompt_ids(tokenizer, p)[-max_length:] for p in prompts]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                              eos_token_id=sorted(eos) or None)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    out: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T), padded on the left
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                   generation_config=config)  # (B, T + new)
        for row, i in enumerate(chunk):
            out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    return [out[i] for i in range(len(ids))]
