"""The CUDA paths (skipped without a GPU; run them on a GPU machine with ``pytest -m gpu``): the squeeze on the
GPU gives the CPU's factors, bf16 training runs, two processes on two GPUs match one. On CPU the refusals
are checked instead."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from lsq.api import squeeze_adapter
from lsq.config import SqueezeConfig
from tests.lsq.test_distributed import bert_no_dropout, relative_difference, updates  # noqa: F401  (fixture)
from tests.lsq.tiny import cls_config, cls_csv  # noqa: F401  (fixtures)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def source(bert_no_dropout, cls_csv, tmp_path_factory):
    from lsq.train import train
    from lsq.train_config import TrainConfig

    out = tmp_path_factory.mktemp("source")
    return train(TrainConfig.model_validate(cls_config(bert_no_dropout, cls_csv, out, method="source", train__steps=4,
                                                       model__device="cpu"))).adapter_dir


def test_cuda_is_refused_in_one_line_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValidationError, match="cuda asked for but torch sees no CUDA device"):
        SqueezeConfig(ranks=[4], device="cuda")
    assert SqueezeConfig(ranks=[4], device="auto").torch_device == torch.device("cpu")


@pytest.mark.gpu
@cuda
def test_squeeze_on_the_gpu_matches_the_cpu(source, tmp_path):
    cpu = squeeze_adapter(source, tmp_path / "cpu", SqueezeConfig(ranks=[2, 8], device="cpu"), plot=False)
    gpu = squeeze_adapter(source, tmp_path / "gpu", SqueezeConfig(ranks=[2, 8], device="cuda"), plot=False)
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert relative_difference(updates(cpu[name].folder), updates(gpu[name].folder)) < 1e-6


@pytest.mark.gpu
@cuda
def test_bf16_training_on_the_gpu(bert_no_dropout, cls_csv, tmp_path):
    from lsq.train import train
    from lsq.train_config import TrainConfig

    result = train(TrainConfig.model_validate(cls_config(bert_no_dropout, cls_csv, tmp_path / "run", train__steps=6,
                                                         model__device="cuda")))
    assert result.steps == 6 and torch.isfinite(torch.tensor(result.train_loss))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_match_one(bert_no_dropout, cls_csv, tmp_path):
    from lsq.train import train
    from lsq.train_config import TrainConfig

    raw = dict(train__steps=6, model__device="cuda", model__dtype="float32")
    one = train(TrainConfig.model_validate(cls_config(bert_no_dropout, cls_csv, tmp_path / "p1", **raw)))
    two = train(TrainConfig.model_validate(cls_config(bert_no_dropout, cls_csv, tmp_path / "p2", train__processes=2, **raw)))
    assert relative_difference(updates(one.adapter_dir), updates(two.adapter_dir)) < 1e-4
