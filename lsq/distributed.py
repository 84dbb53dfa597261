"""Data-parallel training: one adapter trained by N processes through torchrun.

``train.processes=N`` (N > 1) makes :func:`lsq.train.train` launch

    python -m torch.distributed.run --standalone --nproc-per-node N -m lsq.train_worker RUN_FOLDER

and wait. Every worker runs the same recipe with the ``Trainer``'s DistributedDataParallel (gloo on
CPU, NCCL on CUDA, one device per process). The global batch stays ``train.batch_size``: the data
loader is prepared with ``split_batches``, so at every step each process takes ``batch_size / N``
rows of the batch one process would have taken, and DDP averages the gradients. Rank 0 alone logs,
checkpoints, saves the adapter and writes the summary. It also writes its logs, whole checkpoints and
result as JSON lines to ``RUN_FOLDER/events.jsonl``, which the launching process forwards to its own
``log`` and ``on_checkpoint`` callbacks while it waits, so callers see no difference.

In-Squeeze resizes the LoRA factors in the middle of training (new ``nn.Parameter`` objects). After
every resize :meth:`Replicas.sync` broadcasts rank 0's new factors and projected Adam moments,
wraps the model in a new DDP over the new parameters (the old one's buckets and hooks point at the
discarded factors), and checks with an all-gather that every process holds the same bytes.

Process lifetime: the launcher asks the kernel to SIGTERM torchrun when it dies (torchrun then stops
its workers), and every worker asks for SIGKILL when torchrun dies, so ``kill -9`` of ``lsq train``
leaves nothing behind (``lsq.processes.die_with_parent_by``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lsq.errors import LsqError
from lsq.processes import die_with_parent_by
from lsq.records import TrainResult

EVENTS_NAME = "events.jsonl"
LAUNCH_FOLDER = ".launch"  # in output_dir: the worker config, the event stream, torchrun's own log
WORKER_ENV = "LSQ_DISTRIBUTED_RUN"  # set for the workers: the run folder


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process (``(0, 1)`` outside torchrun)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def in_worker() -> bool:
    """True inside a worker started by :func:`launch` (its recipe must not launch again)."""
    return WORKER_ENV in os.environ


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_processes(processes: int, batch_size: int, device_type: str, cuda_devices: int) -> None:
    """One-line LsqError when ``processes`` cannot run here: more than the devices, or a batch that does not split."""
    if device_type == "cuda" and processes > cuda_devices:
        raise LsqError(f"train.processes: {processes} processes need {processes} CUDA devices; this machine has {cuda_devices}")
    if device_type == "cpu" and processes > cpu_count():
        raise LsqError(f"train.processes: {processes} processes but only {cpu_count()} CPU cores here (use at most {cpu_count()})")
    if device_type not in ("cpu", "cuda"):
        raise LsqError(f"train.processes: data-parallel training runs on cpu or cuda, not {device_type}")
    if batch_size % processes:
        raise LsqError(
            f"train.processes: train.batch_size {batch_size} does not split into {processes} equal parts "
            f"(the global batch is kept; pick a batch size divisible by {processes})"
        )


def launch(cfg, log=None, on_checkpoint=None, threads: int | None = None):
    """Train ``cfg`` (a TrainConfig with ``train.processes > 1``) on N processes; the rank-0 TrainResult.

    ``log`` and ``on_checkpoint`` receive what rank 0 reports, as with one process. A worker's
    LsqError comes back as the same one-line LsqError; any other failure names torchrun's log.
    """

    n = cfg.train.processes
    run = Path(cfg.output_dir) / LAUNCH_FOLDER
    run.mkdir(parents=True, exist_ok=True)
    events = run / EVENTS_NAME
    events.unlink(missing_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")) + "\n")
    env = {**os.environ, WORKER_ENV: str(run)}
    env.setdefault("OMP_NUM_THREADS", str(threads or max(1, cpu_count() // n)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
        "--max-restarts=0", "-m", "lsq.train_worker", str(run),
    ]
    with open(run / "torchrun.log", "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent_by(signal.SIGTERM))
        reader = _EventReader(events)
        result = error = None
        try:
            while True:
                finished = proc.poll() is not None
                for event in reader.new():
                    if "log" in event and log is not None:
                        log(event["log"], event["step"])
                    elif "checkpoint" in event and on_checkpoint is not None:
                        _forward_checkpoint(on_checkpoint, Path(event["checkpoint"]))
                    elif "result" in event:
                        result = event["result"]
                    elif "error" in event:
                        error = event["error"]
                if finished:
                    break
                time.sleep(0.2)
        finally:
            if proc.poll() is None:  # our caller was interrupted (SIGTERM, Ctrl-C): stop the workers too
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if error is not None:
        raise LsqError(error)
    if proc.returncode != 0 or result is None:
        tail = _last_error_line(run / "torchrun.log")
        raise LsqError(f"data-parallel training failed (torchrun exit {proc.returncode}): {tail}; see {run / 'torchrun.log'}")
    return TrainResult.model_validate(result)


def _forward_checkpoint(on_checkpoint: Callable[[Path], None], folder: Path) -> None:
    """Rank 0 goes on training while we copy: a checkpoint rotated away meanwhile (a newer one is
    whole and on its way) is skipped; any other error is the caller's."""
    try:
        if folder.is_dir():
            on_checkpoint(folder)
    except FileNotFoundError:
        if folder.is_dir():
            raise


class _EventReader:
    """Whole JSON lines appended to a file since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(whole)
        return [json.loads(line) for line in whole.splitlines() if line.strip()]


def _last_error_line(path: Path) -> str:
    """The worker's exception line (``[rank0]: ValueError: ...``) in torchrun's log, else its last error line."""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    for line in lines:
        m = re.match(r"\[rank\d+\]: (\w+(Error|Exception)\b.*)", line)
        if m:
            return m[1][:300]
    for line in reversed(lines):
        if "Error" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


class Events:
    """Rank 0's side of the event stream (every other rank writes nothing)."""

    def __init__(self, run: Path):
        self.path = run / EVENTS_NAME
        self.enabled = world()[0] == 0

    def emit(self, *, every_rank: bool = False, **event: Any) -> None:
        if self.enabled or every_rank:
            with self.path.open("a") as f:
                f.write(json.dumps(event) + "\n")
                f.flush()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.emit(log=dict(metrics), step=step)

    def checkpoint(self, folder: Path) -> None:
        self.emit(checkpoint=str(folder))


def state_digest(model, optimizer) -> str:
    """sha256 of every trainable parameter's bytes and its optimizer state, in parameter order."""

    opt = getattr(optimizer, "optimizer", optimizer)
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for key, value in sorted(opt.state.get(p, {}).items()):
            if torch.is_tensor(value):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Replicas:
    """In-Squeeze under DDP: check that the processes agree, and resync them after a resize.

    ``trainer`` is a callable returning the Trainer (the callback exists before the Trainer does).
    """

    def __init__(self, trainer: Callable[[], Any]):
        self.trainer = trainer

    def check(self) -> list[str]:
        """Every process's digest of its trainable state and optimizer state; a RuntimeError if they differ."""

        trainer = self.trainer()
        digests: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(digests, state_digest(trainer.model, trainer.optimizer))
        if len(set(digests)) != 1:
            raise RuntimeError(f"data-parallel replicas differ at step {trainer.state.global_step}: {digests}")
        return digests

    def sync(self, changes) -> list[str]:
        """After a live resize: rank 0's new factors and Adam moments everywhere, a DDP wrapper over the
        new parameters (the old one's buckets and gradient hooks hold the discarded factors), then
        :meth:`check`."""

        trainer = self.trainer()
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        with torch.no_grad():
            for change in changes:
                for p in change.new_params:
                    dist.broadcast(p.data, src=0)
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in opt.state.get(p, {}):
                            dist.broadcast(opt.state[p][key], src=0)
        old = trainer.model_wrapped
        if isinstance(old, DDP):
            new = DDP(
                trainer.model, device_ids=old.device_ids, output_device=old.output_device,
                broadcast_buffers=old.broadcast_buffers, find_unused_parameters=old.find_unused_parameters,
                bucket_cap_mb=old.bucket_bytes_cap / 2**20, gradient_as_bucket_view=old.gradient_as_bucket_view,
                static_graph=old.static_graph, init_sync=False,  # the broadcast above synced what changed
            )
            models = trainer.accelerator._models
            models[:] = [new if m is old else m for m in models]
            trainer.model_wrapped = new
        return self.check()
