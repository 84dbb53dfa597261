"""Work folders (lsq/workdir.py) and the steps on them (lsq/steps.py): different inputs never share a
folder, the same inputs reuse a verified result, a claim ends with its process, records are data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lsq.steps
import lsq.train
from lsq import steps
from lsq.config import SqueezeConfig
from lsq.data import DataConfig, fingerprint, load_data
from lsq.errors import LsqError
from lsq.records import Evaluation, Squeezed, Variant
from lsq.train_config import TrainConfig, key_config
from lsq.workdir import RECORD_NAME, adapter_digest, claimed, finished, publish, step_key
from tests.lsq.tiny import cls_config, cls_csv, tiny_bert  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
EXACT = SqueezeConfig(ranks=(4, 2), alpha_policy="keep-scale", method="exact")


def test_step_key_covers_every_input_and_ignores_key_order():
    base = {"config": {"seed": 1, "lr": 0.1}, "data": "abc", "code": "v1"}
    assert step_key(base) == step_key({"code": "v1", "data": "abc", "config": {"lr": 0.1, "seed": 1}})
    for changed in ({**base, "config": {"seed": 2, "lr": 0.1}}, {**base, "data": "abd"}, {**base, "code": "v2"}):
        assert step_key(changed) != step_key(base)


def test_a_claim_excludes_others_and_ends_with_a_killed_holder(tmp_path):
    folder = tmp_path / "step"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lsq.workdir import claimed\n"
         f"with claimed({str(folder)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError):
            with claimed(folder, timeout=0.3):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        with claimed(folder, timeout=10):  # the kernel released the dead holder's lock
            assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()


def _variant(folder: Path, adapter: Path) -> Variant:
    return Variant(method="post", rank=2, source_rank=8, adapter_dir=str(adapter), adapter_sha256=adapter_digest(adapter))


def test_a_record_is_reused_only_while_it_is_whole_and_its_adapter_unchanged(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 2}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    record = Squeezed(source=_variant(tmp_path, adapter), variants=(_variant(tmp_path, adapter),))
    publish(tmp_path, record)
    assert finished(tmp_path, Squeezed) == record
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    (adapter / "adapter_model.safetensors").write_bytes(b"other weights")  # someone changed the adapter
    assert finished(tmp_path, Squeezed) is None and not (tmp_path / RECORD_NAME).exists()

    (tmp_path / RECORD_NAME).write_text('{"source": {"method": "po')  # cut by a kill
    assert finished(tmp_path, Squeezed) is None

    evil = json.loads(record.model_dump_json())
    evil["__class__"] = "os.system"  # a record is data: anything else is refused, never imported
    (tmp_path / RECORD_NAME).write_text(json.dumps(evil))
    assert finished(tmp_path, Squeezed) is None


def test_evaluation_names_metrics_in_one_place():
    e = Evaluation.from_metrics("cont-r4", {"accuracy": 0.8, "macro_f1": 0.7, "trainable_params": 10,
                                            "lora_params": 8, "adapter_bytes": 100, "examples": 20, "split": "validation"})
    assert e.logged() == {"val_accuracy": 0.8, "val_macro_f1": 0.7, "trainable_params": 10.0, "lora_params": 8.0,
                          "adapter_bytes": 100.0}
    assert e.model_copy(update={"split": "test"}).metric("accuracy") == "test_accuracy"


def test_steps_get_their_own_folders_and_reuse_finished_work(tiny_bert, cls_csv, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    data_cfg = DataConfig(source=str(cls_csv), max_length=16)
    fp = fingerprint(load_data(data_cfg))
    code = steps.code_version()

    def source(seed: int) -> TrainConfig:
        return TrainConfig.model_validate(cls_config(tiny_bert, cls_csv, root, method="source", source_rank=8,
                                                     train__seed=seed, train__steps=3))

    one, two = steps.train_step(source(1), fp, code), steps.train_step(source(2), fp, code)
    assert Path(one.adapter_dir).parent != Path(two.adapter_dir).parent  # seeds never share a folder
    assert (one.seed, two.seed) == (1, 2) and one.adapter_sha256 != two.adapter_sha256
    for v, seed in ((one, 1), (two, 2)):
        summary = json.loads((Path(v.adapter_dir).parent / "train_summary.json").read_text())
        assert summary["config"]["train"]["seed"] == seed and adapter_digest(v.adapter_dir) == v.adapter_sha256

    squeezed = steps.squeeze_step(one, EXACT, root, code, plot=False)
    assert [v.rank for v in squeezed.variants] == [4, 2] and squeezed.source == one
    r2 = squeezed.variants[1]
    assert 0 < r2.retained_energy < 1 and r2.total_train_seconds == one.total_train_seconds
    cont_cfg = TrainConfig.model_validate(cls_config(tiny_bert, cls_csv, root, method="cont", rank=2, source_rank=8,
                                                     cont={"adapter": "anything", "steps": 2, "lr": 1e-3}))
    cont = steps.train_step(cont_cfg, fp, code, parent=r2)
    assert cont.rank == 2 and cont.steps == one.steps + 2 and cont.retained_energy == r2.retained_energy
    assert cont.total_train_seconds == pytest.approx(one.total_train_seconds + cont.train_seconds)

    # the same inputs again: nothing is trained or squeezed, the records come back as they were
    def no_training(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(lsq.steps, "train", no_training)
    monkeypatch.setattr("lsq.steps.squeeze_adapter", no_training)
    assert steps.train_step(source(1), fp, code) == one
    assert steps.squeeze_step(one, EXACT, root, code, plot=False) == squeezed
    assert steps.train_step(cont_cfg, fp, code, parent=r2) == cont
    # other data or other code: another folder, so the step runs (and here fails loudly)
    with pytest.raises(AssertionError, match="ran again"):
        steps.train_step(source(1), "other-fingerprint", code)
    with pytest.raises(AssertionError, match="ran again"):
        steps.train_step(source(1), fp, "other-code")

    # a changed adapter is not served from its record: the step runs again
    monkeypatch.undo()
    weights = Path(one.adapter_dir) / "adapter_model.safetensors"
    tensors = load_file(weights)
    before = {k: t.clone() for k, t in tensors.items()}
    weights.write_bytes(b"garbage")
    again = steps.train_step(source(1), fp, code)
    assert adapter_digest(again.adapter_dir) == again.adapter_sha256
    after = load_file(Path(again.adapter_dir) / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # seeded: the same adapter, rebuilt


def test_cont_needs_its_parent(tiny_bert, cls_csv, tmp_path):
    cfg = TrainConfig.model_validate(cls_config(tiny_bert, cls_csv, tmp_path, method="cont", cont={"adapter": "x"}))
    with pytest.raises(LsqError, match="parent"):
        steps.train_step(cfg, "fp", "code")


def _package_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "lsq"
    copy.mkdir()
    for path in steps.PACKAGE.glob("*.py"):
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


def test_the_code_key_changes_with_the_code_that_makes_adapters_and_scores(tmp_path):
    """A change to the squeeze maths, training or scoring re-keys every step (it could change an adapter or a
    metric); a change to the command line's help, the reports or the plots keeps finished steps reusable."""
    package = _package_copy(tmp_path)
    before = steps.code_version(package)
    assert before == steps.code_version()  # the copy is the package
    for name in ("linalg", "train", "evaluate", "objectives"):
        path = package / f"{name}.py"
        original = path.read_bytes()
        path.write_bytes(original + b"\nEPS = 1e-9\n")
        assert steps.code_version(package) != before, name
        path.write_bytes(original)
    for name in ("cli", "commands", "report", "plotting"):
        path = package / f"{name}.py"
        text = path.read_text()
        path.write_text(text.replace('"""', '"""Edited help. ', 1) + "\n# a comment\n")
        assert steps.code_version(package) == before, name


def test_every_module_is_keyed_or_said_not_to_change_results():
    """A new module must be sorted: keyed (it can change an adapter or a score) or not."""
    modules = {path.stem for path in steps.PACKAGE.glob("*.py")}
    keyed, unkeyed = set(steps.KEYED_MODULES), set(steps.UNKEYED_MODULES)
    assert not keyed & unkeyed
    assert modules == keyed | unkeyed, (modules - keyed - unkeyed, (keyed | unkeyed) - modules)


def test_the_key_config_leaves_out_where_and_how_many_processes(tmp_path):
    raw = cls_config(tmp_path / "model", tmp_path / "data.csv", tmp_path / "out")
    one = TrainConfig.model_validate(raw)
    other = TrainConfig.model_validate({**raw, "output_dir": str(tmp_path / "elsewhere"), "resume": False,
                                        "train": {**raw["train"], "processes": 2}})
    assert key_config(one) == key_config(other) and "output_dir" not in key_config(one)
    on = TrainConfig.model_validate({**raw, "train": {**raw["train"], "eval_steps": 5}})
    assert key_config(on)["train"]["eval_steps"] == 5
    assert steps.train_folder(on, "fp", "code") != steps.train_folder(one, "fp", "code")

