"""Bad input through the ``lsq`` command: exit status 2, ONE line ``lsq: error: ...`` on stderr naming the
problem, and nothing written (no output folder, no temporary folder beside it)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lsq.adapter
from lsq.api import squeeze_adapter
from lsq.cli import main
from lsq.config import SqueezeConfig

# module name -> (d_in, d_out); keys as PEFT saves them
MODULES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.mlp.down_proj": (48, 32)}


def make_adapter(folder: Path, r: int = 8, **config) -> Path:
    """A PEFT-layout LoRA adapter folder with random factors (B non-zero)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weights = {}
    for name, (d_in, d_out) in MODULES.items():
        weights[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
        weights[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, r, generator=g)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj"],
           "task_type": "CAUSAL_LM", "rank_pattern": {}, "alpha_pattern": {}, **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def _poison(value: float):
    def setup(src: Path) -> None:
        path = src / "adapter_model.safetensors"
        weights = load_file(path)
        weights["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"][3, 5] = value
        save_file(weights, str(path))
    return setup


def _truncate(src: Path) -> None:
    path = src / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])


def _garbage(src: Path) -> None:
    (src / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)


def _legacy_garbage(src: Path) -> None:
    (src / "adapter_model.safetensors").unlink()
    (src / "adapter_model.bin").write_bytes(b"not a pickle at all")


def _config(**changes):
    def setup(src: Path) -> None:
        path = src / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return setup


# id -> (change to the good source, extra CLI arguments, words the error line must contain)
CASES = {
    "missing src folder": (shutil.rmtree, ["--ranks", "2"], ["adapter folder not found"]),
    "missing config": (lambda src: (src / "adapter_config.json").unlink(), ["--ranks", "2"],
                       ["adapter_config.json", "missing"]),
    "corrupt json": (lambda src: (src / "adapter_config.json").write_text('{"peft_type": "LORA", "r": '),
                     ["--ranks", "2"], ["adapter_config.json", "not valid JSON"]),
    "truncated safetensors": (_truncate, ["--ranks", "2"], ["adapter_model.safetensors", "not a readable safetensors"]),
    "garbage safetensors": (_garbage, ["--ranks", "2"], ["adapter_model.safetensors", "not a readable safetensors"]),
    "garbage legacy bin": (_legacy_garbage, ["--ranks", "2"], ["adapter_model.bin", "refused by the safe loader"]),
    "peft type IA3": (_config(peft_type="IA3"), ["--ranks", "2"], ["peft_type", "'IA3'"]),
    "peft type ADALORA": (_config(peft_type="ADALORA"), ["--ranks", "2"], ["peft_type", "'ADALORA'"]),
    "shapes disagree with r": (_config(r=4), ["--ranks", "2"], ["down_proj", "(8, 48)", "disagree with rank 4"]),
    "rank_pattern not a number": (_config(rank_pattern={"q_proj": "eight"}), ["--ranks", "2"],
                                  ["rank_pattern", "'eight'"]),
    "rank_pattern bad regex": (_config(rank_pattern={"[": 4}), ["--ranks", "2"],
                               ["adapter_config.json", "rank_pattern", "'['", "not a valid regular expression"]),
    "alpha_pattern bad regex": (_config(alpha_pattern={"q_proj(": 4}), ["--ranks", "2"],
                                ["adapter_config.json", "alpha_pattern", "'q_proj('", "not a valid regular expression"]),
    "NaN in weights": (_poison(float("nan")), ["--ranks", "2"], ["down_proj", "lora_A", "NaN or Inf"]),
    "Inf in weights": (_poison(float("inf")), ["--ranks", "2"], ["down_proj", "lora_A", "NaN or Inf"]),
    "target rank 0": (None, ["--ranks", "0"], ["rank 0", "below 1"]),
    "target rank = source rank": (None, ["--ranks", "8"], ["rank 8", "not below the source rank 8"]),
    "target rank > source rank": (None, ["--ranks", "4", "12"], ["rank 12", "not below the source rank 8"]),
    "fixed alpha without --alpha": (None, ["--ranks", "2", "--alpha-policy", "fixed"], ["--alpha", "fixed"]),
    "energy 1.5": (None, ["--energy", "1.5"], ["energy", "1.5", "(0, 1]"]),
    "budget too small": (None, ["--budget", "100"], ["--budget 100", "minimum of 144"]),  # 2 modules: 64 + 80
    "no target": (None, [], ["no target"]),
}


@pytest.fixture
def paths(tmp_path):
    src = make_adapter(tmp_path / "src")
    work = tmp_path / "work"
    work.mkdir()
    return src, work, work / "out"


def run_cli(capsys, argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_refused(rc: int, out: str, err: str, words, work: Path, left=()) -> None:
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("lsq: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert out == ""
    assert sorted(p.name for p in work.iterdir()) == sorted(left), "something was written"


@pytest.mark.parametrize("case", list(CASES))
def test_refused_through_main(case, paths, capsys):
    src, work, out = paths
    setup, args, words = CASES[case]
    if setup is not None:
        setup(src)
    rc, stdout, stderr = run_cli(capsys, ["squeeze", src, "--out", out, *args])
    assert_refused(rc, stdout, stderr, words, work)


def test_inspect_refuses_bad_input(paths, capsys):
    src, work, _ = paths
    _poison(float("nan"))(src)
    rc, stdout, stderr = run_cli(capsys, ["inspect", src])
    assert_refused(rc, stdout, stderr, ["NaN or Inf"], work)


@pytest.mark.parametrize("key", ["rank_pattern", "alpha_pattern"])
def test_inspect_refuses_a_pattern_that_is_no_regex(key, paths, capsys):
    src, work, _ = paths
    _config(**{key: {"[": 4}})(src)
    rc, stdout, stderr = run_cli(capsys, ["inspect", src])
    assert_refused(rc, stdout, stderr, [key, "'['", "not a valid regular expression"], work)


def test_pattern_key_names_a_bad_regex():
    with pytest.raises(lsq.adapter.LsqError, match=r"^rank_pattern: key '\[' is not a valid regular expression"):
        lsq.adapter.pattern_key({"q_proj": 2, "[": 4}, "model.layers.0.self_attn.v_proj", "rank_pattern")


def test_malformed_override_is_one_line(tmp_path, capsys):
    """``lsq train rank=[1``: the value is parsed as YAML; broken YAML is bad input, not a traceback."""
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(capsys, ["train", "rank=[1", f"output_dir={out}"])
    assert_refused(rc, stdout, stderr, ["override 'rank=[1'", "not valid YAML", "expected ',' or ']'"], tmp_path)


def test_existing_output_untouched_without_force(paths, capsys):
    src, work, out = paths
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, stdout, stderr = run_cli(capsys, ["squeeze", src, "--ranks", "2", "--out", out])
    assert_refused(rc, stdout, stderr, [str(out), "exists", "--force"], work, left=["out"])
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_existing_output_replaced_with_force(paths, capsys):
    src, work, out = paths
    out.mkdir()
    (out / "keep.txt").write_text("old")
    rc, stdout, stderr = run_cli(capsys, ["squeeze", src, "--ranks", "2", "--out", out, "--force", "--no-plot"])
    assert rc == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["r2"]
    assert (out / "r2" / "adapter_model.safetensors").is_file()
    assert [p.name for p in work.iterdir()] == ["out"]  # no temporary or .old folder left


@pytest.mark.parametrize("where", ["source", "parent of source"])
def test_force_never_deletes_the_source(paths, capsys, where):
    src, _, _ = paths
    target = src if where == "source" else src.parent
    before = sorted(p.name for p in src.iterdir())
    rc, _, stderr = run_cli(capsys, ["squeeze", src, "--ranks", "2", "--out", target, "--force"])
    assert rc == 2 and len(stderr.splitlines()) == 1 and "source adapter" in stderr
    assert sorted(p.name for p in src.iterdir()) == before


def test_unwritable_output_is_one_line(paths, capsys):
    src, work, _ = paths
    (work / "a_file").write_text("x")
    rc, stdout, stderr = run_cli(capsys, ["squeeze", src, "--ranks", "2", "--out", work / "a_file" / "out"])
    assert_refused(rc, stdout, stderr, ["a_file"], work, left=["a_file"])


def _fail_on_second_save(monkeypatch, exc: Exception) -> list[int]:
    calls, real = [], lsq.adapter.save_file

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(lsq.adapter, "save_file", flaky)
    return calls


def test_crash_mid_write_leaves_nothing(paths, monkeypatch):
    src, work, out = paths
    calls = _fail_on_second_save(monkeypatch, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        squeeze_adapter(src, out, SqueezeConfig(ranks=(2, 4)), plot=False)
    assert len(calls) == 2  # the first output was fully written before the crash
    assert list(work.iterdir()) == []


def test_crash_mid_write_keeps_existing_output(paths, monkeypatch):
    src, work, out = paths
    out.mkdir()
    (out / "keep.txt").write_text("old")
    _fail_on_second_save(monkeypatch, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError):
        squeeze_adapter(src, out, SqueezeConfig(ranks=(2, 4)), force=True, plot=False)
    assert [p.name for p in work.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_disk_full_mid_write_through_main(paths, monkeypatch, capsys):
    src, work, out = paths
    _fail_on_second_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    rc, stdout, stderr = run_cli(capsys, ["squeeze", src, "--ranks", "2", "4", "--out", out, "--no-plot"])
    assert_refused(rc, stdout, stderr, ["No space left on device"], work)


LSQ_SCRIPT = Path(sys.executable).parent / "lsq"


@pytest.mark.parametrize("command", [[str(LSQ_SCRIPT)], [sys.executable, "-m", "lsq"]], ids=["script", "module"])
def test_refused_in_a_real_process(paths, command):
    src, work, out = paths
    _poison(float("inf"))(src)
    proc = subprocess.run([*command, "squeeze", str(src), "--ranks", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert_refused(proc.returncode, proc.stdout, proc.stderr, ["down_proj", "NaN or Inf"], work)
