"""benchmarks.sft_step measures the same training on both sides: lsq's step and the plain PEFT + Trainer script,
run here in this process on the tiny chat Llama, give the same loss at every step."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.sft_step import StepClock, plan, run_lsq, run_plain, write_data
from tests.lsq.tiny import built_once, save_chat_llama

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_both_sides_train_the_same_thing(tmp_path, tmp_path_factory):
    model = built_once(tmp_path_factory, "tiny-llama-chatml", save_chat_llama)
    args = argparse.Namespace(model=str(model), rank=8, batch=4, lr=5e-3, seed=0, steps=3, warmup=1, max_length=64,
                              device="cpu")
    spec = plan(args, write_data(tmp_path / "data", rows=24))
    assert spec["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    results = {}
    for side, run in (("lsq", run_lsq), ("plain", run_plain)):
        clock = StepClock(spec["warmup"], spec["steps"])
        run({**spec, "out": str(tmp_path / side)}, clock)
        results[side] = clock.result()
        assert len(results[side]["step_s"]) == 2 and all(t > 0 for t in results[side]["step_s"])
    lsq, plain = results["lsq"]["losses"], results["plain"]["losses"]
    # step 1: the same batch through the same base model (B = 0); later steps: the same LoRA init, AdamW, clipping
    assert len(lsq) == len(plain) == 3 and lsq == pytest.approx(plain, rel=1e-5)
    assert lsq[0] != lsq[1]  # the adapter trains
