"""The command line of ``python -m flows.squeeze_pipeline``, answered before the flow's heavy imports.

That command runs flows/squeeze_pipeline.py as ``__main__``, and this module is its first import. Imported
so (and only so: :func:`running_as_command`), it does two things before the flow module imports prefect,
mlflow and transformers (about 6 s on 2 cores):

1. :func:`parse_command`: ``--help``, ``--settings``, ``--schema`` and bad input answer here and exit, with
   no server started and no Prefect imported; the config is parsed here, once, for the whole command;
2. :func:`preboot_server`: the temporary Prefect server (unless ``PREFECT_API_URL`` names one) starts
   now and boots on the other core while those imports run. Measured with
   benchmarks/orchestration_overhead.py: flow start 0.5 s this way, about 10 s after the imports.

The result is :data:`LAUNCHED`, which the command's ``if __name__ == "__main__"`` hands to
:func:`flows.squeeze_pipeline.main`. Imported any other way (tests, deployments, ``import
flows.squeeze_pipeline``) this module does nothing and imports nothing heavy.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from flows.server import TemporaryServer
    from lsq.pipeline_config import PipelineConfig

PROG = "squeeze_pipeline"
COMMAND_MODULE = "flows.squeeze_pipeline"  # python -m <this>

_EPILOG = """\
examples:
  python -m flows.squeeze_pipeline configs/demo.yaml                # what make demo runs (~5 min on 2 CPU cores)
  python -m flows.squeeze_pipeline configs/demo.yaml train.seed=1 target_ranks=[8,4]
  python -m flows.squeeze_pipeline configs/demo.yaml promotion.metric=macro_f1 promotion.tolerance=0.02
  python -m flows.squeeze_pipeline source_rank=32 baselines.direct=true   # the built-in defaults, overridden
  python -m flows.squeeze_pipeline configs/demo.yaml --settings     # every key with its value and meaning
  python -m flows.squeeze_pipeline --schema                         # the JSON schema of pipeline configs

overrides: key=value with dotted keys for nested settings; values are read as YAML (8, true, [8,4], null).

promotion.metric (chooses on the validation split as val_<metric>; test_<metric> is reported beside it):
  auto              the default: macro_f1 when the rarest class is under 30% of the training split, else
                    accuracy; causal LM: choice_accuracy when the data has choices, else exact_match
  accuracy, macro_f1                                      classification
  exact_match, choice_accuracy, answer_accuracy, loss     causal LM (exact_match: greedy generation, normalised;
                                                          choice_accuracy: data with choices; loss: lower is better)
promotion.servable_only=true promotes only adapters vLLM-style servers load as is (tag lsq.serving.vllm).

Without PREFECT_API_URL the run uses a temporary Prefect server of its own, gone when it ends."""


class Command(NamedTuple):
    """The command line, checked: the config file and overrides as given, and the config they make."""

    config: str | None
    overrides: list[str]
    cfg: PipelineConfig


class Launch(NamedTuple):
    """What the command has done before the flow module's imports: its command line, its server (if any)."""

    command: Command
    server: TemporaryServer | None


def command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.squeeze_pipeline", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train high, squeeze, recover, evaluate, register in MLflow, promote one: the pipeline as a "
                    "Prefect flow.")
    parser.add_argument("config", nargs="?", help="pipeline YAML (configs/demo.yaml); omitted: the built-in defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings that differ from the file")
    parser.add_argument("--settings", action="store_true",
                        help="print every setting (dotted key=value, then its meaning) of the config and exit")
    parser.add_argument("--schema", action="store_true", help="print the JSON schema of pipeline configs and exit")
    parser.error = lambda message: parser.exit(2, f"{PROG}: error: {message} (see --help)\n")  # one line
    return parser


def parse_command(argv: list[str]) -> Command:
    """The command line, checked before any server starts: ``--help``, ``--settings`` and ``--schema`` answer
    and exit 0; bad input (no such file, a malformed override, an unknown key, a bad value) prints one line
    ``squeeze_pipeline: error: ...`` and exits 2. Imports no Prefect."""
    parser = command_parser()
    args = parser.parse_args(argv)
    from lsq.config_files import config_and_overrides
    from lsq.errors import LsqError, one_line
    from lsq.pipeline_config import PipelineConfig, load_pipeline_config

    config, overrides = config_and_overrides(args.config, args.overrides)
    if args.schema:
        import json

        print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
        parser.exit(0)
    try:
        cfg = load_pipeline_config(config, overrides)
    except LsqError as exc:
        parser.exit(2, f"{PROG}: error: {one_line(exc)}\n")
    if args.settings:
        from lsq.config_files import settings_lines

        print("\n".join(settings_lines(cfg)))
        parser.exit(0)
    return Command(config, overrides, cfg)


def preboot_server() -> TemporaryServer | None:
    """Start the temporary Prefect server now, unless ``PREFECT_API_URL`` names one (then None): it boots
    while the flow module imports; :func:`flows.server.prefect_api` waits for it when the flow starts."""
    from flows import server

    return server.start_unless_configured()


def running_as_command() -> bool:
    """True while ``python -m flows.squeeze_pipeline`` (or ``runpy`` running it as ``__main__``) runs its module."""
    main: Any = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None) == COMMAND_MODULE and getattr(main, "__name__", None) == "__main__"


def launch(argv: list[str]) -> Launch:
    """The command's first steps, in order: its command line checked (:func:`parse_command`), then its server
    started (:func:`preboot_server`)."""
    command = parse_command(argv)
    return Launch(command, preboot_server())


# What importing this module does, and only as the first import of `python -m flows.squeeze_pipeline`.
LAUNCHED: Launch | None = launch(sys.argv[1:]) if running_as_command() else None
