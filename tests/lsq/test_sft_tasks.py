"""Built-in SFT tasks (lsq.builtin_tasks) and decoder scoring: exact match of greedy generation, choice accuracy.

Generation and choice scoring are checked against independent computations: a hand-written greedy loop
(one prompt at a time, no padding, no ``generate``) and per-choice forward passes.
"""

import re

import pytest
import torch

from lsq import builtin_data, builtin_tasks
from lsq.data import DataConfig, fingerprint, load_data
from lsq.errors import LsqError
from lsq.evaluate import evaluate_splits
from lsq.models import ModelConfig, load_base_model, load_tokenizer
from lsq.objectives import (
    PadCollator,
    _answer_logprobs,
    _choice_accuracy,
    _sft_ids,
    exact_match,
    generate_answers,
    normalize_answer,
    prompt_ids,
)
from tests.lsq.tiny import greedy_by_hand, lm_jsonl, tiny_llama  # noqa: F401 - fixtures

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


# ------------------------------------------------------------------------------------- the tasks


def test_addition_holds_every_unordered_pair_once_with_its_sum():
    ds = builtin_tasks.addition()
    pairs = set()
    for row in ds:
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\? Answer with the number only\.", row["prompt"]).groups())
        assert 10 <= a <= 99 and 10 <= b <= 99 and row["answer"] == str(a + b)
        pairs.add(frozenset((a, b)) if a != b else frozenset((a,)))
    assert len(ds) == len(pairs) == 90 * 91 // 2  # a <= b: 4,095 questions, no pair twice in either order
    firsts = [int(p.split()[2]) for p in ds["prompt"]]
    seconds = [int(p.split()[4].rstrip("?")) for p in ds["prompt"]]
    assert 0.4 < sum(x > y for x, y in zip(firsts, seconds)) / len(ds) < 0.6  # both orders asked


def test_addition_splits_are_seeded_and_disjoint():
    cfg = DataConfig(source="builtin:addition", task="causal_lm")
    data, again = load_data(cfg), load_data(cfg)
    assert fingerprint(data) == fingerprint(again)
    assert {k: len(v) for k, v in data.items()} == {"train": 2866, "validation": 410, "test": 819}
    seen = [set(data[s]["prompt"]) for s in ("train", "validation", "test")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    other = load_data(cfg.model_copy(update={"seed": 1}))
    assert fingerprint(other) != fingerprint(data) and set(other["test"]["prompt"]) != seen[2]
    capped = load_data(cfg.model_copy(update={"max_train": 100, "max_eval": 20}))
    assert [len(capped[s]) for s in ("train", "validation", "test")] == [100, 20, 20]


def test_sentiment_instructions_answer_with_the_label_word_and_carry_choices(monkeypatch):
    rows = {name: [{"id": str(i), "rating": r, "text": f"{name} text {i}"} for i, r in
                   enumerate([1.5, -2.0, 0.0, 3.1, -0.4] * 8)] for name in builtin_data.VADER_FILES}
    monkeypatch.setattr(builtin_data, "vader_rows", lambda **_: rows)
    ds = builtin_tasks.sentiment("tweets")
    assert len(ds) == 32  # zero ratings dropped
    for row in ds:
        i = int(row["prompt"].rsplit(" ", 1)[1])
        assert row["prompt"].startswith("Is the sentiment of this tweet positive or negative?")
        assert row["answer"] == ("positive" if rows["tweets"][i]["rating"] > 0 else "negative")
        assert row["choices"] == ["negative", "positive"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"source": "builtin:addition"}, "builtin:addition is causal_lm data"),
    ({"source": "builtin:nope", "task": "causal_lm"}, "unknown built-in causal_lm set 'nope'"),
    ({"source": "x.jsonl", "task": "causal_lm", "max_new_tokens": 0}, "greater than or equal to 1"),
])
def test_bad_task_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_a_row_without_an_answer_is_refused_in_one_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n' * 20 + '{"prompt": "c", "answer": "  "}\n')
    with pytest.raises(LsqError, match=r"answer_column: row 20 of split 'train' has an empty answer") as err:
        load_data(DataConfig(source=str(path), task="causal_lm"))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ exact match


@pytest.mark.parametrize(("got", "want", "same"), [
    ("42", "42", True), (" 42.\n", "42", True), ("Positive.", "positive", True), ("4,200", "4200", True),
    ("the  answer\tis", "The answer is", True), ("42 is the answer", "42", False), ("", "42", False),
    ("negative", "positive", False), ("4 2", "42", False),
])
def test_exact_match_normalises_case_whitespace_and_punctuation_only(got, want, same):
    assert exact_match(got, want) is same
    assert normalize_answer(normalize_answer(got)) == normalize_answer(got)  # idempotent


# ----------------------------------------------------------------------------------- generation


@pytest.fixture
def chat_llama(tiny_llama):  # noqa: F811 - fixture
    cfg = ModelConfig(name=str(tiny_llama), task="causal_lm", device="cpu")
    tok = load_tokenizer(cfg)
    tok.chat_template = CHAT
    return load_base_model(cfg).eval(), tok


def answer_by_hand(model, tok, prompt: str, new: int) -> str:
    """The prompt rendered as training renders it, decoded greedily by hand (no padding, no ``generate``)."""
    return greedy_by_hand(model, tok, prompt_ids(tok, prompt), new).strip()


def test_batched_greedy_generation_equals_a_hand_loop_per_prompt(chat_llama):
    model, tok = chat_llama
    prompts = ["the colour of the sky is", "what is two", "a much longer prompt that needs more padding than the rest",
               "x"]
    got = generate_answers(model, tok, prompts, max_new_tokens=5, batch_size=3, device="cpu")
    want = [answer_by_hand(model, tok, p, 5) for p in prompts]
    assert got == want
    with pytest.raises(LsqError, match="max_new_tokens: must be at least 1"):
        generate_answers(model, tok, prompts, max_new_tokens=0, batch_size=3, device="cpu")


def test_choice_accuracy_in_batches_equals_one_forward_per_choice(chat_llama, lm_jsonl):
    model, tok = chat_llama
    raw = load_data(DataConfig(source=str(lm_jsonl), task="causal_lm", choices_column="choices"))["test"]
    collator = PadCollator(tok.pad_token_id)
    hits = 0
    for row in raw:
        scores = []
        for choice in row["choices"]:
            ids, labels = _sft_ids(tok, row["prompt"], choice, 24)
            with torch.no_grad():
                lp, _, _ = _answer_logprobs(model, collator([{"input_ids": ids, "labels": labels}]))
            scores.append(float(lp[0]))
        hits += row["choices"][scores.index(max(scores))] == row["answer"]
    assert _choice_accuracy(model, raw, tok, collator, 5, "cpu", 24) == pytest.approx(hits / len(raw), abs=1e-9)


def test_exact_match_metric_of_a_split_equals_the_hand_count(tiny_llama, tmp_path, monkeypatch):  # noqa: F811
    path = tmp_path / "sums.jsonl"
    rows = [f'{{"prompt": "what is {a} and {a}", "answer": "{2 * a}"}}' for a in range(20)]
    path.write_text("\n".join(rows) + "\n")
    cfg = ModelConfig(name=str(tiny_llama), task="causal_lm", device="cpu")
    data_cfg = DataConfig(source=str(path), task="causal_lm", max_length=24, max_new_tokens=3)
    data = load_data(data_cfg)
    model, tok = load_base_model(cfg).eval(), load_tokenizer(cfg)
    answers = [answer_by_hand(model, tok, p, 3) for p in data["test"]["prompt"]]
    answers[0] = data["test"]["answer"][0]  # a random model is never right: its first answer is made right below
    import lsq.objectives as objectives

    real = objectives.generate_answers

    def first_right(model, tokenizer, prompts, *args, **kwargs):
        return [data["test"]["answer"][0], *real(model, tokenizer, prompts, *args, **kwargs)[1:]]

    monkeypatch.setattr(objectives, "generate_answers", first_right)
    scores = evaluate_splits(None, cfg, data_cfg, ("test",), batch_size=4, data=data)["test"]
    want = sum(exact_match(a, b) for a, b in zip(answers, data["test"]["answer"])) / len(answers)
    assert scores["exact_match"] == pytest.approx(want) and scores["exact_match"] > 0
    assert scores["adapter_bytes"] == 0 and "choice_accuracy" not in scores
