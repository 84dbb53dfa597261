"""The ``lsq`` command on a PEFT-layout adapter: folder names, what it prints, and that the folders it
writes hold the dense best rank-k approximation of every module."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

from lsq.cli import main
from lsq.config import SqueezeConfig
from lsq.policies import SERVING_RANKS
from lsq.report import rank_summary
from tests.lsq.dense import best_rank_k, dense_update, rel_err
from tests.lsq.test_bad_input import MODULES, make_adapter


def run(capsys, *argv) -> tuple[str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out, captured.err


def printed(stdout: str) -> dict[str, Path]:
    """``lsq squeeze --json`` output -> {name: folder}."""
    return {row["name"]: Path(row["folder"]) for row in json.loads(stdout)}


def table(stdout: str) -> dict[str, list[str]]:
    """The summary table (cells apart by two spaces or more) -> {output: its other cells}."""
    header, *lines = (re.split(r" {2,}", line) for line in stdout.splitlines())
    assert header == ["output", "ranks", "retained energy", "relative error", "size (bytes)", "folder"], header
    return {name: rest for name, *rest in lines}


def source_updates(src: Path) -> dict[str, torch.Tensor]:
    """Dense float64 update of every module, from the source files (independent of lsq)."""
    config, weights = json.loads((src / "adapter_config.json").read_text()), load_file(src / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    p = "base_model.model."
    return {n: dense_update(weights[f"{p}{n}.lora_A.weight"], weights[f"{p}{n}.lora_B.weight"], scale) for n in MODULES}


def written_updates(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    config, weights = json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")
    updates, ranks = {}, {}
    for n in MODULES:
        key = next((k for k in config["rank_pattern"] if n.endswith(k)), None)
        r = config["rank_pattern"][key] if key else config["r"]
        key = next((k for k in config["alpha_pattern"] if n.endswith(k)), None)
        alpha = config["alpha_pattern"][key] if key else config["lora_alpha"]
        A, B = weights[f"base_model.model.{n}.lora_A.weight"], weights[f"base_model.model.{n}.lora_B.weight"]
        assert A.shape[0] == B.shape[1] == r
        updates[n], ranks[n] = dense_update(A, B, alpha / r), r
    return updates, ranks


@pytest.fixture
def src(tmp_path):
    return make_adapter(tmp_path / "src", r=16)


def test_ranks_write_one_folder_each_and_print_them(src, tmp_path, capsys):
    out = tmp_path / "out"
    stdout, _ = run(capsys, "squeeze", src, "--ranks", "2", "4", "--out", out)
    rows = table(stdout)
    assert list(rows) == ["r2", "r4"]
    for name, k in (("r2", 2), ("r4", 4)):
        report = json.loads((out / name / "squeeze_report.json").read_text())["totals"]
        ranks, energy, error, size, folder = rows[name]
        assert ranks == str(k) and Path(folder) == out / name
        assert float(energy) == pytest.approx(report["retained_energy"], abs=1e-4)
        assert float(error) == pytest.approx(report["relative_error"], abs=1e-4)
        assert int(size.replace(",", "")) == (out / name / "adapter_model.safetensors").stat().st_size
    assert sorted(p.name for p in out.iterdir()) == ["r2", "r4", "spectrum.png"]
    dense = source_updates(src)
    for name, k in (("r2", 2), ("r4", 4)):
        folder = out / name
        assert {"adapter_config.json", "adapter_model.safetensors", "squeeze_report.json", "spectrum.png"} <= {
            p.name for p in folder.iterdir()}
        updates, ranks = written_updates(folder)
        assert set(ranks.values()) == {k}
        for n, dW in dense.items():
            assert rel_err(updates[n], best_rank_k(dW, k)) < 1e-5, (name, n)


def test_energy_folder_and_per_module_ranks(src, tmp_path, capsys):
    out = tmp_path / "out"
    stdout, _ = run(capsys, "squeeze", src, "--energy", "0.9", "0.5", "--out", out, "--no-plot", "--json")
    assert printed(stdout) == {"energy0.9": out / "energy0.9", "energy0.5": out / "energy0.5"}
    for row in json.loads(stdout):  # per-module ranks: the summary gives the range and the count per rank
        _, ranks = written_updates(out / row["name"])
        assert row["rank_counts"] == {str(k): list(ranks.values()).count(k) for k in sorted(set(ranks.values()))}
        assert row["ranks"].startswith(f"{min(ranks.values())}") and row["lora_params"] > 0
    dense = source_updates(src)
    for tau in (0.9, 0.5):
        updates, ranks = written_updates(out / f"energy{tau:g}")
        for n, dW in dense.items():
            cum = torch.cumsum(torch.linalg.svdvals(dW) ** 2, 0)
            assert ranks[n] == int((cum / cum[-1] < tau).sum()) + 1, (tau, n)
            assert rel_err(updates[n], best_rank_k(dW, ranks[n])) < 1e-5


def test_budget_folder_fits_the_budget(src, tmp_path, capsys):
    out, budget = tmp_path / "out", 1000
    stdout, _ = run(capsys, "squeeze", src, "--budget", budget, "--out", out, "--no-plot", "--json")
    assert printed(stdout) == {f"budget{budget}": out / f"budget{budget}"}
    _, ranks = written_updates(out / f"budget{budget}")
    widths = {n: d_in + d_out for n, (d_in, d_out) in MODULES.items()}
    used = sum(ranks[n] * widths[n] for n in MODULES)
    assert used <= budget and used + min(widths.values()) > budget  # nothing more would fit
    report = json.loads((out / f"budget{budget}" / "squeeze_report.json").read_text())
    assert report["totals"]["lora_params"] == used


def test_serving_vllm_folder_names(src, tmp_path, capsys):
    out = tmp_path / "out"
    stdout, _ = run(capsys, "squeeze", src, "--ranks", "3", "--energy", "0.6", "--serving", "vllm", "--out", out,
                    "--no-plot", "--json")
    folders = printed(stdout)
    assert "r8-vllm" in folders and len(folders) == 2
    energy_name = next(n for n in folders if n.startswith("energy0.6-vllm-r"))
    for name, folder in folders.items():
        assert folder == out / name
        config = json.loads((folder / "adapter_config.json").read_text())
        _, ranks = written_updates(folder)
        assert set(ranks.values()) == {config["r"]} and config["r"] in SERVING_RANKS["vllm"]
        assert config["rank_pattern"] == {}
    assert energy_name == f"energy0.6-vllm-r{json.loads((folders[energy_name] / 'adapter_config.json').read_text())['r']}"


def test_schema_is_valid_json_schema(capsys):
    stdout, _ = run(capsys, "squeeze", "--schema")
    schema = json.loads(stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert {"ranks", "energy", "budget", "serving", "alpha_policy", "alpha", "method"} <= set(schema["properties"])
    assert all(field.get("description") for field in schema["properties"].values())
    jsonschema.validate(SqueezeConfig(ranks=(4,)).model_dump(mode="json"), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"ranks": [4], "alpha_policy": "halve"}, schema)


def test_inspect_text_and_json(src, capsys):
    text, _ = run(capsys, "inspect", src)
    assert f"{len(MODULES)} LoRA modules" in text and "source ranks [16]" in text
    info = json.loads(run(capsys, "inspect", src, "--json")[0])
    assert info["summary"]["modules"] == len(MODULES)
    assert info["summary"]["lora_params"] == sum(16 * (d_in + d_out) for d_in, d_out in MODULES.values())
    dense = source_updates(src)
    rows = {row["module"]: row for row in info["modules"]}
    assert set(rows) == set(dense)
    for n, dW in dense.items():
        S = torch.linalg.svdvals(dW)
        assert rows[n]["sigma_1"] == pytest.approx(float(S[0]), rel=1e-9)
        cum = torch.cumsum(S**2, 0) / (S**2).sum()
        assert rows[n]["energy_0.9"] == int((cum < 0.9).sum()) + 1
        assert rows[n]["module"] in text  # the text view lists every module (fewer than 10 here)
    assert info["summary"]["energy_0.9"]["uniform_rank"] == max(row["energy_0.9"] for row in rows.values())


def test_squeeze_in_a_real_process(src, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lsq", "squeeze", str(src), "--ranks", "5", "--out", str(out),
                           "--no-plot"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert list(table(proc.stdout)) == ["r5"] and table(proc.stdout)["r5"][-1] == str(out / "r5")
    assert proc.stderr == ""
    updates, _ = written_updates(out / "r5")
    for n, dW in source_updates(src).items():
        assert rel_err(updates[n], best_rank_k(dW, 5)) < 1e-5


def test_squeeze_in_process_leaves_torch_threads_as_they_were(tmp_path):
    """The CLI decomposes modules on one thread per worker; called in-process it must give the
    caller its torch thread count back."""
    src = make_adapter(tmp_path / "src")
    before = torch.get_num_threads()
    assert main(["squeeze", str(src), "--ranks", "2", "--out", str(tmp_path / "out"), "--no-plot"]) == 0
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("counts, text", [({"8": 37}, "8"), ({"2": 1, "4": 3}, "2-4 (mean 3.5)"), ({}, "-")])
def test_rank_summary(counts, text):
    assert rank_summary(counts) == text


def lsq_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lsq", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_version_from_the_package_metadata():
    from importlib.metadata import version

    done = lsq_command("--version")
    assert done.returncode == 0 and done.stdout == f"lsq {version('lsq')}\n", done


@pytest.mark.parametrize("command, words", [
    ("squeeze", ["--ranks", "--energy", "--budget", "--json", "retained energy"]),
    ("train", ["--settings", "--schema", "method=in"]),
    ("evaluate", ["--split", "accuracy"]),
    ("inspect", ["--json", "energy threshold"]),
])
def test_every_command_has_readable_help_with_examples(command, words):
    done = lsq_command(command, "--help")
    assert done.returncode == 0, done.stderr
    assert "\nexamples:\n" in done.stdout and f"  lsq {command} " in done.stdout.split("examples:")[1]
    assert all(w in done.stdout for w in words), done.stdout
    assert '"""' not in done.stdout and "SIGTERM" not in done.stdout  # not the module docstring


def test_train_help_lists_every_method():
    from typing import get_args

    from lsq.train_config import TrainConfig

    text = lsq_command("train", "--help").stdout
    methods = text.split("methods (method=...):\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in methods] == list(get_args(TrainConfig.model_fields["method"].annotation))
    assert all(len(line.split(None, 1)[1]) > 20 for line in methods)


def test_train_settings_list_every_key_with_its_value_and_meaning(capsys):
    from lsq.train_config import TrainConfig, load_train_config

    lines, _ = run(capsys, "train", "rank=3", "train.steps=7", "--settings")
    rows = [re.split(r" {2,}", line) for line in lines.splitlines()]
    assert all(len(row) == 2 for row in rows), rows  # key=value, then its meaning
    settings = dict(setting.split("=", 1) for setting, _ in rows)
    assert len(settings) == len(rows)
    assert settings["rank"] == "3" and settings["train.steps"] == "7" and settings["method"] == "source"
    assert settings["model.name"] == "builtin:minilm" and settings["cont.adapter"] == "null"
    meanings = {setting.split("=")[0]: meaning for setting, meaning in rows}
    assert meanings["train.lr"] == TrainConfig.model_fields["train"].annotation.model_fields["lr"].description
    # every line is an override that gives the same config back
    assert load_train_config(None, [setting for setting, _ in rows]) == load_train_config(None, ["rank=3", "train.steps=7"])


def test_help_and_version_import_nothing_heavy():
    """``--help`` and ``--version`` answer from argparse alone: no torch, pydantic or transformers."""
    probe = ("import sys\nfrom lsq.cli import main\n"
             "for argv in (['--version'], ['--help'], *([c, '--help'] for c in ('squeeze', 'inspect', 'train', 'evaluate'))):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('torch', 'pydantic', 'transformers', 'yaml') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "[]", done
