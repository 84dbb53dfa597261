"""What each ``lsq`` subcommand does, once :mod:`lsq.cli` has parsed its arguments: train, evaluate (lsq's scores
or lm-evaluation-harness), squeeze, inspect, and the printing of their results.

The heavy modules (torch, transformers, the engine) are imported inside each command, after parsing, so that
``lsq --help`` and a bad argument answer at once; that, not an import circle, is why they are not at the top.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys

from lsq.errors import LsqError, one_line

# The console script (``run``) is a short-lived process: importing torch & co. creates about a
# million Python objects, and the collector's passes over them during the imports and again at
# interpreter exit cost about 0.6 s of every call. ``run`` switches the collector off for the imports;
# each command then freezes what was imported (never scanned again, exit included) and switches it
# back on. ``main`` called from Python (tests, notebooks) leaves the collector alone.
CONSOLE = False  # set by lsq.cli.run


def imports_done() -> None:
    """Called by each command once its heavy imports are done (see :data:`CONSOLE`)."""
    if CONSOLE:
        gc.freeze()
        gc.enable()



def _config_and_overrides(args: argparse.Namespace):
    """A positional ``key=value`` in the config slot is an override, not a file."""
    from lsq.config_files import config_and_overrides
    from lsq.train_config import load_train_config

    return load_train_config(*config_and_overrides(args.config, args.overrides))


def run_train(args: argparse.Namespace) -> int:
    if args.schema:
        from lsq.train_config import TrainConfig

        print(json.dumps(TrainConfig.model_json_schema(), indent=2))
        return 0
    cfg = _config_and_overrides(args)
    if args.settings:
        from lsq.config_files import settings_lines

        print("\n".join(settings_lines(cfg)))
        return 0
    from lsq.evaluate import evaluate_adapter
    from lsq.train import SUMMARY_NAME, train
    from lsq.workdir import atomic_write

    imports_done()
    _log_to_stderr()  # In-Squeeze's resize lines
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout stays pure JSON
        result = train(cfg)
        # the run ends with its score on the validation split (the test split stays unseen)
        validation = evaluate_adapter(result.adapter_dir, cfg.model, cfg.data, split="validation",
                                      batch_size=cfg.train.eval_batch_size)
    validation = {"data": str(cfg.data.source), **validation}
    summary = result.adapter_dir.parent / SUMMARY_NAME
    if summary.is_file():
        atomic_write(summary, (json.dumps({**json.loads(summary.read_text()), "validation": validation}, indent=1)
                               + "\n").encode())
    print(json.dumps({**result.to_json(), "validation": validation}, indent=1))
    print("validation: " + _metrics_line(validation), file=sys.stderr)
    return 0


def _log_to_stderr() -> None:
    """The ``lsq`` logger's info lines (e.g. In-Squeeze resizes) on stderr, once."""
    import logging

    logger = logging.getLogger("lsq")
    if not any(getattr(h, "_lsq_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._lsq_cli = True
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _metrics_line(metrics) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _names_data(args: argparse.Namespace) -> bool:
    """True when the command line names the data: ``data.source=`` or a config file with ``data.source``."""
    from lsq.config_files import config_and_overrides, read_yaml_mapping

    config, overrides = config_and_overrides(args.config, args.overrides)
    if any(o.split("=", 1)[0].strip() == "data.source" for o in overrides):
        return True
    data = read_yaml_mapping(config).get("data") if config is not None else None
    return isinstance(data, dict) and data.get("source") is not None


def run_evaluate(args: argparse.Namespace) -> int:

    cfg = _config_and_overrides(args)
    if args.harness is not None:
        return run_harness(args, cfg)
    if args.harness_include is not None or args.harness_limit is not None:
        raise LsqError("--harness-include and --harness-limit go with --harness")
    _require_data(args)
    from lsq.evaluate import evaluate_adapter

    imports_done()
    metrics = evaluate_adapter(args.adapter, cfg.model, cfg.data, split=args.split, batch_size=cfg.train.eval_batch_size)
    metrics = {"data": str(cfg.data.source), **metrics}
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        print(_metrics_line(metrics))
    return 0


def run_harness(args: argparse.Namespace, cfg) -> int:
    """``evaluate --harness``: named tasks from the include folder, or the data's split written as a task."""
    import tempfile
    from pathlib import Path

    from lsq.harness import harness_scores, require_lm_eval, scores_table, write_task

    require_lm_eval()
    if args.harness_include is not None and not Path(args.harness_include).is_dir():
        raise LsqError(f"--harness-include: no such folder {args.harness_include!r}")
    if not args.harness and args.harness_include is not None:
        raise LsqError("--harness-include: name the tasks to score from it after --harness")
    run = dict(limit=args.harness_limit, batch_size=cfg.train.eval_batch_size)
    imports_done()
    if args.harness:
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval's own prints; stdout keeps the scores alone
            scores = harness_scores(args.adapter, cfg.model, args.harness, args.harness_include, **run)
    else:
        _require_data(args)
        from lsq.models import load_tokenizer

        with tempfile.TemporaryDirectory(prefix="lsq-harness-") as folder, contextlib.redirect_stdout(sys.stderr):
            name = write_task(cfg.data, args.split, folder, f"lsq_{args.split}", tokenizer=load_tokenizer(cfg.model))
            scores = harness_scores(args.adapter, cfg.model, [name], folder, **run)
    print(json.dumps(scores, indent=1) if args.json else scores_table(scores))
    return 0


def _require_data(args: argparse.Namespace) -> None:

    if not _names_data(args):  # scoring on data the adapter never saw, without a word, is worse than refusing
        hint = ""
        from pathlib import Path

        summary = Path(args.adapter).parent / "train_summary.json"
        if summary.is_file():
            try:
                trained_on = json.loads(summary.read_text())["config"]["data"]["source"]
                hint = f"; {summary} says it was trained on data.source={trained_on}"
            except (ValueError, KeyError, TypeError):
                pass
        raise LsqError("evaluate: name the data to score on: a config with data.source, or data.source=... "
                       f"(nothing is assumed){hint}")


def _progress(desc: str):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="module", leave=False, disable=None, file=sys.stderr)


def run_squeeze(args: argparse.Namespace) -> int:

    if args.schema:
        from lsq.config import SqueezeConfig

        print(json.dumps(SqueezeConfig.model_json_schema(), indent=2))
        return 0
    if not args.src or not args.out:
        raise LsqError("squeeze needs SRC and --out")
    # the plot's child process imports matplotlib while this one imports torch (so: before any lsq
    # module that imports torch) and does the maths
    from lsq.plotting import PlotProcess

    with PlotProcess() if not args.no_plot else contextlib.nullcontext() as plotter:
        return _squeeze(args, plotter)


def _squeeze(args: argparse.Namespace, plotter) -> int:
    from pydantic import ValidationError

    import torch

    from lsq.api import squeeze_adapter
    from lsq.config import SqueezeConfig

    imports_done()
    try:
        config = SqueezeConfig(
            ranks=args.ranks, energy=args.energy, budget=args.budget, serving=args.serving,
            alpha_policy=args.alpha_policy, alpha=args.alpha, method=args.method, oversample=args.oversample,
            power_iters=args.power_iters, seed=args.seed, compute_dtype=args.compute_dtype,
            out_dtype=args.out_dtype, device=args.device,
        )
    except ValidationError as exc:
        raise LsqError(one_line(exc)) from None
    # many small decompositions: one module per core beats two cores on each (CPU only)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = torch.get_num_threads()
    workers = 1 if config.torch_device.type != "cpu" else max(1, min(threads, cores))
    torch.set_num_threads(1 if workers > 1 else threads)
    try:
        written = squeeze_adapter(args.src, args.out, config, force=args.force, plot=not args.no_plot,
                                  plotter=plotter, workers=workers, progress=_progress("squeeze"))
    finally:
        torch.set_num_threads(threads)  # main() may run inside a longer process (tests, notebooks)
    print_summary(written, as_json=args.json)
    return 0


def print_summary(written, as_json: bool = False) -> None:
    """What a squeeze made, one row per output (:func:`lsq.report.summary_table`; ``as_json``: a JSON
    list of the same rows, with every module count per rank and the parameter count)."""
    from lsq.adapter import WEIGHTS_NAME
    from lsq.api import REPORT_NAME
    from lsq.report import rank_summary, summary_table

    rows = []
    for name, out in written.items():
        totals = json.loads((out.folder / REPORT_NAME).read_text())["totals"]
        rows.append({"name": name, "ranks": rank_summary(totals["rank_counts"]), "rank_counts": totals["rank_counts"],
                     "lora_params": out.lora_params, "retained_energy": out.retained_energy,
                     "relative_error": out.relative_error, "adapter_bytes": (out.folder / WEIGHTS_NAME).stat().st_size,
                     "folder": str(out.folder)})
    print(json.dumps(rows, indent=1) if as_json else summary_table(rows))


def run_inspect(args: argparse.Namespace) -> int:
    from lsq.api import inspect_adapter

    imports_done()
    info = inspect_adapter(args.src, progress=_progress("inspect"))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    s = info["summary"]
    print(f"{s['source']}: {s['modules']} LoRA modules, source ranks {s['source_ranks']}, "
          f"{s['lora_params']:,} parameters, rsLoRA {s['use_rslora']}, DoRA {s['use_dora']}")
    print("energy  uniform rank (every module)  vllm rank")
    for key, v in s.items():
        if key.startswith("energy_"):
            print(f"{key[7:]:>6}  {v['uniform_rank']:>26}  {v['vllm_rank']}")
    print("per module (first 10; --json for all):")
    for row in info["modules"][:10]:
        print(f"  {row['module']}: r={row['source_rank']} sigma_1={row['sigma_1']:.4g} "
              f"effective_rank={row['effective_rank']:.1f} rank@0.95={row['energy_0.95']}")
    return 0
