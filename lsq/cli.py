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
import gc
import signal
import sys
import threading
from collections.abc import Sequence

from lsq import commands
from lsq.errors import LsqError, one_line

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
    runners = {"squeeze": commands.run_squeeze, "inspect": commands.run_inspect, "train": commands.run_train,
               "evaluate": commands.run_evaluate}

    try:
        return runners[args.command](args)
    except (LsqError, OSError) as exc:  # OSError: disk full, no permission (WriteFailed), ...; one line
        if _SIGNALLED.is_set():  # the SIGTERM's Terminated was raised inside C code (torch, safetensors), which
            raise Terminated from exc  # turned it into its own error, caught above as bad input: it is a SIGTERM
        print("lsq: error: " + one_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lsq: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:
        if _SIGNALLED.is_set():  # as above: a SIGTERM that C code turned into its own exception
            raise Terminated from exc
        raise


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
    commands.CONSOLE = True
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
