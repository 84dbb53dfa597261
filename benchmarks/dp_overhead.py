"""Data-parallel overhead on CPU: 2 processes x 1 thread against 1 process x 2 threads, same global batch.

    python -m benchmarks.dp_overhead [--steps 40] [--batch 32]

Both arms train MiniLM on the built-in movie sentences with the same config (global batch, steps, seed);
only the split of the two cores differs: one process with 2 torch threads, or ``train.processes=2`` (torchrun,
gloo) with 1 thread each. Each arm runs LoRA at rank 64 and In-Squeeze 64 -> 8 (whose resizes resync the
replicas and rebuild the DDP wrapper). Prints the training loop's seconds per step (rank 0's, from the
summary), the whole command's wall time (start-up of torchrun and of the workers included) and the ratios.
On GPUs the same code runs NCCL with one device per process; this measures the cost of the machinery.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _run(method: str, processes: int, steps: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "2" if processes == 1 else "1"}
        cmd = [sys.executable, "-m", "lsq", "train", "configs/quick.yaml", f"method={method}", "rank=8",
               "source_rank=64", f"train.steps={steps}", f"train.batch_size={batch}", f"train.processes={processes}",
               "train.save_steps=100000", "train.logging_steps=1000", "data.max_length=32", "data.max_train=2000",
               f"output_dir={out}", "resume=false"]
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout)
    return {"step_s": result["train_seconds"] / result["steps"], "wall_s": wall, "processes": result["processes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    command = f"python -m benchmarks.dp_overhead --steps {args.steps} --batch {args.batch}"
    print(f"# {command}   (global batch {args.batch}, {args.steps} steps, MiniLM, movie sentences)")
    print(f"{'method':<10} {'arm':<22} {'s/step':>8} {'wall s':>8}")
    for method in ("source", "in"):
        one = _run(method, 1, args.steps, args.batch)
        two = _run(method, 2, args.steps, args.batch)
        assert two["processes"] == 2
        print(f"{method:<10} {'1 process x 2 threads':<22} {one['step_s']:>8.3f} {one['wall_s']:>8.1f}")
        print(f"{method:<10} {'2 processes x 1 thread':<22} {two['step_s']:>8.3f} {two['wall_s']:>8.1f}")
        print(f"{method:<10} {'ratio (2p / 1p)':<22} {two['step_s'] / one['step_s']:>8.2f} {two['wall_s'] / one['wall_s']:>8.2f}")


if __name__ == "__main__":
    main()
