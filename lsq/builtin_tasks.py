"""Built-in supervised fine-tuning tasks for instruction-tuned decoders (``data.task: causal_lm``).

Two kinds, both offline and deterministic, as rows ``{prompt, answer[, choices]}``:

- **Sentiment instructions** (``builtin:movie``, ``builtin:amazon``, ``builtin:nyt``, ``builtin:tweets``
  with ``data.task: causal_lm``): the human-rated VADER sentences lsq already ships
  (:mod:`lsq.builtin_data`), each as an instruction answered with the label word, ``negative`` or
  ``positive`` (the sign of the mean human rating; zero ratings dropped), with ``choices`` so
  multiple-choice scoring applies (the paper's setup) and the word as an exact answer to generate.
- **Two-digit addition** (``builtin:addition``): every unordered pair ``10 <= a <= b <= 99`` once (4,095
  questions, the order of the two numbers drawn with a fixed seed, so ``a + b`` and ``b + a`` never land
  in different splits), asked as ``What is 17 + 25? Answer with the number only.``, answered ``42``.
  Nothing to choose from: greedy generation must produce the number (exact match), which a 135M
  instruct model gets wrong often enough for fine-tuning to show.

Splits are cut by :func:`lsq.data.split_and_cap` with the data seed, like every other source.
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict, Features, Sequence, Value

from lsq import builtin_data

SENTIMENT_SETS = tuple(builtin_data.VADER_FILES)
TASKS = (*SENTIMENT_SETS, "addition")
CHOICES = ("negative", "positive")
_WHAT = {"movie": "movie review snippet", "amazon": "product review snippet",
         "nyt": "newspaper editorial snippet", "tweets": "tweet"}
SENTIMENT_PROMPT = ("Is the sentiment of this {what} positive or negative? Answer with one word: positive or "
                    "negative.\n\n{text}")
ADDITION_PROMPT = "What is {a} + {b}? Answer with the number only."
_ADDITION_ORDER_SEED = 1234  # fixed: the task's content never depends on the data seed (only its splits do)


def sentiment(name: str) -> Dataset:
    """The VADER set ``name`` as instructions answered with the label word; columns prompt, answer, choices."""
    rows = [r for r in builtin_data.vader_rows()[name] if r["rating"] != 0]
    prompts = [SENTIMENT_PROMPT.format(what=_WHAT[name], text=r["text"]) for r in rows]
    answers = [CHOICES[int(r["rating"] > 0)] for r in rows]
    features = Features({"prompt": Value("string"), "answer": Value("string"), "choices": Sequence(Value("string"))})
    return Dataset.from_dict({"prompt": prompts, "answer": answers, "choices": [list(CHOICES)] * len(rows)},
                             features=features)


def addition() -> Dataset:
    """Every unordered two-digit pair once, as ``What is a + b?`` with the sum as the answer; columns prompt, answer."""
    order = random.Random(_ADDITION_ORDER_SEED)
    prompts, answers = [], []
    for a in range(10, 100):
        for b in range(a, 100):
            x, y = (a, b) if order.random() < 0.5 else (b, a)
            prompts.append(ADDITION_PROMPT.format(a=x, b=y))
            answers.append(str(a + b))
    return Dataset.from_dict({"prompt": prompts, "answer": answers},
                             features=Features({"prompt": Value("string"), "answer": Value("string")}))


def task_dataset(name: str) -> DatasetDict:
    """The whole task as one train split (the caller cuts validation and test from it)."""
    return DatasetDict(train=addition() if name == "addition" else sentiment(name))
