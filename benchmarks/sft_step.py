"""lsq's SFT training step on a decoder against a plain PEFT + ``transformers.Trainer`` script, side by side.

    python -m benchmarks.sft_step                        # builtin:smollm2, r64, batch 8 x <=64 tokens, 12 steps x 2
    python -m benchmarks.sft_step --wait-quiet 120       # on a shared machine: each run waits for idle CPUs
    python -m benchmarks.sft_step --model DIR --steps 6 --repeats 1   # any local decoder with a chat template

What it does, in one run (a benchmark, not a test: it prints, it asserts nothing):

1. Writes a fixed SFT set (seeded two-digit additions, "What is 17 + 25?" -> "42") as a data folder
   (train/validation/test jsonl, so that lsq trains on exactly the rows the plain script reads, in order).
2. Runs the two sides, each in its own subprocess (so peak RSS is each one's own), interleaved
   (lsq, plain, lsq, plain, ...), the same number of steps:
   - lsq: ``lsq.train.train(TrainConfig(method="source", ...))``, the step lsq users get (its default LoRA
     targets, alpha = 2r, AdamW, linear schedule);
   - plain: ``AutoModelForCausalLM`` + ``peft.get_peft_model(LoraConfig(same r, alpha, targets, dropout 0))``
     + ``transformers.Trainer`` (same batch, AdamW, lr, schedule, clipping, seed and data order), each prompt a
     user turn in the tokenizer's chat template, loss on the reply only, right padding. It imports no lsq.
   Each side timestamps every step at the Trainer's per-step log (``logging_steps=1``, the same hook on both
   sides) and reports the step times after the warm-up, the losses, its own peak RSS
   (``getrusage(RUSAGE_SELF).ru_maxrss``) and the CPUs that other processes kept busy during its timed steps.
3. Prints a table: median s/step of each side over all timed steps of all repeats, the ratio lsq / plain
   (target <= 1.05), peak RSS of each, the losses (the same batch, LoRA init and optimizer on both sides: the
   same loss at every step, else the sides do not train the same thing), a flag when other processes used
   the CPUs during the timed steps, and the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"), ("HF_HUB_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

from benchmarks.squeeze_speed import Others  # noqa: E402

SIDES = ("lsq", "plain")
RATIO_TARGET = 1.05
OTHERS_LIMIT = 0.1  # CPUs other processes may keep busy before a run is flagged
LOSS_TOLERANCE = 1e-4  # the two sides train the same thing: the same loss at every step


def write_data(folder: Path, rows: int = 512, seed: int = 0) -> Path:
    """``folder/{train,validation,test}.jsonl`` of ``{prompt, answer}``: seeded two-digit additions."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", rows), ("validation", 8), ("test", 8)):
        with (folder / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                a, b = rng.randint(10, 99), rng.randint(10, 99)
                f.write(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    return folder


# ------------------------------------------------------------------------------------ in the child process
class StepClock:
    """Wall time of each optimizer step, from one per-step log to the next, and the CPUs other processes kept
    busy from the end of the warm-up to the last step (:class:`benchmarks.squeeze_speed.Others`)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.stamps: dict[int, float] = {}
        self.losses: dict[int, float] = {}
        self.others = Others()

    def log(self, metrics, step: int) -> None:
        if "loss" not in metrics:  # the Trainer's closing log (train_runtime, train_loss, ...)
            return
        self.stamps[step], self.losses[step] = time.perf_counter(), float(metrics["loss"])
        if step == self.warmup:
            self.others.__enter__()
        if step == self.steps:
            self.others.__exit__(None, None, None)

    def result(self) -> dict:
        timed = [self.stamps[k] - self.stamps[k - 1] for k in range(self.warmup + 1, self.steps + 1)]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # kB
        return {"step_s": timed, "losses": [self.losses[k] for k in sorted(self.losses)],
                "others_cpus": self.others.cpus, "peak_rss": rss}


def run_lsq(spec: dict, clock: StepClock) -> dict:
    from lsq.data import DataConfig
    from lsq.models import ModelConfig
    from lsq.train import train
    from lsq.train_config import LoraSettings, OptimSettings, TrainConfig

    cfg = TrainConfig(
        method="source", source_rank=spec["rank"],
        model=ModelConfig(name=spec["model"], task="causal_lm", device=spec["device"]),
        data=DataConfig(source=spec["data"], task="causal_lm", max_length=spec["max_length"]),
        lora=LoraSettings(alpha_ratio=spec["alpha"] / spec["rank"], dropout=0.0),
        train=OptimSettings(steps=spec["steps"], batch_size=spec["batch"], lr=spec["lr"], warmup_steps=0,
                            scheduler="linear", weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0,
                            logging_steps=1, save_steps=10**9, seed=spec["seed"]),
        output_dir=str(Path(spec["out"]) / "run"), resume=False,
    )
    train(cfg, log=clock.log)
    return {}


def run_plain(spec: dict, clock: StepClock) -> dict:
    """The usual PEFT SFT script: nothing of lsq."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    cuda = spec["device"].startswith("cuda")
    set_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"

    def encode(row):
        user = [{"role": "user", "content": row["prompt"]}]
        head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        whole = tok.apply_chat_template([*user, {"role": "assistant", "content": row["answer"]}], tokenize=False)
        prompt = tok(head, add_special_tokens=False)["input_ids"]
        reply = tok(whole[len(head):], add_special_tokens=False)["input_ids"]
        if len(prompt) + len(reply) > spec["max_length"]:
            raise SystemExit(f"an example of {len(prompt) + len(reply)} tokens, over --max-length {spec['max_length']}")
        return {"input_ids": prompt + reply, "attention_mask": [1] * (len(prompt) + len(reply)),
                "labels": [-100] * len(prompt) + reply}

    data = load_dataset("json", data_files=str(Path(spec["data"]) / "train.jsonl"))["train"]
    train_set = data.map(encode, remove_columns=data.column_names)
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.bfloat16 if cuda else torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=spec["rank"], lora_alpha=spec["alpha"],
                                             lora_dropout=0.0, target_modules=spec["targets"]))

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            clock.log(logs or {}, state.global_step)

    args = TrainingArguments(
        output_dir=str(Path(spec["out"]) / "run"), max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        learning_rate=spec["lr"], warmup_steps=0, lr_scheduler_type="linear", weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"],
        data_seed=spec["seed"], use_cpu=not cuda, bf16=cuda, remove_unused_columns=False, dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=train_set, data_collator=DataCollatorForSeq2Seq(tok, padding=True),
            callbacks=[Clock()]).train()
    lengths = [len(ids) for ids in train_set["input_ids"]]
    return {"tokens_mean": statistics.fmean(lengths), "tokens_max": max(lengths)}


def child(side: str, spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    clock = StepClock(spec["warmup"], spec["steps"])
    extra = (run_lsq if side == "lsq" else run_plain)(spec, clock)
    (Path(spec["out"]) / "result.json").write_text(json.dumps({**clock.result(), **extra}))


# ----------------------------------------------------------------------------------- in the parent process
def run_side(side: str, spec: dict, work: Path, wait_quiet: float) -> dict:
    """One side in a fresh subprocess; its result, with the wall time of the whole process."""
    out = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=work))
    spec_file = out / "spec.json"
    spec_file.write_text(json.dumps({**spec, "out": str(out)}))
    with (out / "log.txt").open("w") as log, Others(wait_quiet) as whole:
        done = subprocess.run([sys.executable, "-m", "benchmarks.sft_step", "--child", side, str(spec_file)],
                              stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise SystemExit(f"{side} run failed ({done.returncode}):\n{(out / 'log.txt').read_text()[-3000:]}")
    return {**json.loads((out / "result.json").read_text()), "wall_s": whole.wall}


def plan(args: argparse.Namespace, data: Path) -> dict:
    """What both sides run: lsq's model name and its folder, and lsq's default LoRA targets for it."""
    from lsq.models import DEFAULT_TARGETS, resolve_model_path

    path = resolve_model_path(args.model)  # builtin:smollm2 is installed into the cache on first use
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type", "")
    return {"model": args.model, "model_path": path, "data": str(data), "rank": args.rank, "alpha": 2 * args.rank,
            "targets": DEFAULT_TARGETS.get(model_type, "all-linear"), "batch": args.batch, "lr": args.lr,
            "seed": args.seed, "steps": args.steps, "warmup": args.warmup, "max_length": args.max_length,
            "device": args.device}


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def report(spec: dict, runs: dict[str, list[dict]], command: str) -> None:
    import torch

    median = {s: statistics.median(t for r in runs[s] for t in r["step_s"]) for s in SIDES}
    ratio = median["lsq"] / median["plain"]
    others = {s: max(r["others_cpus"] for r in runs[s]) for s in SIDES}
    rss = {s: max(r["peak_rss"] for r in runs[s]) for s in SIDES}
    plain = runs["plain"][0]
    drift = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(runs["lsq"][0]["losses"], plain["losses"]))
    targets = spec["targets"] if isinstance(spec["targets"], str) else ", ".join(spec["targets"])
    print(f"\n## lsq SFT step vs plain PEFT + Trainer: {spec['model']}, LoRA r{spec['rank']} (alpha {spec['alpha']}; "
          f"{targets}), batch {spec['batch']} x <= {spec['max_length']} tokens (mean {plain['tokens_mean']:.1f}, "
          f"max {plain['tokens_max']}), AdamW lr {spec['lr']:g}, {spec['steps']} steps ({spec['warmup']} warm-up "
          f"excluded) x {len(runs['lsq'])} runs per side, interleaved; {spec['device']}, {torch.get_num_threads()} "
          f"torch threads, {os.cpu_count()} CPUs\n")
    print("| side | s/step, median | per-run medians | peak RSS | step-1 loss | CPUs others kept busy, worst run |")
    print("|---|---:|---|---:|---:|---:|")
    for s in SIDES:
        per_run = ", ".join(f"{statistics.median(r['step_s']):.3f}" for r in runs[s])
        print(f"| {s} | {median[s]:.3f} | {per_run} | {mib(rss[s])} | "
              f"{runs[s][0]['losses'][0]:.4f} | {others[s]:.2f} |")
    worst = max(others.values())
    print("\n| metric | value | target | result |\n|---|---:|---:|---|")
    print(f"| s/step, lsq / plain | {ratio:.3f} | <= {RATIO_TARGET} | {'PASS' if ratio <= RATIO_TARGET else 'FAIL'} |")
    print(f"| peak RSS, lsq / plain | {rss['lsq'] / rss['plain']:.2f} | | |")
    print(f"| losses of every step, lsq against plain, largest relative difference (run 1) | {drift:.1e} | "
          f"< {LOSS_TOLERANCE:g} | {'PASS' if drift < LOSS_TOLERANCE else 'FAIL'} |")
    print(f"| CPUs other processes kept busy, worst timed run | {worst:.2f} | < {OTHERS_LIMIT} | "
          f"{'PASS' if worst < OTHERS_LIMIT else 'FAIL'} |")
    if worst >= OTHERS_LIMIT:
        print(f"\nWARNING: other processes kept up to {worst:.2f} of the {os.cpu_count()} CPUs busy during the timed "
              "steps: the step times and their ratio are not representative (rerun on an idle machine, or with "
              "--wait-quiet 120).")
    print(f"\ncommand: {command}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:smollm2", help="lsq model name: builtin:smollm2 or a decoder folder")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (alpha = 2 x rank, lsq's default ratio)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64, help="most tokens per example (the data stays below it)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, interleaved lsq, plain, lsq, plain, ...")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each run, wait up to S seconds for other processes to leave the CPUs idle")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (data, logs, results)")
    args = p.parse_args(argv)
    if not 1 <= args.warmup < args.steps - 1:
        p.error(f"--warmup {args.warmup} must leave at least 2 timed steps of --steps {args.steps}")
    command = shlex.join(["python", "-m", "benchmarks.sft_step", *argv])
    work = args.keep or Path(tempfile.mkdtemp(prefix="lsq-sft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    spec = plan(args, write_data(work / "data", seed=args.seed))
    print(f"model {spec['model_path']}; work dir {work}; load average {os.getloadavg()[0]:.1f}", flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    try:
        for repeat in range(args.repeats):
            for side in SIDES:
                r = run_side(side, spec, work, args.wait_quiet)
                runs[side].append(r)
                print(f"  {side} run {repeat + 1}: {statistics.median(r['step_s']):.3f} s/step (median of "
                      f"{len(r['step_s'])}), peak RSS {mib(r['peak_rss'])}, losses "
                      f"{' '.join(f'{x:.3f}' for x in r['losses'][:3])} ..., others kept {r['others_cpus']:.2f} CPUs "
                      f"busy, {r['wall_s']:.0f} s in all", flush=True)
    finally:
        if args.keep is None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    report(spec, runs, command)
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
