"""lsq.train_config: defaults, derived In-Squeeze stages, overrides, the JSON schema, and bad configs that
are refused with one ``LsqError`` naming the key and the value, through the library and through ``lsq train``
(exit status 2, one ``lsq: error:`` line, nothing created in output_dir). No training runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lsq.cli import main
from lsq.errors import LsqError
from lsq.config_files import apply_overrides
from lsq.train_config import TrainConfig, load_train_config

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "configs" / "quick.yaml"


@pytest.fixture
def preset(tmp_path) -> Path:
    """A valid YAML preset on a local csv (the csv is never read: every case here fails on the config)."""
    path = tmp_path / "preset.yaml"
    raw = {"method": "in", "rank": 4, "source_rank": 16, "data": {"source": str(tmp_path / "train.csv")},
           "train": {"steps": 12}, "output_dir": str(tmp_path / "out")}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_are_valid_and_frozen():
    cfg = TrainConfig()
    assert (cfg.method, cfg.model.name, cfg.data.source) == ("source", "builtin:minilm", "builtin:movie")
    with pytest.raises(Exception):
        cfg.rank = 3  # frozen


@pytest.mark.parametrize(
    "source_rank, rank, steps, ranks, stage_steps",
    [
        (64, 8, 200, [64, 32, 16, 8], [50, 50, 50, 50]),
        (16, 4, 10, [16, 8, 4], [4, 3, 3]),
        (16, 3, 7, [16, 8, 4, 3], [2, 2, 2, 1]),
        (5, 4, 3, [5, 4], [2, 1]),
    ],
)
def test_default_stages_halve_and_split_the_budget(source_rank, rank, steps, ranks, stage_steps):
    cfg = TrainConfig(method="in", rank=rank, source_rank=source_rank, train={"steps": steps})
    assert cfg.stage_ranks == ranks
    assert cfg.stage_steps == stage_steps
    assert sum(cfg.stage_steps) == steps


def test_explicit_schedule_and_initial_rank():
    cfg = TrainConfig(method="in", rank=2, source_rank=12, train={"steps": 9},
                      insqueeze={"schedule": [12, 6, 2], "stage_steps": [5, 3, 1]})
    assert (cfg.stage_ranks, cfg.stage_steps, cfg.initial_rank) == ([12, 6, 2], [5, 3, 1], 12)
    assert TrainConfig(method="direct", rank=3).initial_rank == 3
    assert TrainConfig(method="source", source_rank=32).initial_rank == 32


def test_overrides_nest_parse_yaml_and_leave_the_input_alone():
    raw = {"train": {"steps": 5, "lr": 0.1}, "method": "source"}
    out = apply_overrides(raw, ["train.steps=40", "train.scheduler=cosine", "insqueeze.schedule=[16, 8, 4]",
                                "lora.use_rslora=true", "data.source=a=b.csv"])
    assert out["train"] == {"steps": 40, "lr": 0.1, "scheduler": "cosine"}
    assert out["insqueeze"] == {"schedule": [16, 8, 4]}
    assert out["lora"]["use_rslora"] is True
    assert out["data"]["source"] == "a=b.csv"  # only the first '=' splits
    assert raw == {"train": {"steps": 5, "lr": 0.1}, "method": "source"}


def test_quick_preset_with_overrides():
    cfg = load_train_config(QUICK, ["method=in", "rank=4", "train.steps=40", "data.max_train=64"])
    assert (cfg.method, cfg.rank, cfg.source_rank, cfg.train.steps) == ("in", 4, 16, 40)
    assert (cfg.data.max_train, cfg.data.max_eval, cfg.train.batch_size) == (64, 256, 16)  # the rest from the file
    assert cfg.stage_ranks == [16, 8, 4]


def test_schema_is_printed_as_json(capsys):
    assert main(["train", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"method", "rank", "source_rank", "train", "insqueeze", "output_dir"} <= set(schema["properties"])
    assert schema["properties"]["method"]["enum"] == ["direct", "source", "cont", "in", "adalora"]
    assert schema["additionalProperties"] is False
    optim = schema["$defs"]["OptimSettings"]["properties"]
    assert all(field.get("description") for field in optim.values())


# (overrides, words the one-line message must hold: the key and the bad value)
BAD = {
    "schedule not decreasing": (["insqueeze.schedule=[16, 16, 4]"], ["insqueeze.schedule", "[16, 16, 4]", "decrease"]),
    "schedule increasing": (["insqueeze.schedule=[16, 4, 8]", "rank=8"], ["insqueeze.schedule", "[16, 4, 8]"]),
    "schedule misses source rank": (["insqueeze.schedule=[8, 4]"], ["insqueeze.schedule", "[8, 4]", "source_rank 16"]),
    "target rank not below source (in)": (["rank=16"], ["rank", "16", "source_rank"]),
    "target rank above source (adalora)": (["method=adalora", "rank=32"], ["rank", "32", "source_rank 16"]),
    "stage steps not summing": (["insqueeze.stage_steps=[4, 4, 3]"],
                                ["insqueeze.stage_steps", "[4, 4, 3]", "train.steps 12"]),
    "too few steps for the stages": (["train.steps=2"], ["insqueeze.stage_steps", "[1, 1, 0]", "train.steps 2"]),
    "data task disagrees": (["data.task=causal_lm"], ["data.task", "causal_lm", "model.task", "classification"]),
    "unknown top-level key": (["trian.steps=3"], ["trian", "Extra inputs"]),
    "unknown nested key": (["train.stpes=3"], ["train.stpes", "Extra inputs", "3"]),
    "bad integer": (["train.steps=abc"], ["train.steps", "'abc'"]),
    "bad float": (["train.lr=fast"], ["train.lr", "'fast'"]),
    "negative lr": (["train.lr=-1"], ["train.lr", "-1"]),
    "unknown method": (["method=squeeze"], ["method", "'squeeze'"]),
    "unknown optimizer state": (["insqueeze.optimizer_state=keep"], ["insqueeze.optimizer_state", "'keep'"]),
    "cont without adapter": (["method=cont"], ["cont.adapter"]),
    "adalora without budgeting phase": (["method=adalora", "adalora.tinit=0.5", "adalora.tfinal=0.5"],
                                        ["adalora.tinit", "0.5", "train.steps 12"]),
    "override without =": (["train.steps"], ["train.steps", "key=value"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_names_key_and_value(case, preset):
    overrides, words = BAD[case]
    with pytest.raises(LsqError) as info:
        load_train_config(preset, overrides)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_unknown_key_in_the_yaml_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("method: source\ntrain:\n  steps: 3\n  learning_rate: 0.1\n")
    with pytest.raises(LsqError, match=r"train\.learning_rate: Extra inputs are not permitted \(got 0\.1\)"):
        load_train_config(path)


@pytest.mark.parametrize(
    "text, words",
    [(None, ["missing.yaml", "not found"]), ("method: [unclosed\n", ["not valid YAML"]), ("- a\n- b\n", ["mapping"])],
)
def test_unreadable_config_file(tmp_path, text, words):
    path = tmp_path / "missing.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(LsqError) as info:
        load_train_config(path)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("case", ["bad integer", "stage steps not summing", "unknown nested key",
                                  "data task disagrees"])
def test_cli_refuses_with_one_line_and_creates_nothing(case, preset, tmp_path, capsys):
    overrides, words = BAD[case]
    assert main(["train", str(preset), *overrides]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lsq: error: "), captured.err
    assert all(w in lines[0] for w in words), lines[0]
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_cli_override_in_the_config_slot(tmp_path, capsys):
    """``lsq train key=value`` (no file) reads the overrides; a bad one is refused."""
    assert main(["train", "train.steps=0", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsq: error: train.steps:") and "(got 0)" in err
    assert not (tmp_path / "out").exists()
