"""Speed, memory and accuracy of ``lsq squeeze`` on a Llama-3-8B-shaped r=64 adapter, beside PEFT's path.

    python -m benchmarks.squeeze_speed            # full: 32 layers, 224 modules, ~5-8 min on 2 cores
    python -m benchmarks.squeeze_speed --quick    # 4 layers, one lsq run, accuracy on q/k only
    python -m benchmarks.squeeze_speed --wait-quiet 120   # on a shared machine: time only when idle

What it does, in one run (a benchmark, not a test: it prints, it asserts nothing):

1. Writes a PEFT LoRA adapter (r=64, lora_alpha=128, bf16) with Llama-3-8B's shapes straight to
   ``adapter_model.safetensors`` + ``adapter_config.json`` in a temporary folder; no model is built.
   Factors are seeded and shaped like trained ones: ``A ~ randn / sqrt(d_in)``, ``B = randn * c_j`` with
   column scales ``c_j`` decaying as ``exp(-j / 16)``, so the update spectrum decays.
2. Times ``lsq squeeze SRC --ranks 8 16 32 --out OUT`` as a subprocess (wall time with Python start-up,
   median of 3) and its peak RSS (``/usr/bin/time -v``), the same with ``--no-plot``, and with
   ``--no-plot`` under ``OMP_NUM_THREADS=1`` (for information). The three rounds are spread between the
   PEFT samples so that both sides see the same load when other work shares the machine.
3. Times PEFT's path (``peft.tuners.lora.conversion._convert_module_to_lora`` on CPU with bf16 factors:
   ``get_delta_weight`` forms ``s * B @ A`` in float32 and casts it back to bf16, then ``.float()`` and
   ``torch.linalg.svd(dW, full_matrices=False)``) on one module of each sampled kind, and scales to every
   module by kind (one PEFT call serves one rank, so the estimate is for one rank: conservative).
4. Accuracy on the sampled modules at ranks 8, 16, 32: lsq's truncated update (``factored_svd`` +
   ``truncate`` in float64) against the dense float64 and float32 truncated SVD (taken on the tall
   orientation, which LAPACK does several times faster; the PEFT timing keeps PEFT's orientation), and
   separately the bf16 factors lsq wrote (storage rounding, the same for any tool that writes bf16).
5. A stage profile of lsq (imports, read, maths, write, report, plot) and a markdown table with targets.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# Llama-3-8B: hidden 4096, intermediate 14336, 32 heads, 8 KV heads of 128 -> k/v out 1024.
KINDS = {  # kind: (submodule path, d_in, d_out)
    "q": ("self_attn.q_proj", 4096, 4096),
    "k": ("self_attn.k_proj", 4096, 1024),
    "v": ("self_attn.v_proj", 4096, 1024),
    "o": ("self_attn.o_proj", 4096, 4096),
    "gate": ("mlp.gate_proj", 4096, 14336),
    "up": ("mlp.up_proj", 4096, 14336),
    "down": ("mlp.down_proj", 14336, 4096),
}
RANK, ALPHA, TARGETS = 64, 128, (8, 16, 32)
SPEEDUP_TARGET, MEMORY_TARGET, ERROR_TARGET = 1000.0, 3.0, 1e-5
LSQ = str(Path(sys.executable).with_name("lsq"))


def write_llama_adapter(folder: Path, layers: int, seed: int = 0) -> Path:
    """A Llama-3-8B-shaped PEFT LoRA adapter folder (bf16 safetensors + adapter_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    decay = 2e-3 * torch.exp(-torch.arange(RANK, dtype=torch.float32) / 16)  # (r,) column scales of B
    weights = {}
    for i in range(layers):
        for path, d_in, d_out in KINDS.values():
            stem = f"base_model.model.model.layers.{i}.{path}"
            A = torch.randn(RANK, d_in, generator=gen) / math.sqrt(d_in)  # (r, d_in)
            B = torch.randn(d_out, RANK, generator=gen) * decay  # (d_out, r)
            weights[f"{stem}.lora_A.weight"] = A.to(torch.bfloat16)
            weights[f"{stem}.lora_B.weight"] = B.to(torch.bfloat16)
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B",
        "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        "target_modules": sorted(p.rsplit(".", 1)[1] for p, _, _ in KINDS.values()),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder / "adapter_model.safetensors"


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (Linux ``/proc/stat``), or None elsewhere."""
    try:
        with open("/proc/stat") as fh:
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fh.readline().split()[1:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class Others:
    """CPUs that other processes kept busy during a block: machine busy time minus this process's and its
    waited-for children's (so processes that start and end inside the block are counted too)."""

    def __init__(self, wait_quiet: float = 0.0):
        self.wait_quiet = wait_quiet  # seconds to wait, at most, for the others to go quiet first

    def __enter__(self) -> Others:
        deadline = time.monotonic() + self.wait_quiet
        while time.monotonic() < deadline and _busy_cpu_seconds() is not None:
            with Others() as probe:
                time.sleep(2)
            if probe.cpus < 0.1:
                break
        self.busy0, self.own0, self.t0 = _busy_cpu_seconds(), sum(os.times()[:4]), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        busy = _busy_cpu_seconds()
        own = sum(os.times()[:4]) - self.own0
        self.cpus = float("nan") if busy is None else max(0.0, busy - self.busy0 - own) / max(self.wall, 1e-9)


WAIT_QUIET = 0.0  # set by --wait-quiet
OTHERS: dict[str, list[float]] = {"lsq": [], "peft": []}  # CPUs used by other processes per measurement


@functools.cache
def _gnu_time() -> str | None:
    """Path of a GNU ``time`` that understands ``-v``, or None."""
    path = shutil.which("time") or "/usr/bin/time"
    if not Path(path).exists():
        return None
    probe = subprocess.run([path, "-v", "true"], capture_output=True, text=True)
    return path if "Maximum resident set size" in probe.stderr else None


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int | None]:
    """(wall seconds, peak RSS in bytes) of one command; raises if it fails.

    Peak RSS from GNU ``time -v``; without it, from polling the process with psutil every 20 ms; without
    psutil, ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the largest of all children so far: an upper bound).
    """
    env = {**os.environ, **(env or {})}
    time_bin = _gnu_time()
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([time_bin, "-v", *cmd] if time_bin else cmd, stdout=subprocess.DEVNULL, stderr=err,
                                env=env, text=True)
        peak = 0
        if time_bin is None:
            try:
                import psutil

                child = psutil.Process(proc.pid)
                while proc.poll() is None:
                    try:
                        peak = max(peak, child.memory_info().rss)
                    except psutil.Error:
                        pass
                    time.sleep(0.02)
            except ImportError:
                pass
        proc.wait()
        wall = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    if time_bin:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
        return wall, int(m.group(1)) * 1024 if m else None
    if not peak:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return wall, peak


VARIANTS = {  # label: (extra CLI flags, extra environment)
    "with plot": ([], {}),
    "--no-plot": (["--no-plot"], {}),
    "--no-plot, OMP_NUM_THREADS=1": (["--no-plot"], {"OMP_NUM_THREADS": "1"}),
}


def lsq_round(src: Path, work: Path, runs: dict[str, list[tuple[float, int]]]) -> None:
    """One ``lsq squeeze`` run of every variant (fresh OUT each); the first output is kept in ``work/out``."""
    for label, (extra, env) in VARIANTS.items():
        out = work / "out" if not (work / "out").exists() else work / "out-tmp"
        with Others(WAIT_QUIET) as others:
            wall, rss = run_timed([LSQ, "squeeze", str(src), "--ranks", *map(str, TARGETS), "--out", str(out), *extra], env)
        runs.setdefault(label, []).append((wall, rss or 0))
        OTHERS["lsq"].append(others.cpus)
        if out.name == "out-tmp":
            shutil.rmtree(out)
        print(f"  lsq squeeze ({label}): {wall:.2f} s, peak RSS {mib(rss or 0)}; other processes kept "
              f"{others.cpus:.2f} CPUs busy meanwhile", flush=True)


def import_times() -> dict[str, float]:
    """Wall seconds of a bare interpreter and of the imports lsq pays on every call (median of 3)."""
    snippets = {
        "python start-up": "pass",
        "import torch": "import torch",
        "import lsq.api (torch, pydantic, safetensors, lsq)": "import lsq.api",
        "import matplotlib.pyplot (plot only)": "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot",
    }
    out = {}
    for label, code in snippets.items():
        walls = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())
            walls.append(time.perf_counter() - t0)
        out[label] = statistics.median(walls)
    return out


def stage_profile(src: Path, work: Path) -> dict[str, float]:
    """In-process seconds of each stage of ``squeeze_adapter`` (imports already paid)."""
    from lsq.adapter import read_adapter, write_adapter
    from lsq.config import SqueezeConfig
    from lsq.report import adapter_report, plot_spectra
    from lsq.squeeze import squeeze_state_dict

    threads = torch.get_num_threads()  # as the CLI does: one module per core, one thread each
    t = {}
    t0 = time.perf_counter()
    config, lazy = read_adapter(src)
    weights = {k: lazy[k] for k in lazy}
    t["read (safetensors -> tensors)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    try:
        result = squeeze_state_dict(weights, config, SqueezeConfig(ranks=TARGETS), workers=threads)
    finally:
        torch.set_num_threads(threads)
    t[f"maths (squeeze_state_dict, float64, {threads} workers)"] = time.perf_counter() - t0
    out = work / "profile"
    t0 = time.perf_counter()
    for a in result.adapters:
        write_adapter(out / a.name, a.config, a.weights)
    t["write 3 adapters"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for a in result.adapters:
        (out / a.name / "squeeze_report.json").write_text(json.dumps(adapter_report(result, a, str(src), {}), indent=1))
    t["reports (json)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plot_spectra(result, out / "spectrum.png", {a.name: int(a.name[1:]) for a in result.adapters})
    t["plot in-process (incl. matplotlib import; the CLI draws it in a child started at launch)"] = time.perf_counter() - t0
    shutil.rmtree(out)
    return t


def peft_path(A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's per-module work on CPU with bf16 factors, timed: (seconds, U, S, Vh)."""
    t0 = time.perf_counter()
    dW = ((B.float() @ A.float()) * scale).to(A.dtype)  # get_delta_weight: fp32 on CPU, cast back
    dW = dW.float()  # _convert_module_to_lora: "SVD not implemented for half-precision types"
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return time.perf_counter() - t0, U, S, Vh


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x - ref) / torch.linalg.matrix_norm(ref))


def dense_truncated(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> torch.Tensor:
    return (U[:, :k].double() * S[:k].double()) @ Vh[:k].double()  # (d_out, d_in)


def dense_svd(dW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``dW``, taken on the tall orientation (LAPACK on CPU is several times slower on wide)."""
    if dW.shape[0] >= dW.shape[1]:
        return torch.linalg.svd(dW, full_matrices=False)
    U, S, Vh = torch.linalg.svd(dW.mT, full_matrices=False)
    return Vh.mT, S, U.mT


def sample_module(src: Path, out: Path, kind: str, accuracy: bool, errors: dict) -> float:
    """PEFT-path seconds of layer 0's ``kind`` module; relative errors go into ``errors[(kind, what, k)]``."""
    from lsq.linalg import factored_svd, truncate

    scale = ALPHA / RANK
    stem = f"base_model.model.model.layers.0.{KINDS[kind][0]}"
    with safe_open(str(src), framework="pt") as f:
        A, B = f.get_tensor(f"{stem}.lora_A.weight").clone(), f.get_tensor(f"{stem}.lora_B.weight").clone()  # bf16
    with Others(WAIT_QUIET) as others:
        seconds, *_ = peft_path(A, B, scale)
    OTHERS["peft"].append(others.cpus)
    print(f"  PEFT path, {kind:>4} {tuple(B.shape[:1] + A.shape[1:])}: {seconds:.1f} s; other processes kept "
          f"{others.cpus:.2f} CPUs busy meanwhile", flush=True)
    if accuracy:
        refs = {}
        refs["float64"] = dense_svd((B.double() @ A.double()) * scale)  # exact update of the stored bf16 factors
        refs["float32"] = dense_svd((B.float() @ A.float()) * scale)
        spec = factored_svd(A, B, scale)  # float64
        for k in TARGETS:
            a_k, b_k = truncate(spec, k, scale)  # keep-scale: s' = s
            lsq64 = scale * (b_k @ a_k)
            disk = out / f"r{k}"
            cfg = json.loads((disk / "adapter_config.json").read_text())
            with safe_open(str(disk / "adapter_model.safetensors"), framework="pt") as g:
                a16, b16 = g.get_tensor(f"{stem}.lora_A.weight"), g.get_tensor(f"{stem}.lora_B.weight")
            lsq16 = (cfg["lora_alpha"] / cfg["r"]) * (b16.double() @ a16.double())
            for name, (U, S, Vh) in refs.items():
                ref = dense_truncated(U, S, Vh, k)
                errors[(kind, f"lsq float64 maths vs dense {name}", k)] = rel(lsq64, ref)
                errors[(kind, f"lsq bf16 on disk vs dense {name}", k)] = rel(lsq16, ref)
            errors[(kind, "dense float32 vs dense float64", k)] = rel(
                dense_truncated(*refs["float32"], k), dense_truncated(*refs["float64"], k))
    return seconds


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 layers, one lsq run, accuracy on q and k only")
    p.add_argument("--layers", type=int, help="number of decoder layers (default 32; 4 with --quick)")
    p.add_argument("--repeats", type=int, help="lsq runs per variant, median reported (default 3; 1 with --quick)")
    p.add_argument("--samples", nargs="+", choices=list(KINDS), default=["q", "k", "o", "gate", "down"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, help="build the adapter and outputs here and keep them")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each timing, wait up to S seconds for other processes to leave the CPUs idle")
    args = p.parse_args(argv)
    global WAIT_QUIET
    WAIT_QUIET = args.wait_quiet
    layers = args.layers or (4 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    accuracy = {"q", "k"} if args.quick else set(args.samples)
    command = shlex.join([Path(sys.executable).name, "-m", "benchmarks.squeeze_speed", *(argv if argv is not None else sys.argv[1:])])
    t_start = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="lsq-bench-"))
    try:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}; work dir {work}", flush=True)
        src_file = write_llama_adapter(work / "src", layers, args.seed)
        size = src_file.stat().st_size
        n_modules = layers * len(KINDS)
        print(f"adapter: {n_modules} modules, r={RANK}, bf16, {mib(size)}", flush=True)
        # lsq rounds are spread between the PEFT samples, so both sides see the same load from other work
        runs: dict[str, list[tuple[float, int]]] = {}
        lsq_round(work / "src", work, runs)
        n = len(args.samples)
        after = [min(n, max(1, round(j * n / (repeats - 1)))) - 1 for j in range(1, repeats)]  # sample indices
        seconds, errors = {}, {}
        for i, kind in enumerate(args.samples):
            seconds[kind] = sample_module(src_file, work / "out", kind, kind in accuracy, errors)
            for _ in range(after.count(i)):
                lsq_round(work / "src", work, runs)
        imports = import_times()
        base_rss = run_timed([sys.executable, "-c", "import lsq.api"])[1] or 0
        stages = stage_profile(work / "src", work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    # PEFT estimate: a sampled kind costs its own time, any other what the sampled kind of its shape costs.
    by_shape = {KINDS[k][1:]: s for k, s in seconds.items()}
    per_kind = {k: seconds.get(k, by_shape.get(KINDS[k][1:])) for k in KINDS}
    missing = [k for k, s in per_kind.items() if s is None]
    peft_s = layers * sum(s for s in per_kind.values() if s is not None)
    wall, wall_np, wall_1t = (statistics.median(w for w, _ in runs[v]) for v in VARIANTS)
    fastest = {v: min(w for w, _ in runs[v]) for v in VARIANTS}
    rss, rss_np = (max(r for _, r in runs[v]) for v in list(VARIANTS)[:2])
    speedup, speedup_np = peft_s / wall, peft_s / wall_np
    err_maths = max((e for (_, what, _), e in errors.items() if what.startswith("lsq float64")), default=float("nan"))
    err_maths64 = max((e for (_, w, _), e in errors.items() if w == "lsq float64 maths vs dense float64"), default=float("nan"))
    err_disk = max((e for (_, what, _), e in errors.items() if what.startswith("lsq bf16")), default=float("nan"))

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    print("\n## Import and stage profile of lsq (seconds)\n")
    print("| stage | s |\n|---|---:|")
    for label, s in {**imports, **stages}.items():
        print(f"| {label} | {s:.2f} |")
    print("\n## Relative Frobenius error of the rank-k update (sampled modules, layer 0)\n")
    print("| module | comparison | " + " | ".join(f"r{k}" for k in TARGETS) + " |")
    print("|---|---|" + "---:|" * len(TARGETS))
    for kind, what in dict.fromkeys((k, w) for k, w, _ in errors):
        print(f"| {kind} | {what} | " + " | ".join(f"{errors[(kind, what, k)]:.1e}" for k in TARGETS) + " |")

    print(f"\n## lsq squeeze vs PEFT's dense path: Llama-3-8B-shaped LoRA, {n_modules} modules, r={RANK} -> "
          f"{', '.join(map(str, TARGETS))}\n")
    print("| metric | value | target | result |\n|---|---:|---:|---|")
    print(f"| adapter file (bf16 safetensors) | {mib(size)} | | |")
    for v, w in zip(VARIANTS, (wall, wall_np, wall_1t)):
        print(f"| lsq wall time, median of {repeats}, {v} | {w:.2f} s (fastest {fastest[v]:.2f} s) | | |")
    print(f"| lsq peak RSS (with plot) | {mib(rss)} | | |")
    print(f"| peak RSS / adapter file | {rss / size:.2f}x | < {MEMORY_TARGET:g}x | {verdict(rss / size < MEMORY_TARGET)} |")
    print(f"| peak RSS / adapter file, --no-plot | {rss_np / size:.2f}x | < {MEMORY_TARGET:g}x | "
          f"{verdict(rss_np / size < MEMORY_TARGET)} |")
    print(f"| (peak RSS - RSS of `import lsq.api`, {mib(base_rss)}) / adapter file, with plot | "
          f"{(rss - base_rss) / size:.2f}x | | |")
    print(f"| PEFT path estimate, one rank ({', '.join(f'{k} {s:.1f} s' for k, s in seconds.items())} "
          f"x {layers} layers by shape) | {peft_s:,.0f} s ({peft_s / 60:.1f} min) | | |")
    print(f"| PEFT path estimate, ranks {' '.join(map(str, TARGETS))} (one call per rank) | "
          f"{len(TARGETS) * peft_s / 60:.1f} min | | |")
    print(f"| speed-up vs one-rank PEFT (with plot) | {speedup:,.0f}x | >= {SPEEDUP_TARGET:g}x | "
          f"{verdict(speedup >= SPEEDUP_TARGET)} |")
    print(f"| speed-up vs one-rank PEFT, --no-plot | {speedup_np:,.0f}x | >= {SPEEDUP_TARGET:g}x | "
          f"{verdict(speedup_np >= SPEEDUP_TARGET)} |")
    print(f"| speed-up vs PEFT for the same {len(TARGETS)} outputs ({len(TARGETS)} calls), with plot (information) | "
          f"{len(TARGETS) * speedup:,.0f}x | | |")
    print(f"| max rel. error, lsq maths vs dense float64 SVD ({', '.join(sorted(accuracy))}) | {err_maths64:.1e} | "
          f"<= {ERROR_TARGET:g} | {verdict(err_maths64 <= ERROR_TARGET)} |")
    print(f"| max rel. error, lsq maths vs dense float64 or float32 SVD | {err_maths:.1e} | <= {ERROR_TARGET:g} | "
          f"{verdict(err_maths <= ERROR_TARGET)} |")
    print(f"| max rel. error, bf16 factors on disk (storage rounding, any bf16 writer) | {err_disk:.1e} | "
          "reported | |")
    lsq_busy, peft_busy = (max(OTHERS[k], default=float("nan")) for k in ("lsq", "peft"))
    print(f"| CPUs kept busy by other processes, worst lsq run / worst PEFT sample | {lsq_busy:.2f} / "
          f"{peft_busy:.2f} | < 0.1 | {verdict(max(lsq_busy, peft_busy) < 0.1)} |")
    if max(lsq_busy, peft_busy) >= 0.1:
        print(f"\nWARNING: other processes shared the {os.cpu_count()} CPUs during the timings; with OpenMP threads "
              "spinning, both sides slow down by factors of 2-10 and unevenly: the times and the speed-up are not "
              "representative (rerun on an idle machine, or with --wait-quiet 120).")
    if missing:
        print(f"\nnot sampled (left out of the PEFT estimate): {', '.join(missing)}")
    print(f"\ncommand: {command}   (lsq: {LSQ} squeeze SRC --ranks {' '.join(map(str, TARGETS))} --out OUT)")
    print(f"benchmark wall time: {time.perf_counter() - t_start:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work on the machine slows both sides)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
