"""The storage root (lsq/storage.py) and units (lsq.steps.run_unit) across machines that share no folder.

Two "machines" here are two work folders with their own caches; the only thing they share is a
root by URL (``file://`` of a third folder, the same code path as ``s3://``). The object-store case
with a real S3 server is in tests/team/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lsq import steps
from lsq.config import SqueezeConfig
from lsq.data import DataConfig, fingerprint, load_data
from lsq.errors import LsqError
from lsq.models import ModelConfig
from lsq.records import Evaluation, Squeezed, UnitResult, Variant
from lsq.storage import COMPLETE, Storage
from lsq.train_config import TrainConfig
from lsq.workdir import adapter_digest
from tests.lsq.tiny import cls_config, cls_csv, tiny_bert  # noqa: F401  (fixtures)


def _adapter(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 2}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "squeeze_report.json").write_text("{}")
    return folder


def _result(adapter: Path, name: str = "post-r2-abc") -> UnitResult:
    variant = Variant(method="post", rank=2, source_rank=8, adapter_dir=str(adapter),
                      adapter_sha256=adapter_digest(adapter), report=str(adapter / "squeeze_report.json"))
    evaluation = Evaluation(label="post-r2", split="test", examples=3, scores={"accuracy": 0.5},
                            trainable_params=1, lora_params=1, adapter_bytes=7)
    return UnitResult(name=name, variant=variant, evaluations=(evaluation,))


def test_a_result_moves_between_machines_only_through_the_root(tmp_path):
    root = (tmp_path / "bucket").as_uri()
    a, b = Storage(root, tmp_path / "a"), Storage(root, tmp_path / "b")
    adapter = _adapter(tmp_path / "a" / "work" / "adapter", b"weights")
    result = _result(adapter)

    published = a.put(result.name, result)
    digest = result.variant.adapter_sha256
    assert published.variant.adapter_dir == f"{root}/adapters/{digest}"
    assert published.variant.report == f"{root}/adapters/{digest}/squeeze_report.json"
    assert b.get(result.name, UnitResult) == published  # machine b reads it from the root
    assert b.get("other-name", UnitResult) is None

    local = b.localize(published.variant)  # fetched into b's own cache, checked against its digest
    assert Path(local.adapter_dir) == tmp_path / "b" / "cache" / digest
    assert Path(local.report).read_text() == "{}"
    assert adapter_digest(local.adapter_dir) == digest
    assert not str(local.adapter_dir).startswith(str(tmp_path / "a"))
    assert b.localize(published.variant) == local  # the second time from the cache

    # a retry never writes over the good result: same digest, same place, marker unchanged
    marker = tmp_path / "bucket" / "adapters" / digest / COMPLETE
    before = marker.stat().st_mtime_ns
    a.put(result.name, result)
    assert marker.stat().st_mtime_ns == before


def test_a_half_uploaded_or_tampered_adapter_is_never_used(tmp_path):
    root = (tmp_path / "bucket").as_uri()
    a, b = Storage(root, tmp_path / "a"), Storage(root, tmp_path / "b")
    published = a.put("post-r2-abc", _result(_adapter(tmp_path / "a" / "adapter", b"weights")))
    remote = tmp_path / "bucket" / "adapters" / published.variant.adapter_sha256

    (remote / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(LsqError, match="digest"):
        b.localize(published.variant)
    assert not (tmp_path / "b" / "cache" / published.variant.adapter_sha256).exists()  # nothing half-fetched
    assert [p for p in (tmp_path / "b" / "cache").iterdir()] == []

    (remote / COMPLETE).unlink()  # an upload cut before its marker: the record is not trusted
    assert b.get("post-r2-abc", UnitResult) is None
    with pytest.raises(LsqError, match="no COMPLETE marker"):
        b.localize(published.variant)


def test_laptop_mode_copies_nothing_and_checks_the_adapter(tmp_path):
    storage = Storage(None, tmp_path / "runs")
    adapter = _adapter(tmp_path / "runs" / "post" / "adapter", b"weights")
    result = _result(adapter)
    assert storage.put(result.name, result) == result
    assert (tmp_path / "runs" / "units" / f"{result.name}.json").is_file()
    assert storage.localize(result.variant) == result.variant
    assert storage.get(result.name, UnitResult) == result
    (adapter / "adapter_model.safetensors").write_bytes(b"changed")
    assert storage.get(result.name, UnitResult) is None  # the adapter it names changed: run again
    assert not (tmp_path / "runs" / "cache").exists()


def test_units_on_two_machines_share_only_the_root(tiny_bert, cls_csv, tmp_path, monkeypatch):
    """Machine a trains and squeezes the source; machine b recovers one squeezed adapter from the root."""
    root = (tmp_path / "bucket").as_uri()
    data_cfg = DataConfig(source=str(cls_csv), max_length=16)
    fp = fingerprint(load_data(data_cfg))
    code = steps.code_version()
    base = dict(model=ModelConfig(name=str(tiny_bert)), data=data_cfg, splits=("test",), eval_batch_size=8,
                data_fingerprint=fp, code=code, storage_root=root)

    def train_cfg(method: str, rank: int, **kw) -> TrainConfig:
        return TrainConfig.model_validate(cls_config(tiny_bert, cls_csv, tmp_path / "x", method=method, rank=rank,
                                                     source_rank=8, train__steps=3, **kw))

    monkeypatch.setenv("LSQ_WORKER", "machine-a")
    source = steps.run_unit(steps.Unit(kind="train", train=train_cfg("source", 8), output_dir=str(tmp_path / "a"),
                                       **base))
    assert source.variant.adapter_dir.startswith(root) and source.variant.worker == "machine-a"
    assert source.variant.device == "cpu"
    squeezed = steps.squeeze_unit(source.variant, SqueezeConfig(ranks=(2,)), Storage(root, tmp_path / "a"), code)
    [post] = squeezed.variants
    assert post.adapter_dir.startswith(root)

    monkeypatch.setenv("LSQ_WORKER", "machine-b")
    cont_cfg = train_cfg("cont", 2, cont__adapter=post.adapter_dir, cont__steps=2)
    unit = steps.Unit(kind="train", train=cont_cfg, parent=post, output_dir=str(tmp_path / "b"), **base)
    cont = steps.run_unit(unit)
    assert cont.variant.worker == "machine-b" and cont.variant.adapter_dir.startswith(root)
    assert cont.variant.steps == 3 + 2 and cont.evaluations[0].label == "cont-r2"
    # b fetched the squeezed adapter into its own cache and never read a's folder
    assert (tmp_path / "b" / "cache" / post.adapter_sha256 / "adapter_model.safetensors").is_file()
    assert not any((tmp_path / "b").rglob("*source-r8*"))
    # the same unit again, anywhere: the kept result, no training
    monkeypatch.setattr("lsq.steps.train", lambda *a, **k: pytest.fail("trained again"))
    assert steps.run_unit(unit.model_copy(update={"output_dir": str(tmp_path / "c")})) == cont
    # a worker with other code refuses the unit instead of publishing under another code's name
    with pytest.raises(LsqError, match="install the same lsq version"):
        steps.run_unit(unit.model_copy(update={"code": "0" * 16}))
    assert isinstance(Squeezed.model_validate_json(
        (tmp_path / "bucket" / "units").joinpath(f"{squeezed_name(tmp_path)}").read_text()), Squeezed)


def squeezed_name(tmp_path: Path) -> str:
    [path] = [p.name for p in (tmp_path / "bucket" / "units").iterdir() if p.name.startswith("post-from-")]
    return path


def test_training_resumes_on_another_machine_from_a_checkpoint_kept_in_the_root(tiny_bert, cls_csv, tmp_path):
    """Machine a keeps each whole checkpoint in the root (the newest only); machine b, with an empty work
    folder, fetches the newest and resumes from it: at the last step, b's adapter is a's, bit for bit."""
    import lsq.train

    root = (tmp_path / "bucket").as_uri()
    data_cfg = DataConfig(source=str(cls_csv), max_length=16)
    fp = fingerprint(load_data(data_cfg))
    code = steps.code_version()
    cfg = TrainConfig.model_validate(cls_config(tiny_bert, cls_csv, tmp_path / "a", method="source", source_rank=8,
                                                train__steps=4, train__save_steps=2))
    a = steps.train_step(cfg, fp, code, storage=Storage(root, tmp_path / "a"))
    run = Path(a.adapter_dir).parent.name
    kept = sorted(p.name for p in (tmp_path / "bucket" / "checkpoints" / run).iterdir())
    assert kept == ["checkpoint-4"]  # checkpoint-2 was kept, then replaced
    assert (tmp_path / "bucket" / "checkpoints" / run / "checkpoint-4" / COMPLETE).is_file()

    resumed = []
    real = lsq.train.Trainer.train

    def spy(self, resume_from_checkpoint=None, **kw):
        resumed.append(resume_from_checkpoint)
        return real(self, resume_from_checkpoint=resume_from_checkpoint, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lsq.train.Trainer, "train", spy)
        b = steps.train_step(cfg.model_copy(update={"output_dir": str(tmp_path / "b")}), fp, code,
                             storage=Storage(root, tmp_path / "b"))
    assert resumed == [str(tmp_path / "b" / run / "checkpoints" / "checkpoint-4")]
    assert b.adapter_sha256 == a.adapter_sha256
