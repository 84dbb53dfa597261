"""Data-parallel training on CPU (torchrun, gloo: the code path NCCL takes on GPUs).

Two processes at the same global batch against one process, with dropout off: the same adapter. In-Squeeze
on two processes: identical replicas before and after every resize (digests gathered from both processes),
the same adapter as one process. AdaLoRA on two processes. A two-process ``lsq train`` killed after a
checkpoint resumes; ``kill -9`` leaves no process behind. Bad input: one line, exit 2, nothing trained.
"""

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

from lsq.cli import main
from lsq.checkpoints import COMPLETE_MARK
from lsq.train import SUMMARY_NAME, train
from lsq.train_config import TrainConfig
from tests.lsq.tiny import built_once, cls_config, cls_csv, save_tiny_bert  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.slow]


@pytest.fixture
def bert_no_dropout(tmp_path_factory) -> Path:
    """The tiny BERT with dropout off: each process draws its own dropout masks, so only then can N
    processes give the same numbers as one."""
    return built_once(tmp_path_factory, "tiny-bert-no-dropout", lambda d: save_tiny_bert(d, dropout=0.0))


def run(raw: dict):
    logs: list = []
    cfg = TrainConfig.model_validate(raw)
    return train(cfg, log=lambda m, s: logs.append((s, dict(m)))), logs


def updates(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Each module's weight update ``B @ A`` (float64) and every other saved tensor (the classifier head):
    what the adapter computes, independent of how its factors are written."""
    w = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, value in w.items():
        if "lora_A" in key:
            out[key.replace(".lora_A", "")] = w[key.replace("lora_A", "lora_B")].double() @ value.double()
        elif "lora_B" not in key:
            out[key] = value.double()
    return out


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``||a - b|| / ||a||`` over the whole adapter."""
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).square().sum()) for k in a)
    den = sum(float(a[k].square().sum()) for k in a)
    return (num / den) ** 0.5


def losses(logs) -> dict[int, float]:
    return {s: m["loss"] for s, m in logs if "loss" in m}


def test_two_processes_give_the_adapter_of_one(bert_no_dropout, cls_csv, tmp_path):
    """Same global batch (16 = 2 x 8): the same data each step, gradients averaged by DDP, the same adapter."""
    one, logs1 = run(cls_config(bert_no_dropout, cls_csv, tmp_path / "p1", train__steps=8))
    two, logs2 = run(cls_config(bert_no_dropout, cls_csv, tmp_path / "p2", train__steps=8, train__processes=2))
    assert (one.processes, two.processes) == (1, 2)
    summary = json.loads((tmp_path / "p2" / SUMMARY_NAME).read_text())
    assert summary["processes"] == 2 and summary["steps"] == 8
    # rank 0's logs reach the launching process's callback, step by step
    assert sorted(losses(logs2)) == list(range(1, 9))
    for step, loss in losses(logs1).items():
        assert losses(logs2)[step] == pytest.approx(loss, rel=1e-5)
    a, b = load_file(str(one.adapter_dir / "adapter_model.safetensors")), load_file(str(two.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert float((a[key] - b[key]).norm() / a[key].norm()) < 1e-5, key
    # the run and its checkpoints live where one process puts them; the launch folder holds torchrun's log
    assert (tmp_path / "p2" / ".launch" / "torchrun.log").is_file()


def test_insqueeze_on_two_processes(bert_no_dropout, cls_csv, tmp_path):
    """Before every resize both processes hold the same factors and Adam moments (DDP averaged the gradients
    through the rebuilt wrapper), and after it too; the adapter is the one a single process trains."""
    # 16 -> 8 after step 3, 8 -> 4 after step 6. Seed 1: with seed 0 a plain rank-16 LoRA run (no resize) already
    # differs by 2.5e-5 between 1 and 2 processes (Adam magnifies the all-reduce's rounding in one coordinate of
    # that trajectory); with seed 1 both plain and In-Squeeze runs agree to 1e-6.
    changes = dict(method="in", train__steps=9, train__seed=1)
    one, _ = run(cls_config(bert_no_dropout, cls_csv, tmp_path / "p1", **changes))
    two, logs = run(cls_config(bert_no_dropout, cls_csv, tmp_path / "p2", train__processes=2, **changes))
    assert [(e["step"], e["rank"]) for e in two.rank_events] == [(3, 8), (6, 4)]
    for event in two.rank_events:
        before, after = event["replica_digests_before"], event["replica_digests"]
        assert len(before) == len(after) == 2
        assert before[0] == before[1] and after[0] == after[1] and before[0] != after[0]
    # the second resize's "before" digest covers 3 steps taken through the DDP wrapper rebuilt at step 3:
    # without the rebuild the new factors' gradients would not be averaged and the replicas would differ
    assert [s for s, m in logs if "rank" in m] == [3, 6]
    assert relative_difference(updates(one.adapter_dir), updates(two.adapter_dir)) < 1e-5


def test_adalora_on_two_processes(bert_no_dropout, cls_csv, tmp_path):
    """AdaLoRA's budget update reads the gradients DDP averaged, on every process: the run ends with identical
    replicas (masks included), the adapter loads, and it keeps the budget one process keeps. (Which modules get
    the budget may differ from one process: importance scores that tie up to rounding decide it.)"""
    changes = dict(method="adalora", train__steps=20, adalora={"tinit": 0.1, "tfinal": 0.2, "delta_t": 2})
    one, logs1 = run(cls_config(bert_no_dropout, cls_csv, tmp_path / "p1", **changes))
    two, logs = run(cls_config(bert_no_dropout, cls_csv, tmp_path / "p2", train__processes=2, **changes))
    assert one.replica_digests == [] and len(two.replica_digests) == 2 and len(set(two.replica_digests)) == 1
    assert sorted(losses(logs)) == list(range(1, 21))

    def kept(adapter_dir):
        weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
        return {k: int((v != 0).sum()) for k, v in weights.items() if "lora_E" in k}

    assert kept(one.adapter_dir).keys() == kept(two.adapter_dir).keys()
    assert sum(kept(two.adapter_dir).values()) == sum(kept(one.adapter_dir).values())
    for step in range(1, 3):  # before the first budget update the two runs are the same run
        assert losses(logs)[step] == pytest.approx(losses(logs1)[step], rel=1e-5)


def lsq_train(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lsq", "train", "method=direct", "rank=4", f"model.name={model}", "model.device=cpu",
            f"data.source={data}", "data.max_length=16", "train.batch_size=16", "train.lr=5e-3",
            "train.warmup_steps=0", "train.logging_steps=1", f"output_dir={out}", *extra]


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split("\n")
    children: dict[int, list[int]] = {}
    for line in out:
        if line.strip():
            p, pp = map(int, line.split())
            children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
            if state != "Z":
                left.append(pid)
        except (ProcessLookupError, FileNotFoundError):
            pass
    return left


def test_kill_9_of_a_two_process_run_then_rerun(bert_no_dropout, cls_csv, tmp_path):
    """``kill -9`` of ``lsq train train.processes=2`` after a checkpoint: torchrun and both workers end with it;
    the same command again resumes from the checkpoint and finishes with the adapter an unbroken run gives."""
    out = tmp_path / "run"
    command = lsq_train(bert_no_dropout, cls_csv, out, "train.steps=30", "train.save_steps=4", "train.processes=2")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    family: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "checkpoint-8" / COMPLETE_MARK).is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint-8"
            family |= set(descendants(proc.pid))
            time.sleep(0.05)
        family |= set(descendants(proc.pid))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert len(family) >= 3  # torchrun and two workers
    deadline = time.monotonic() + 30
    while alive(sorted(family)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(sorted(family)) == []
    assert not (out / "adapter").exists()

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout)
    assert result["processes"] == 2 and result["steps"] == 30
    events = [json.loads(line) for line in (out / ".launch" / "events.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if "log" in e and "loss" in e["log"]]
    assert steps[0] > 8 and steps[-1] == 30  # resumed after the last whole checkpoint, not from step 1

    straight = subprocess.run(lsq_train(bert_no_dropout, cls_csv, tmp_path / "straight", "train.steps=30",
                                        "train.save_steps=4", "train.processes=2"), capture_output=True, text=True, timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert relative_difference(updates(out / "adapter"), updates(tmp_path / "straight" / "adapter")) < 1e-5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.processes=64"], "train.processes: 64 processes but only"),
        (["train.processes=2", "train.batch_size=15"], "train.batch_size 15 does not split into 2 equal parts"),
        (["model.quantization=4bit"], "model.quantization: 4bit (QLoRA) needs a CUDA device; this run is on cpu"),
        (["model.device=cuda", "train.processes=2"], "train.processes: 2 processes need 2 CUDA devices; this machine has 0"),
        (["train.processes=2", "train.fsdp=true"], "train.fsdp: FSDP shards over CUDA devices; this run is on cpu"),
        (["train.fsdp=true"], "train.fsdp: sharding needs train.processes of 2 or more"),
        (["method=in", "train.processes=2", "train.fsdp=true"], "train.fsdp: method in resizes or masks whole LoRA factors"),
    ],
)
def test_bad_input_is_refused_with_one_line(overrides, message, bert_no_dropout, cls_csv, tmp_path, capsys):
    out = tmp_path / "run"
    args = lsq_train(bert_no_dropout, cls_csv, out, *overrides)[3:]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsq: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_worker_error_comes_back_as_one_line(bert_no_dropout, tmp_path, capsys):
    """An error only the workers see (their data) reaches the launching command as the same one line."""
    data = tmp_path / "no-labels.csv"
    data.write_text("text,target\n" + "".join(f"good film {i},1\nbad film {i},0\n" for i in range(20)))
    args = lsq_train(bert_no_dropout, data, tmp_path / "run", "train.processes=2")[3:]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsq: error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_pipeline_training_step_on_two_processes(bert_no_dropout, cls_csv, tmp_path):
    """The pipeline's training step (lsq.steps.train_step, what every unit and task calls) with
    ``train.processes=2``: the workers read the same data the step was given, the variant records 2 processes'
    adapter, and the curves reach the step's log."""
    from lsq.data import fingerprint, load_data
    from lsq.steps import code_version, train_step

    cfg = TrainConfig.model_validate(cls_config(bert_no_dropout, cls_csv, tmp_path / "unused", method="source",
                                                train__steps=4, train__processes=2))
    data = load_data(cfg.data)
    logs: list = []
    variant = train_step(cfg, fingerprint(data), code_version(), data=data, log=lambda m, s: logs.append(s))
    assert variant.method == "source" and variant.rank == 16 and variant.steps == 4
    assert json.loads((Path(variant.adapter_dir).parent / SUMMARY_NAME).read_text())["processes"] == 2
    assert sorted(set(logs)) == [1, 2, 3, 4]
