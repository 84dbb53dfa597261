"""In-Squeeze overhead: step time and peak memory against plain PEFT LoRA training, same steps.

    python -m benchmarks.insqueeze_overhead [--steps 60] [--source-rank 64] [--rank 8]

Runs, side by side in one invocation and each in a fresh subprocess (so peak RSS is its own):
plain LoRA at the source rank (what In-Squeeze starts from), In-Squeeze source -> rank with its
resize events, and plain LoRA at the target rank; all on MiniLM with the built-in movie sentences,
the same seed, batch and steps. Prints wall time per step (training loop only, resizes included)
and peak RSS, and the ratios. Target: In-Squeeze <= 1.03x the plain LoRA run at the source rank.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile


def _one(method: str, rank: int, source_rank: int, steps: int, out: str) -> dict:
    from lsq.train import train
    from lsq.train_config import load_train_config

    cfg = load_train_config("configs/quick.yaml", [
        f"method={method}", f"rank={rank}", f"source_rank={source_rank}", f"train.steps={steps}",
        "train.batch_size=32", "train.save_steps=100000", "train.logging_steps=1000", "data.max_length=32",
        "data.max_train=2000", f"output_dir={out}", "resume=false",
    ])
    result = train(cfg)
    return {"seconds": result.train_seconds, "steps": result.steps, "events": len(result.rank_events),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--source-rank", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(_one(args.child[0], int(args.child[1]), args.source_rank, args.steps, out)))
        return
    runs = {}
    for label, method, rank in (("lora@source", "source", args.rank), ("in-squeeze", "in", args.rank),
                                ("lora@target", "direct", args.rank)):
        cmd = [sys.executable, "-m", "benchmarks.insqueeze_overhead", "--steps", str(args.steps),
               "--source-rank", str(args.source_rank), "--child", method, str(rank)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
    base = runs["lora@source"]
    command = " ".join(["python -m benchmarks.insqueeze_overhead", *sys.argv[1:]])
    print(f"\n`{command}`  (MiniLM, batch 32 x 32 tokens, {args.steps} steps, source rank {args.source_rank} -> {args.rank})\n")
    print("| run | s/step | vs LoRA@source | peak RSS MB | vs LoRA@source | resizes |")
    print("|---|---|---|---|---|---|")
    for label, r in runs.items():
        per = r["seconds"] / r["steps"]
        print(f"| {label} | {per:.3f} | {per / (base['seconds'] / base['steps']):.3f}x | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:.3f}x | {r['events']} |")
    ratio = (runs["in-squeeze"]["seconds"] / runs["in-squeeze"]["steps"]) / (base["seconds"] / base["steps"])
    print(f"\nIn-Squeeze step time vs plain LoRA at the source rank: {ratio:.3f}x (target <= 1.03x): "
          f"{'PASS' if ratio <= 1.03 else 'FAIL'}")


if __name__ == "__main__":
    main()
