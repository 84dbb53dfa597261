"""The registered model as users get it: label names from the data, the serving contract and metric tags on
the version, ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` (REST on 127.0.0.1) answering names;
a decoder's version answering through its chat template, as training saw prompts, directly and served."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from lsq.models import ModelConfig
from lsq.pipeline_config import load_pipeline_config
from lsq.records import Evaluation
from tasks import promotion, tracking
from tasks.steps import prepare_data
from tests.lsq.test_serving import decoder_adapter
from tests.lsq.tiny import built_once, save_chat_llama, write_causal_jsonl

pytestmark = pytest.mark.usefixtures("mlflow_uri")
REPO = Path(__file__).resolve().parents[2]
MODEL = "lsq-tiny-spam"
TEXTS = ["win a free prize now", "see you at lunch", "superb"]
DECODER = "lsq-tiny-chat"
QUESTIONS = ["What is 2 + 3?", "the colour of the sky is", "hi"]  # different lengths: one left-padded batch


@pytest.fixture
def champion(mlflow_uri, variants, base_dir, tmp_path) -> str:
    """One variant registered through the pipeline's task (``log_and_register``) on data labelled ham/spam."""
    data = tmp_path / "sms.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(40):
            w.writerow([f"message number {i}", "spam" if i % 5 == 0 else "ham"])
    cfg = load_pipeline_config({"model": {"name": str(base_dir), "device": "cpu"}, "data": {"source": str(data)},
                                "promotion": {"metric": "macro_f1"},
                                "tracking": {"tracking_uri": mlflow_uri, "registered_model": MODEL}})
    variant = variants[1]
    evaluations = tuple(Evaluation(label=variant.label, split=split, examples=8, scores={"accuracy": 0.8, "macro_f1": f1},
                                   trainable_params=10, lora_params=8, adapter_bytes=100)
                        for split, f1 in (("validation", 0.6), ("test", 0.55)))
    parent = tracking.start_pipeline_run(mlflow_uri, "lsq", "pipeline", {"seed": 0}, {})
    row = promotion.log_and_register.fn(mlflow_uri, cfg, parent, variant, evaluations, prepare_data.fn(cfg.data))
    assert (row.metric, row.test_metric) == (0.6, 0.55)
    tags = tracking.client_for(mlflow_uri).get_model_version(MODEL, row.version).tags
    assert tags["lsq.metric"] == "macro_f1" and tags["val_macro_f1"] == "0.6" and tags["test_macro_f1"] == "0.55"
    assert "test_accuracy" not in tags and "val_accuracy" not in tags  # only the promotion metric is a tag
    # a classification adapter saves its head: servers of the vLLM kind would not load it, and the tag says so
    assert tags["lsq.serving.vllm"].startswith("no: modules_to_save (classifier") and row.serving == tags["lsq.serving.vllm"]
    decision = promotion.decide_promotion(cfg, [row], None)
    tracking.set_alias(mlflow_uri, MODEL, row.version, "champion", decision)
    return row.version


def test_pyfunc_predicts_the_label_names_of_the_data(champion):
    predicted = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(TEXTS)
    assert len(predicted) == len(TEXTS) and set(predicted) <= {"ham", "spam"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_rest_with_label_names(champion, mlflow_uri, tmp_path):
    answer = served_answer(f"models:/{MODEL}@champion", mlflow_uri, tmp_path, TEXTS)
    assert len(answer["predictions"]) == len(TEXTS) and set(answer["predictions"]) <= {"ham", "spam"}


def served_answer(model_uri: str, mlflow_uri: str, tmp_path: Path, inputs: list[str]) -> dict:
    """POST ``{"inputs": inputs}`` to ``mlflow models serve -m model_uri``, started as the README says (the venv's
    bin on PATH, no activated venv) and stopped with its whole group; nothing of the group is left behind."""
    port = free_port()
    venv_bin = Path(sys.executable).parent  # .venv/bin in a checkout
    command = (f"PATH={venv_bin}:$PATH mlflow models serve -m {model_uri} --env-manager local "
               f"-h 127.0.0.1 -p {port}")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(MLFLOW_TRACKING_URI=mlflow_uri, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PATH="/usr/local/bin:/usr/bin:/bin")  # nothing of the venv on PATH but what the command adds
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline, answer = time.monotonic() + 150, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                                 data=json.dumps({"inputs": inputs}).encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(1)
        assert answer is not None, f"no answer (exit {server.poll()}): {(tmp_path / 'serve.log').read_text()[-3000:]}"
    finally:
        stop_group(server)
        log.close()
    with pytest.raises(ProcessLookupError):  # nothing of its process group is left behind
        os.killpg(server.pid, 0)
    return answer


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole process group (bash, mlflow, uvicorn and its workers), SIGKILL what outlives 20 s."""
    for sig, patience in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


# ------------------------------------------------------------------------------------- a decoder's version
@pytest.fixture
def chat_llama(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "tiny-llama-chatml", save_chat_llama)


@pytest.fixture
def chat_adapter(chat_llama, tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "chatml-adapter-r4", lambda d: decoder_adapter(chat_llama, d, 4))


@pytest.fixture
def decoder_version(mlflow_uri, chat_llama, chat_adapter, tmp_path) -> str:
    """The rank-4 adapter registered through the pipeline's task, aliased champion; its serving tag checked."""
    from lsq.variants import Variant

    data = write_causal_jsonl(tmp_path / "qa.jsonl", n=20)
    cfg = load_pipeline_config({"model": {"name": str(chat_llama), "task": "causal_lm", "device": "cpu"},
                                "data": {"source": str(data), "task": "causal_lm"},
                                "promotion": {"metric": "answer_accuracy"},
                                "tracking": {"tracking_uri": mlflow_uri, "registered_model": DECODER}})
    variant = Variant(method="direct", rank=4, source_rank=16, adapter_dir=str(chat_adapter))
    evaluations = tuple(Evaluation(label=variant.label, split=split, examples=4, scores={"answer_accuracy": 0.5},
                                   trainable_params=10, lora_params=8, adapter_bytes=100)
                        for split in ("validation", "test"))
    parent = tracking.start_pipeline_run(mlflow_uri, "lsq", "pipeline", {"seed": 0}, {})
    row = promotion.log_and_register.fn(mlflow_uri, cfg, parent, variant, evaluations, prepare_data.fn(cfg.data))
    tags = tracking.client_for(mlflow_uri).get_model_version(DECODER, row.version).tags
    # a decoder's LoRA adapter saves no whole module: a vLLM-style server loads it with the next rank it names
    assert tags["lsq.serving.vllm"] == row.serving == "yes: --max-lora-rank 8"
    tracking.set_alias(mlflow_uri, DECODER, row.version, "champion", promotion.decide_promotion(cfg, [row], None))
    return row.version


def greedy(lm, tok, prompt_ids: list[int], max_new_tokens: int) -> str:
    import torch

    ids = torch.tensor([prompt_ids])  # (1, T)
    out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                      max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def direct_answers(base: Path, adapter: Path, chat: bool, max_new_tokens: int = 16) -> list[str]:
    """Base + adapter with transformers and PEFT alone, one prompt at a time: the user turn in the chat template
    (``chat``) or the raw prompt with the tokenizer's special tokens, as SFT training feeds prompts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    answers = []
    for q in QUESTIONS:
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            assert text.endswith("<|im_start|>assistant\n")
            ids = tok(text, add_special_tokens=False).input_ids
        else:
            ids = tok(q).input_ids
        answers.append(greedy(lm, tok, ids, max_new_tokens))
    return answers


def test_decoder_pyfunc_answers_through_the_chat_template(decoder_version, chat_llama, chat_adapter):
    loaded = mlflow.pyfunc.load_model(f"models:/{DECODER}@champion")
    expected = direct_answers(chat_llama, chat_adapter, chat=True)
    assert loaded.predict(QUESTIONS) == expected
    assert expected != direct_answers(chat_llama, chat_adapter, chat=False)  # the template makes a difference
    # max_new_tokens from params (on the python model: MLflow drops params that the signature does not declare)
    short = loaded.unwrap_python_model().predict(None, QUESTIONS, params={"max_new_tokens": 3})
    assert short == direct_answers(chat_llama, chat_adapter, chat=True, max_new_tokens=3)


def test_decoder_pyfunc_with_the_chat_template_off_answers_the_raw_prompt(chat_llama, chat_adapter):
    from types import SimpleNamespace

    from tasks.pyfunc_model import LsqAdapterModel

    model = LsqAdapterModel()
    cfg = ModelConfig(name=str(chat_llama), task="causal_lm", device="cpu", chat_template="off")
    model.load_context(SimpleNamespace(model_config={"model": cfg.model_dump(mode="json"), "max_new_tokens": 16},
                                       artifacts={"adapter": str(chat_adapter)}))
    assert model.predict(None, QUESTIONS) == direct_answers(chat_llama, chat_adapter, chat=False)


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_decoder_version_as_the_pyfunc_does(decoder_version, mlflow_uri, tmp_path):
    direct = mlflow.pyfunc.load_model(f"models:/{DECODER}@champion").predict(QUESTIONS[:1])
    answer = served_answer(f"models:/{DECODER}/{decoder_version}", mlflow_uri, tmp_path, QUESTIONS[:1])
    assert answer["predictions"] == direct and len(direct) == 1 and isinstance(direct[0], str) and direct[0]
