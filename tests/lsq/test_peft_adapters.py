"""End to end: adapters made by PEFT itself, squeezed by lsq, loaded back by PEFT.

For every output module PEFT's own ``get_delta_weight`` must equal the best rank-k approximation of the
source module's delta (dense float64 SVD, ``tests/lsq/dense.py``), and the loaded model's logits must
equal those of the source PeftModel whose factors are replaced by the dense truncation (zero-padded
to the source rank, so DoRA, rsLoRA and Conv layers compute it PEFT's way). Models are tiny, built
from configs with random weights; ``init_lora_weights=False`` makes B non-zero.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lsq.api import PLOT_NAME, REPORT_NAME, squeeze_adapter
from lsq.config import SqueezeConfig
from lsq.policies import SERVING_RANKS
from tests.lsq.dense import best_rank_k, dense_update, rel_err

# transformers 5 deprecation hit inside PEFT's get_peft_model; not ours
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0))


def bert() -> nn.Module:
    return BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=128, vocab_size=128, num_labels=3))


class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.head = nn.Linear(24, 5)

    def forward(self, x):  # x: (N, 3, H, W)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def token_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"input_ids": torch.randint(0, 128, (2, 9), generator=g)}


def image_inputs() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)}


def make_source(tmp_path: Path, build: Callable[[], nn.Module], lora: LoraConfig, *, bf16: bool = False,
                legacy: bool = False) -> tuple[Path, Callable[[], nn.Module]]:
    """Save a random base model and a PEFT adapter on it; return the adapter folder and a base loader."""
    torch.manual_seed(0)
    base = build()
    torch.save(base.state_dict(), tmp_path / "base.pt")

    def fresh_base() -> nn.Module:
        model = build()
        model.load_state_dict(torch.load(tmp_path / "base.pt", weights_only=True))
        return model.eval()

    torch.manual_seed(1)
    src = tmp_path / "src"
    get_peft_model(base, lora).save_pretrained(src, safe_serialization=not legacy)
    if bf16:
        path = src / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    return src, fresh_base


def load(fresh_base: Callable[[], nn.Module], folder: Path) -> PeftModel:
    return PeftModel.from_pretrained(fresh_base(), folder).double().eval()


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """LoRA layers by the module name lsq reports (without PEFT's ``base_model.model.`` prefix)."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and "default" in m.r}


def factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    if "default" in layer.lora_embedding_A:
        return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out).double()


def check_output(src: Path, out: Path, fresh_base, inputs, *, tol: float = 1e-6) -> dict:
    """The checks every squeezed folder must pass; returns its report for policy-specific checks."""
    report = json.loads((out / REPORT_NAME).read_text())
    source, squeezed = load(fresh_base, src), load(fresh_base, out)
    src_layers, out_layers = lora_layers(source), lora_layers(squeezed)
    assert set(out_layers) == set(src_layers) == set(report["modules"])
    full_logits = logits(source, inputs)
    total_sq = kept_sq = params = 0.0
    for name, layer in src_layers.items():
        k, row = out_layers[name].r["default"], report["modules"][name]
        assert row["rank"] == k and row["source_rank"] == layer.r["default"]
        # (a) PEFT's delta of the output == dense best rank-k approximation of PEFT's source delta
        delta = layer.get_delta_weight("default").flatten(1)  # float64, PEFT's layout
        ref = best_rank_k(delta, k)
        assert rel_err(out_layers[name].get_delta_weight("default").flatten(1), ref) < tol, name
        # the report's numbers against the dense spectrum
        S = torch.linalg.svdvals(delta)
        A, B = factors(layer)
        n_sv = min(layer.r["default"], A[0].numel(), B.shape[0])
        torch.testing.assert_close(torch.tensor(row["singular_values"], dtype=torch.float64), S[:n_sv],
                                   rtol=1e-6, atol=1e-9 * float(S[0]))
        assert row["retained_energy"] == pytest.approx(float((S[:k] ** 2).sum() / (S**2).sum()), rel=1e-6)
        assert row["relative_error"] == pytest.approx(rel_err(ref, delta), rel=1e-5, abs=1e-7)
        assert row["alpha"] == pytest.approx(_alpha(squeezed, name))
        total_sq += float((S**2).sum())
        kept_sq += float((S[:k] ** 2).sum())
        params += k * (A[0].numel() + B.shape[0])
        # (b) replace the source factors by the dense truncation, zero-padded to the source rank
        s = layer.scaling["default"]
        U, Sm, Vh = torch.linalg.svd(dense_update(A, B, s), full_matrices=False)  # (d_out, d_in) factor space
        A2, B2 = torch.zeros(A.shape[0], A[0].numel(), dtype=A.dtype), torch.zeros(B.shape[0], B.shape[1], dtype=B.dtype)
        A2[:k], B2[:, :k] = Vh[:k], U[:, :k] * Sm[:k] / s
        with torch.no_grad():
            A.copy_(A2.reshape(A.shape))
            B.copy_(B2.reshape(B.shape))
        assert rel_err(layer.get_delta_weight("default").flatten(1), ref) < 1e-10  # the padding trick is exact
    totals = report["totals"]
    assert totals["lora_params"] == params
    assert totals["retained_energy"] == pytest.approx(kept_sq / total_sq, rel=1e-6)
    assert totals["relative_error"] == pytest.approx(math.sqrt(1 - kept_sq / total_sq), rel=1e-4, abs=1e-7)
    squeezed_logits, truncated_logits = logits(squeezed, inputs), logits(source, inputs)
    scale = float(truncated_logits.abs().max())
    torch.testing.assert_close(squeezed_logits, truncated_logits, rtol=0, atol=max(tol, 1e-9) * 10 * scale)
    if any(out_layers[n].r["default"] < src_layers[n].r["default"] for n in src_layers):
        assert (squeezed_logits - full_logits).abs().max() > 1e-6 * scale  # the truncation is visible
    return report


def _alpha(model: PeftModel, name: str) -> float:
    """lora_alpha PEFT resolved for a module, recovered from its scaling."""
    layer = lora_layers(model)[name]
    r, s = layer.r["default"], layer.scaling["default"]
    return s * (math.sqrt(r) if layer.use_rslora["default"] else r)


def squeeze(src: Path, out: Path, **settings) -> dict[str, Path]:
    plot = settings.pop("plot", False)
    return {name: w.folder for name, w in squeeze_adapter(src, out, SqueezeConfig(**settings), plot=plot).items()}


def test_llama_all_projections(tmp_path):
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    src, fresh = make_source(tmp_path, llama, lora)
    written = squeeze(src, tmp_path / "out", ranks=(4, 8), plot=True)
    assert written == {"r4": tmp_path / "out" / "r4", "r8": tmp_path / "out" / "r8"}
    for name, k in (("r4", 4), ("r8", 8)):
        report = check_output(src, written[name], fresh, token_inputs())
        assert len(report["modules"]) == 2 * len(LLAMA_TARGETS)
        assert {row["rank"] for row in report["modules"].values()} == {k}
        config = json.loads((written[name] / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (k, pytest.approx(2.0 * k), {})
        assert (written[name] / PLOT_NAME).stat().st_size > 0
        assert (written[name] / "README.md").is_file()  # other files of the source are copied
    assert (tmp_path / "out" / PLOT_NAME).stat().st_size > 0


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                      init_lora_weights=False)
    src, fresh = make_source(tmp_path, gpt2, lora)
    written = squeeze(src, tmp_path / "out", ranks=(3,))
    report = check_output(src, written["r3"], fresh, token_inputs())
    assert len(report["modules"]) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert json.loads((written["r3"] / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_bert_embedding_and_modules_to_save(tmp_path):
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "word_embeddings"],
                      modules_to_save=["classifier"], task_type="SEQ_CLS", init_lora_weights=False)
    src, fresh = make_source(tmp_path, bert, lora)
    written = squeeze(src, tmp_path / "out", ranks=(2,))
    inputs = {**token_inputs(), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    report = check_output(src, written["r2"], fresh, inputs)
    assert "bert.embeddings.word_embeddings" in report["modules"]
    before, after = load_file(src / "adapter_model.safetensors"), load_file(written["r2"] / "adapter_model.safetensors")
    assert set(before) == set(after)
    rest = [k for k in before if ".lora_" not in k]
    assert any("classifier" in k for k in rest)
    for key in rest:  # modules_to_save tensors: bit-identical, same dtype
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert after["base_model.model.bert.embeddings.word_embeddings.lora_embedding_A"].shape == (2, 128)
    assert after["base_model.model.bert.embeddings.word_embeddings.lora_embedding_B"].shape == (64, 2)


def test_conv2d(tmp_path):
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["conv1", "conv2"], init_lora_weights=False)
    src, fresh = make_source(tmp_path, TinyConvNet, lora)
    written = squeeze(src, tmp_path / "out", ranks=(3,))
    check_output(src, written["r3"], fresh, image_inputs())
    after = load_file(written["r3"] / "adapter_model.safetensors")
    assert after["base_model.model.conv2.lora_A.weight"].shape == (3, 16, 3, 3)
    assert after["base_model.model.conv2.lora_B.weight"].shape == (24, 3, 1, 1)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("policy", ["keep-scale", "rank", "fixed"])
def test_alpha_policies(tmp_path, policy, use_rslora):
    lora = LoraConfig(r=12, lora_alpha=24, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=use_rslora,
                      init_lora_weights=False)
    src, fresh = make_source(tmp_path, llama, lora)
    alpha = 5.0 if policy == "fixed" else None
    written = squeeze(src, tmp_path / "out", ranks=(5,), alpha_policy=policy, alpha=alpha)
    check_output(src, written["r5"], fresh, token_inputs())
    config = json.loads((written["r5"] / "adapter_config.json").read_text())
    assert config["use_rslora"] is use_rslora
    src_scale = 24 / math.sqrt(12) if use_rslora else 24 / 12
    expected = {"keep-scale": src_scale * (math.sqrt(5) if use_rslora else 5), "rank": 5.0, "fixed": 5.0}[policy]
    assert config["lora_alpha"] == pytest.approx(expected, rel=1e-12)
    scaling = [layer.scaling["default"] for layer in lora_layers(load(fresh, written["r5"])).values()]
    assert scaling == pytest.approx([expected / (math.sqrt(5) if use_rslora else 5)] * 6)
    if policy == "keep-scale":
        assert scaling == pytest.approx([src_scale] * 6)


def test_rank_pattern_source_energy_and_budget(tmp_path):
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                      rank_pattern={"q_proj": 8, "down_proj": 12}, alpha_pattern={"q_proj": 4, "v_proj": 40},
                      init_lora_weights=False)
    src, fresh = make_source(tmp_path, llama, lora)
    source = load(fresh, src)
    src_ranks = {n: m.r["default"] for n, m in lora_layers(source).items()}
    assert set(src_ranks.values()) == {8, 12, 16}
    widths = {n: factors(m)[0].shape[1] + factors(m)[1].shape[0] for n, m in lora_layers(source).items()}
    budget = sum(widths.values()) * 5
    written = squeeze(src, tmp_path / "out", energy=(0.9,), budget=(budget,))
    assert set(written) == {"energy0.9", f"budget{budget}"}
    for name, folder in written.items():
        report = check_output(src, folder, fresh, token_inputs())
        ranks = {n: row["rank"] for n, row in report["modules"].items()}
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["rank_pattern"], "per-module ranks must go into rank_pattern"
        assert {n: m.r["default"] for n, m in lora_layers(load(fresh, folder)).items()} == ranks
        assert all(1 <= ranks[n] <= src_ranks[n] for n in ranks)
        if name == "energy0.9":  # smallest k with retained energy >= 0.9, from the dense spectrum
            for n, layer in lora_layers(source).items():
                cum = torch.cumsum(torch.linalg.svdvals(layer.get_delta_weight("default").flatten(1)) ** 2, 0)
                assert ranks[n] == int((cum / cum[-1] < 0.9).sum()) + 1, n
        else:
            assert sum(ranks[n] * widths[n] for n in ranks) <= budget
            assert report["totals"]["lora_params"] <= budget
            assert len(set(ranks.values())) > 1


def test_dora_keeps_magnitude(tmp_path):
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True,
                      init_lora_weights=False)
    src, fresh = make_source(tmp_path, llama, lora)
    before = load_file(src / "adapter_model.safetensors")
    with torch.no_grad():  # a trained magnitude differs from the column norms PEFT initialises it to
        before = {k: v * (1 + 0.3 * torch.rand_like(v)) if "magnitude" in k else v for k, v in before.items()}
    save_file(before, src / "adapter_model.safetensors", metadata={"format": "pt"})
    written = squeeze(src, tmp_path / "out", ranks=(3,))
    check_output(src, written["r3"], fresh, token_inputs())
    after = load_file(written["r3"] / "adapter_model.safetensors")
    magnitudes = [k for k in before if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 6
    for key in magnitudes:
        assert torch.equal(before[key], after[key]), key
    assert json.loads((written["r3"] / "adapter_config.json").read_text())["use_dora"] is True


def test_bf16_adapter(tmp_path):
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "gate_proj"], init_lora_weights=False)
    src, fresh = make_source(tmp_path, llama, lora, bf16=True)
    written = squeeze(src, tmp_path / "out", ranks=(4,))
    after = load_file(written["r4"] / "adapter_model.safetensors")
    assert {v.dtype for v in after.values()} == {torch.bfloat16}
    check_output(src, written["r4"], fresh, token_inputs(), tol=1e-2)  # bf16 rounding of the new factors


def test_vllm_serving_uniform_rank(tmp_path):
    lora = LoraConfig(r=24, lora_alpha=48, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False)
    src, fresh = make_source(tmp_path, llama, lora)
    written = squeeze(src, tmp_path / "out", ranks=(5,), energy=(0.5,), serving="vllm")
    assert "r8-vllm" in written and len(written) == 2
    for name, folder in written.items():
        report = check_output(src, folder, fresh, token_inputs())
        config = json.loads((folder / "adapter_config.json").read_text())
        ranks = {row["rank"] for row in report["modules"].values()}
        assert ranks == {config["r"]} and config["r"] in SERVING_RANKS["vllm"]
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
        assert name.endswith(f"-vllm-r{config['r']}") or name == f"r{config['r']}-vllm"


def test_legacy_bin_source_read_with_weights_only(tmp_path, monkeypatch):
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    src, fresh = make_source(tmp_path, llama, lora, legacy=True)
    assert (src / "adapter_model.bin").is_file() and not (src / "adapter_model.safetensors").exists()
    calls, real_load = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    written = squeeze(src, tmp_path / "out", ranks=(2,))
    monkeypatch.undo()
    assert calls == [True]
    assert (written["r2"] / "adapter_model.safetensors").is_file()
    assert not (written["r2"] / "adapter_model.bin").exists()
    check_output(src, written["r2"], fresh, token_inputs())
