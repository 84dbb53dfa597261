"""lsq.harness: lsq's data as lm-evaluation-harness tasks, scored by lm-eval, checked against lsq's own
scoring (choice accuracy), a hand-written greedy generation (exact match), and a process with no network.

The model is the tiny Llama of tests/lsq/tiny.py with a chat template (its end-of-turn is ``[SEP]``, the
eos token) and a random (not zero) LoRA adapter, so the adapter changes the scores."""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lsq import builtin_data  # noqa: E402
from lsq.cli import main  # noqa: E402
from lsq.data import DataConfig, load_data  # noqa: E402
from lsq.errors import LsqError  # noqa: E402
from lsq.evaluate import evaluate_splits  # noqa: E402
from lsq.harness import answer_frame, harness_scores, write_task  # noqa: E402
from lsq.models import ModelConfig, load_tokenizer  # noqa: E402
from tests.lsq.tiny import COLOURS, built_once, greedy_by_hand, save_tiny_llama, write_causal_jsonl  # noqa: E402

# a space between the assistant header and the answer, the eos token as end-of-turn: both framings are exercised
CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")


def _save_chat_llama(folder: Path) -> None:
    from transformers import AutoTokenizer

    save_tiny_llama(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"  # the model config's bos/eos ids; lm-eval needs an eos token
    tok.chat_template = CHAT
    tok.save_pretrained(folder)


def _save_adapter(folder: Path, model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory) -> ModelConfig:
    folder = built_once(tmp_path_factory, "tiny-llama-chat-harness", _save_chat_llama)
    return ModelConfig(name=str(folder), task="causal_lm", device="cpu")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, chat_llama) -> Path:
    return built_once(tmp_path_factory, "tiny-llama-chat-harness-lora", lambda d: _save_adapter(d, Path(chat_llama.name)))


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> DataConfig:
    """120 colour questions with three choices each (validation: 12 rows, test: 24)."""
    path = built_once(tmp_path_factory, "harness-colours", lambda d: write_causal_jsonl(d / "c.jsonl")) / "c.jsonl"
    return DataConfig(source=str(path), task="causal_lm", choices_column="choices", max_length=64, max_new_tokens=2)


def _load_task(folder: Path, name: str):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False).load([name])["tasks"][name]


# ------------------------------------------------------------------------------------ the task files


def test_written_tasks_are_what_lm_eval_reads(tmp_path, chat_llama, colours):
    tok = load_tokenizer(chat_llama)
    assert answer_frame(tok) == (" ", " [SEP] ")
    test = load_data(colours)["test"]
    assert write_task(colours, "test", tmp_path, "colours_mc", tokenizer=tok) == "colours_mc"
    assert (tmp_path / "colours_mc.yaml").read_text().startswith("# split 'test' of ")
    task = _load_task(tmp_path, "colours_mc")
    docs = list(task.test_docs())
    assert task.config.output_type == "multiple_choice" and len(docs) == len(test) == 24
    for doc, row in zip(docs, test):
        assert task.doc_to_text(doc) == row["prompt"]
        assert task.doc_to_choice(doc) == [f" {c} [SEP] " for c in row["choices"]]
        assert row["choices"][task.doc_to_target(doc)] == row["answer"]

    plain = colours.model_copy(update={"choices_column": None, "max_new_tokens": 5})
    write_task(plain, "validation", tmp_path, "colours_gen", tokenizer=tok)
    task = _load_task(tmp_path, "colours_gen")
    docs = list(task.test_docs())
    assert task.config.output_type == "generate_until" and len(docs) == len(load_data(plain)["validation"]) == 12
    assert [task.doc_to_target(d) for d in docs] == load_data(plain)["validation"]["answer"]
    assert task.config.generation_kwargs == {"until": ["[SEP]"], "max_gen_toks": 5, "do_sample": False,
                                             "temperature": 0.0}


def test_write_task_refuses_bad_input_in_one_line(tmp_path, colours):
    with pytest.raises(LsqError, match="task name"):
        write_task(colours, "test", tmp_path, "no spaces")
    with pytest.raises(LsqError, match="split 'dev' is missing"):
        write_task(colours, "dev", tmp_path, "t")
    with pytest.raises(LsqError, match="needs data.choices_column"):
        write_task(colours.model_copy(update={"choices_column": None}), "test", tmp_path, "t", kind="multiple_choice")


# ------------------------------------------------------------------ scores against independent computations


def test_multiple_choice_accuracy_equals_lsqs_choice_accuracy(tmp_path, chat_llama, adapter, colours):
    """lm-eval's acc (its own tokenisation, batching and log-likelihoods) against lsq's choice accuracy,
    for the base model and the adapter, on two splits."""
    tok = load_tokenizer(chat_llama)
    splits = ("validation", "test")
    for split in splits:
        write_task(colours, split, tmp_path, f"colours_{split}", tokenizer=tok)
    tasks = [f"colours_{split}" for split in splits]
    seen = set()
    for adapter_dir in (None, adapter):
        got = harness_scores(adapter_dir, chat_llama, tasks, tmp_path, batch_size=16)
        want = evaluate_splits(adapter_dir, chat_llama, colours, splits, batch_size=16)
        for split, task in zip(splits, tasks):
            assert got[task]["acc"] == pytest.approx(want[split]["choice_accuracy"], abs=1e-12), (adapter_dir, split)
            seen.add(round(got[task]["acc"], 6))
    assert len(seen) > 1  # the adapter and the splits do move the score: the equality is not 4 x the same number


def _normalised(text: str) -> str:
    """lm-eval's exact_match options as write_task sets them: no whitespace, lower case, no ASCII punctuation."""
    return re.sub(r"\s+", "", text).lower().translate(str.maketrans("", "", string.punctuation))


def _greedy(model, tok, prompt: str, new: int) -> str:
    """By hand: the chat-rendered prompt, argmax of a full forward pass per step, stop at eos, no special tokens."""
    head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return greedy_by_hand(model, tok, tok(head, add_special_tokens=False)["input_ids"], new)


def test_generation_exact_match_equals_a_hand_count(tmp_path, chat_llama, adapter):
    """Answers made from the base model's own greedy output for half the things (upper-cased, padded,
    with punctuation: equal only once normalised) and wrong for the rest; the harness's exact match must
    be the hand count, and lsq's own exact match agrees (for the adapter too)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(chat_llama)
    model = AutoModelForCausalLM.from_pretrained(chat_llama.name).eval()
    new = 4
    greedy = {thing: _greedy(model, tok, f"the colour of the {thing} is", new) for thing in COLOURS}
    right = {t for t in sorted(COLOURS)[::2] if _normalised(greedy[t])}
    assert right, greedy

    def answer(thing: str) -> str:
        g = greedy[thing]
        if thing not in right:
            return "zzz"
        return f"  {g.upper()} !" if g.upper().lower() == g.lower() else g + "."

    rows = [json.loads(line) for line in write_causal_jsonl(tmp_path / "raw.jsonl", n=40).read_text().splitlines()]
    with (tmp_path / "gen.jsonl").open("w") as f:
        for row in rows:
            thing = row["prompt"].split()[-2]
            f.write(json.dumps({"prompt": row["prompt"], "answer": answer(thing)}) + "\n")
    cfg = DataConfig(source=str(tmp_path / "gen.jsonl"), task="causal_lm", max_length=64, max_new_tokens=new)
    test = load_data(cfg)["test"]
    hand = sum(_normalised(greedy[p.split()[-2]]) == _normalised(a) for p, a in zip(test["prompt"], test["answer"]))
    assert 0 < hand < len(test) == 8

    write_task(cfg, "test", tmp_path / "tasks", "gen", tokenizer=tok)
    got = harness_scores(None, chat_llama, ["gen"], tmp_path / "tasks", batch_size=1)
    assert got["gen"]["exact_match"] == pytest.approx(hand / len(test), abs=1e-12)
    assert evaluate_splits(None, chat_llama, cfg, ("test",), batch_size=1)["test"]["exact_match"] == pytest.approx(
        hand / len(test), abs=1e-12)
    with_adapter = harness_scores(adapter, chat_llama, ["gen"], tmp_path / "tasks", batch_size=1)
    lsq_adapter = evaluate_splits(adapter, chat_llama, cfg, ("test",), batch_size=1)["test"]["exact_match"]
    assert with_adapter["gen"]["exact_match"] == pytest.approx(lsq_adapter, abs=1e-12)


# ---------------------------------------------------------------------------------------- built-in tasks


def test_builtin_tasks_become_loadable_harness_tasks(tmp_path, chat_llama, monkeypatch):
    import lsq.data

    tok = load_tokenizer(chat_llama)
    addition = DataConfig(source="builtin:addition", task="causal_lm", max_eval=10, max_new_tokens=3)
    write_task(addition, "test", tmp_path, "addition", tokenizer=tok)
    task = _load_task(tmp_path, "addition")
    doc = next(iter(task.test_docs()))
    assert task.config.output_type == "generate_until" and len(task.test_docs()) == 10
    assert re.fullmatch(r"What is \d+ \+ \d+\? Answer with the number only\.", task.doc_to_text(doc))
    scores = harness_scores(None, chat_llama, ["addition"], tmp_path, limit=3, batch_size=3)
    assert set(scores["addition"]) >= {"exact_match"} and 0 <= scores["addition"]["exact_match"] <= 1

    # builtin:movie from stand-in VADER rows (the real sdist is not fetched here); a seed no other test uses,
    # and the per-process cache of built-in splits cleared after, so the stand-in rows reach no other test
    rows = {name: [{"id": str(i), "rating": r, "text": f"{name} text {i}"} for i, r in
                   enumerate([1.5, -2.0, 0.0, 3.1, -0.4] * 8)] for name in builtin_data.VADER_FILES}
    monkeypatch.setattr(builtin_data, "vader_rows", lambda **_: rows)
    try:
        movie = DataConfig(source="builtin:movie", task="causal_lm", seed=987_654)
        write_task(movie, "test", tmp_path, "movie", tokenizer=tok)
        task = _load_task(tmp_path, "movie")
        docs = list(task.test_docs())
        assert task.config.output_type == "multiple_choice" and len(docs) == len(load_data(movie)["test"])
        assert task.doc_to_choice(docs[0]) == [" negative [SEP] ", " positive [SEP] "]
        scores = harness_scores(None, chat_llama, ["movie"], tmp_path, limit=4)
        assert 0 <= scores["movie"]["acc"] <= 1
    finally:
        lsq.data._builtin_splits.cache_clear()


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_scores_the_configured_split_through_the_harness(tmp_path, chat_llama, adapter, colours, capsys):
    settings = [f"model.name={chat_llama.name}", "model.task=causal_lm", "model.device=cpu",
                f"data.source={colours.source}", "data.task=causal_lm", "data.choices_column=choices",
                "data.max_length=64"]
    assert main(["evaluate", str(adapter), *settings, "--json", "--harness"]) == 0
    printed = json.loads(capsys.readouterr().out)
    want = evaluate_splits(adapter, chat_llama, colours, ("test",), batch_size=16)["test"]["choice_accuracy"]
    assert printed["lsq_test"]["acc"] == pytest.approx(want, abs=1e-12)
    assert main(["evaluate", str(adapter), *settings, "--split", "validation", "--harness-limit", "5",
                 "--harness"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "metric", "value", "stderr"]
    assert table[1].split()[:2] == ["lsq_validation", "acc"] and len(table) == 2


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lsq: error: "), err
    return err[0]


def test_cli_bad_harness_input_is_one_line_and_exit_2(tmp_path, chat_llama, adapter, colours, capsys, monkeypatch):
    write_task(colours, "test", tmp_path, "colours")
    capsys.readouterr()  # what writing it drew (datasets' progress bars)
    model = [f"model.name={chat_llama.name}", "model.task=causal_lm", "model.device=cpu", "data.task=causal_lm",
             "data.source=builtin:addition"]
    assert main(["evaluate", str(adapter), *model, "--harness-include", str(tmp_path), "--harness", "nope"]) == 2
    line = _one_error_line(capsys)
    assert "unknown task 'nope'" in line and "colours" in line  # names what the folder holds
    assert main(["evaluate", str(adapter), *model, "--harness-include", str(tmp_path / "gone"), "--harness", "x"]) == 2
    assert "no such folder" in _one_error_line(capsys)
    assert main(["evaluate", str(adapter), *model, "--harness-limit", "3"]) == 2
    assert "go with --harness" in _one_error_line(capsys)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    assert main(["evaluate", str(adapter), *model, "--harness", "colours"]) == 2
    assert _one_error_line(capsys) == "lsq: error: install lsq[eval] (lm-eval) to score through lm-evaluation-harness"
    with pytest.raises(LsqError, match=r"install lsq\[eval\]"):
        harness_scores(adapter, chat_llama, ["colours"], tmp_path)


# ------------------------------------------------------------------------------------------- no network

_NO_NETWORK = r"""
import json, os, socket, sys
attempts = []
real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        attempts.append(repr(address))
        raise OSError("network disabled by the test")
    return real_connect(self, address)
def getaddrinfo(host, *args, **kwargs):
    attempts.append(f"dns {host}")
    raise OSError("network disabled by the test")
socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo

import huggingface_hub.constants, transformers, datasets  # imported before the call, as in a longer program
from lsq.harness import harness_scores
from lsq.models import ModelConfig
model, adapter, folder = sys.argv[1:4]
scores = harness_scores(adapter, ModelConfig(name=model, task="causal_lm", device="cpu"), ["colours"], folder, limit=6)
during = list(attempts)
after = {"env": [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if k in os.environ],
         "hub_offline": huggingface_hub.constants.HF_HUB_OFFLINE, "datasets_offline": datasets.config.HF_HUB_OFFLINE}
try:  # the detector works: online again, a Hub call is caught
    huggingface_hub.HfApi().model_info("gpt2")
except Exception:
    pass
print(json.dumps({"scores": scores, "during": during, "after": after, "control": attempts[len(during):]}))
"""


def test_harness_scores_touch_no_network_even_when_the_caller_left_it_on(tmp_path, chat_llama, adapter, colours):
    write_task(colours, "test", tmp_path, "colours", tokenizer=load_tokenizer(chat_llama))
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in offline}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "-c", _NO_NETWORK, chat_llama.name, str(adapter), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 <= out["scores"]["colours"]["acc"] <= 1
    assert out["during"] == []
    assert out["after"] == {"env": [], "hub_offline": False, "datasets_offline": False}  # the caller's settings back
    assert out["control"], "the socket patch caught nothing: the check above proves nothing"
