"""The ``lsq`` command.

    lsq squeeze SRC --ranks 8 16 32 --out OUT     # OUT/r8, OUT/r16, OUT/r32: PEFT adapter folders
    lsq squeeze SRC --energy 0.95 --out OUT       # per-module ranks (rank_pattern)
    lsq squeeze SRC --budget 2000000 --serving vllm --out OUT
    lsq squeeze --schema                          # JSON schema of the squeeze settings
    lsq inspect SRC                               # spectrum summary, the rank each policy picks
    lsq train configs/quick.yaml method=in rank=4 # train one adapter (direct, source, cont, in, adalora)
    lsq evaluate ADAPTER configs/quick.yaml       # score an adapter folder on the test split

Bad input prints one line ``lsq: error: ...`` on stderr and exits with status 2; nothing is written. So
does a write that fails: ``lsq: error: cannot write PATH: No space left on device (errno 28); nothing was written``.
SIGTERM (timeout, docker, kubernetes) and Ctrl-C clean up what was half-written and exit 143 / 130.
Heavy imports (torch, pydantic) happen after argument parsing so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence

_SQUEEZE_HELP = """\
Squeeze a PEFT LoRA adapter to lower ranks: one exact decomposition per module serves every target,
and each target becomes a PEFT adapter folder OUT/<name> with squeeze_report.json and spectrum.png.
Ends with one summary line per output: ranks, retained energy, relative error, size, folder."""

_SQUEEZE_EXAMPLES = """\
examples:
  lsq squeeze SRC --ranks 8 16 32 --out OUT              # OUT/r8, OUT/r16, OUT/r32
  lsq squeeze SRC --energy 0.95 --out OUT                # per-module ranks (rank_pattern): OUT/energy0.95
  lsq squeeze SRC --budget 2000000 --out OUT             # a global LoRA parameter budget: OUT/budget2000000
  lsq squeeze SRC --energy 0.9 --serving vllm --out OUT  # snapped to one rank vLLM accepts
  lsq squeeze SRC --ranks 8 --out OUT --json             # the summary as JSON, for scripts
  lsq squeeze --schema                                   # JSON schema of the settings"""


def _squeeze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("squeeze", help="compress a LoRA adapter to lower ranks", description=_SQUEEZE_HELP,
                       epilog=_SQUEEZE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", help="output folder; one adapter folder per target inside it")
    p.add_argument("--ranks", type=int, nargs="+", default=[], metavar="K", help="uniform target ranks")
    p.add_argument("--energy", type=float, nargs="+", default=[], metavar="TAU", help="per-module energy thresholds")
    p.add_argument("--budget", type=int, nargs="+", default=[], metavar="PARAMS", help="global LoRA parameter budgets")
    p.add_argument("--serving", choices=["vllm"], help="snap to one rank the serving engine accepts")
    p.add_argument("--alpha-policy", choices=["keep-scale", "rank", "fixed"], default="keep-scale")
    p.add_argument("--alpha", type=float, help="lora_alpha for --alpha-policy fixed")
    p.add_argument("--method", choices=["exact", "rsvd"], default="exact")
    p.add_argument("--oversample", type=int, default=10, help="rsvd oversampling (default 10)")
    p.add_argument("--power-iters", type=int, default=2, help="rsvd power iterations (default 2)")
    p.add_argument("--seed", type=int, default=0, help="rsvd seed (default 0)")
    p.add_argument("--compute-dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--out-dtype", choices=["source", "float32", "float16", "bfloat16"], default="source")
    p.add_argument("--device", default="auto", help="torch device for the maths: auto (cuda when present, else cpu; "
                   "the default), cpu, cuda, cuda:1")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-plot", action="store_true", help="skip spectrum.png")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (one object per output)")
    p.add_argument("--schema", action="store_true", help="print the JSON schema of the settings and exit")


_TRAIN_HELP = """\
Train one adapter from a YAML preset and key=value overrides (dotted keys, values read as YAML).
Prints the result (adapter folder, ranks, steps, loss) as JSON on stdout; progress goes to stderr.

methods (method=...):
  direct   LoRA trained at rank: today's practice, the baseline
  source   LoRA trained at source_rank: the high-rank source that lsq squeeze compresses
  cont     Cont-Squeeze: continue a squeezed adapter (cont.adapter=FOLDER) for cont.steps at its rank
  in       In-Squeeze: start at source_rank, resize in place at each stage boundary down to rank
  adalora  PEFT's AdaLoRA from source_rank to an average of rank in the same steps (second baseline)"""

_TRAIN_EXAMPLES = """\
examples:
  lsq train configs/quick.yaml                            # the quick preset: a minute on 2 CPU cores
  lsq train configs/quick.yaml method=in rank=4           # In-Squeeze from source_rank down to 4
  lsq train configs/quick.yaml method=cont rank=8 cont.adapter=squeezed/r8
  lsq train method=direct rank=8 train.steps=100          # the built-in defaults, overridden
  lsq train configs/quick.yaml --settings                 # every key with its value and meaning
  lsq train --schema                                      # the same settings as a JSON schema"""

_EVALUATE_EXAMPLES = """\
examples:
  lsq evaluate squeezed/r8 configs/quick.yaml                  # scores and size on the test split
  lsq evaluate squeezed/r8 configs/quick.yaml --split validation --json
  lsq evaluate squeezed/r8 data.source=builtin:movie data.max_eval=200   # no config: name the data
  lsq evaluate out/r8 configs/sft-qwen2.5-0.5b.yaml --harness  # the test split, scored by lm-evaluation-harness
  lsq evaluate out/r8 configs/sft-qwen2.5-0.5b.yaml --harness-include my_tasks/ --harness my_task other

Without data.source (in the config or as key=value) it refuses: nothing is assumed. --harness needs the
extra lsq[eval] (lm-eval) and a causal LM; it takes task names up to the next option, so put it last."""


def _train_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one adapter (direct, source, cont, in, adalora)", description=_TRAIN_HELP,
                       epilog=_TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML preset (configs/); omitted: the built-in defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method=in train.steps=100")
    p.add_argument("--schema", action="store_true", help="print the JSON schema of the config and exit")
    p.add_argument("--settings", action="store_true",
                   help="print every setting (dotted key=value, then its meaning) of the config and exit")
    p = sub.add_parser("evaluate", help="score an adapter folder on a data split",
                       description="Score a PEFT adapter folder on a split of the data a config names: the task "
                       "metrics\n(accuracy, macro_f1; or loss, answer_accuracy, choice_accuracy) and the adapter's size.",
                       epilog=_EVALUATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="PEFT adapter folder")
    p.add_argument("config", nargs="?", help="YAML preset naming the model and data (as for train)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.max_eval=200")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--harness", nargs="*", metavar="TASK", help="score through lm-evaluation-harness instead: the "
                   "named tasks of --harness-include, or without names the data's split written as a task")
    p.add_argument("--harness-include", metavar="DIR", help="folder of the lm-eval task YAMLs that --harness names")
    p.add_argument("--harness-limit", type=int, metavar="N", help="score only the first N documents of each task")


def _config_and_overrides(args: argparse.Namespace):
    """A positional ``key=value`` in the config slot is an override, not a file."""
    from lsq.train_config import load_train_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    return load_train_config(config, overrides)


def _run_train(args: argparse.Namespace) -> int:
    if args.schema:
        from lsq.train_config import TrainConfig

        print(json.dumps(TrainConfig.model_json_schema(), indent=2))
        return 0
    cfg = _config_and_overrides(args)
    if args.settings:
        print("\n".join(settings_lines(cfg)))
        return 0
    from lsq.evaluate import evaluate_adapter
    from lsq.train import SUMMARY_NAME, train
    from lsq.workdir import atomic_write

    _imports_done()
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
    from lsq.train_config import read_yaml_mapping

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    if any(o.split("=", 1)[0].strip() == "data.source" for o in overrides):
        return True
    data = read_yaml_mapping(config).get("data") if config is not None else None
    return isinstance(data, dict) and data.get("source") is not None


def settings_lines(config) -> list[str]:
    """Every setting of the pydantic ``config`` (nested models flattened), one line each: the dotted
    ``key=value`` as an override would write it, then the field's description, in aligned columns."""
    import yaml

    rows = []

    def walk(model, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if hasattr(type(value), "model_fields"):  # a nested settings model
                walk(value, f"{prefix}{name}.")
                continue
            rows.append((f"{prefix}{name}={as_override(value)}", field.description or ""))

    def as_override(value) -> str:
        try:
            if isinstance(value, str) and yaml.safe_load(value) == value:
                return value  # reads back as itself: no quotes needed
        except yaml.YAMLError:
            pass
        return json.dumps(list(value) if isinstance(value, tuple) else value, default=str, separators=(",", ": "))

    walk(config, "")
    width = min(max(len(setting) for setting, _ in rows), 48)
    return [f"{setting:<{width}}  {meaning}".rstrip() for setting, meaning in rows]


def _run_evaluate(args: argparse.Namespace) -> int:
    from lsq.errors import LsqError

    cfg = _config_and_overrides(args)
    if args.harness is not None:
        return _run_harness(args, cfg)
    if args.harness_include is not None or args.harness_limit is not None:
        raise LsqError("--harness-include and --harness-limit go with --harness")
    _require_data(args)
    from lsq.evaluate import evaluate_adapter

    _imports_done()
    metrics = evaluate_adapter(args.adapter, cfg.model, cfg.data, split=args.split, batch_size=cfg.train.eval_batch_size)
    metrics = {"data": str(cfg.data.source), **metrics}
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        print(_metrics_line(metrics))
    return 0


def _run_harness(args: argparse.Namespace, cfg) -> int:
    """``evaluate --harness``: named tasks from the include folder, or the data's split written as a task."""
    import tempfile
    from pathlib import Path

    from lsq.errors import LsqError
    from lsq.harness import harness_scores, require_lm_eval, scores_table, write_task

    require_lm_eval()
    if args.harness_include is not None and not Path(args.harness_include).is_dir():
        raise LsqError(f"--harness-include: no such folder {args.harness_include!r}")
    if not args.harness and args.harness_include is not None:
        raise LsqError("--harness-include: name the tasks to score from it after --harness")
    run = dict(limit=args.harness_limit, batch_size=cfg.train.eval_batch_size)
    _imports_done()
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
    from lsq.errors import LsqError

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


def _run_squeeze(args: argparse.Namespace) -> int:
    from lsq.errors import LsqError

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
    from lsq.errors import LsqError

    _imports_done()
    try:
        config = SqueezeConfig(
            ranks=args.ranks, energy=args.energy, budget=args.budget, serving=args.serving,
            alpha_policy=args.alpha_policy, alpha=args.alpha, method=args.method, oversample=args.oversample,
            power_iters=args.power_iters, seed=args.seed, compute_dtype=args.compute_dtype,
            out_dtype=args.out_dtype, device=args.device,
        )
    except ValidationError as exc:
        raise LsqError(_one_line(exc)) from None
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


def _run_inspect(args: argparse.Namespace) -> int:
    from lsq.api import inspect_adapter

    _imports_done()
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


def _one_line(exc: Exception) -> str:
    """A pydantic ValidationError as one line naming the field and the problem."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for e in errors():
            loc = ".".join(str(x) for x in e.get("loc", ())) or "settings"
            parts.append(f"{loc}: {e.get('msg', '').removeprefix('Value error, ')}")
        return "; ".join(parts)
    return str(exc).splitlines()[0]


_INSPECT_EXAMPLES = """\
examples:
  lsq inspect path/to/adapter         # ranks, parameters, the rank each energy threshold picks
  lsq inspect path/to/adapter --json  # the same for every module, as JSON"""

_LSQ_EXAMPLES = """\
examples:
  lsq squeeze SRC --ranks 8 16 32 --out OUT   # squeeze an adapter to three ranks
  lsq inspect SRC                             # what each rank policy would pick
  lsq train configs/quick.yaml method=in      # train one adapter
  lsq evaluate OUT/r8 configs/quick.yaml      # score it
  lsq COMMAND --help                          # each command's options and examples"""


class _Version(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("lsq")
        except PackageNotFoundError:  # a source tree that was never installed
            found = "unknown (not installed)"
        print(f"lsq {found}")  # stdout, as argparse's own version action
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsq", description="LoRA-Squeeze: train high, squeeze, recover, register.",
                                     epilog=_LSQ_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version, help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    _squeeze_parser(sub)
    p = sub.add_parser("inspect", help="spectrum summary of an adapter and the rank each policy picks",
                       description="Spectrum summary of a PEFT LoRA adapter: source ranks, parameters, and the rank "
                       "each\nenergy threshold (uniform, and snapped for vLLM) would pick. Writes nothing.",
                       epilog=_INSPECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="PEFT adapter folder")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    _train_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runners = {"squeeze": _run_squeeze, "inspect": _run_inspect, "train": _run_train, "evaluate": _run_evaluate}
    from lsq.errors import LsqError

    try:
        return runners[args.command](args)
    except (LsqError, OSError) as exc:  # OSError: disk full, no permission (WriteFailed), ...; one line
        if _SIGNALLED.is_set():  # the SIGTERM's Terminated was raised inside C code (torch, safetensors), which
            raise Terminated from exc  # turned it into its own error, caught above as bad input: it is a SIGTERM
        print("lsq: error: " + " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lsq: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:
        if _SIGNALLED.is_set():  # as above: a SIGTERM that C code turned into its own exception
            raise Terminated from exc
        raise


# The console script (``run``) is a short-lived process: importing torch & co. creates about a
# million Python objects, and the collector's passes over them during the imports and again at
# interpreter exit cost about 0.6 s of every call. ``run`` switches the collector off for the imports;
# each command then freezes what was imported (never scanned again, exit included) and switches it
# back on. ``main`` called from Python (tests, notebooks) leaves the collector alone.
_CONSOLE = False


def _imports_done() -> None:
    if _CONSOLE:
        gc.freeze()
        gc.enable()


class Terminated(BaseException):
    """SIGTERM as an exception (see :func:`run`): ``with`` blocks and ``finally`` clean up on the way out.

    A BaseException, like KeyboardInterrupt, so no ``except Exception`` on the way swallows it.
    """


_SIGNALLED = threading.Event()  # set by the SIGTERM handler: a failure after it is the signal's, not bad input


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    _SIGNALLED.set()
    raise Terminated


def run() -> None:
    """The ``lsq`` console script: :func:`main` with the collector set up for a short-lived process,
    and SIGTERM turned into :class:`Terminated` so a killed command leaves no temporary folder (the
    default action would end the process on the spot). ``main`` called from Python installs nothing."""
    global _CONSOLE
    _CONSOLE = True
    gc.disable()
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        try:
            code = main()
        finally:  # done, clean-up included: a SIGTERM from now on would only break the exit (a traceback from
            # the interpreter's shutdown, or death by the signal once Python has restored its default action)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # runs a handler still pending: caught below
    except Terminated:
        print("lsq: terminated", file=sys.stderr)
        code = 128 + signal.SIGTERM
    finally:
        gc.freeze()  # whatever is left is freed by the OS at exit, not scanned by the collector
    sys.exit(code)


if __name__ == "__main__":
    run()
