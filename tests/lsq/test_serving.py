"""The serving contract (:mod:`lsq.serving`): what vLLM-style multi-LoRA servers load as is."""

import pytest

from lsq.serving import check_adapter, vllm_contract
from tests.lsq.tiny import tiny_llama  # noqa: F401  (fixture)

LORA = ["base_model.model.layers.0.q_proj.lora_A.weight", "base_model.model.layers.0.q_proj.lora_B.weight"]


def config(**changes):
    return {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {}, "alpha_pattern": {},
            "use_dora": False, "modules_to_save": None, **changes}


@pytest.mark.parametrize("r, max_rank", [(1, 1), (4, 8), (8, 8), (16, 16), (300, 320), (512, 512)])
def test_uniform_lora_is_servable_with_the_smallest_max_lora_rank_that_fits(r, max_rank):
    check = vllm_contract(config(r=r, lora_alpha=2 * r), LORA)
    assert check.servable and check.max_lora_rank == max_rank
    assert check.tag() == f"yes: --max-lora-rank {max_rank}"


def test_rank_and_alpha_patterns_are_refused_with_the_squeeze_that_fixes_them():
    check = vllm_contract(config(r=64, rank_pattern={"q_proj": 13, "v_proj": 40}), LORA)
    assert not check.servable
    tag = check.tag()
    assert tag.startswith("no: per-module ranks (rank_pattern, 13-64)") and "--ranks 8 --serving vllm" in tag
    tag = vllm_contract(config(alpha_pattern={"q_proj": 3.0}), LORA).tag()
    assert tag.startswith("no: per-module alphas (alpha_pattern)")


def test_dora_and_modules_to_save_cannot_be_fixed_by_a_squeeze():
    dora = vllm_contract(config(use_dora=True), LORA)
    assert not dora.servable and "DoRA" in dora.tag() and "no squeeze makes it servable" in dora.tag()
    head = vllm_contract(config(modules_to_save=["classifier"]), LORA)
    assert not head.servable and "modules_to_save (classifier)" in head.tag()
    # a saved head found by its weight name alone (config written without modules_to_save)
    named = vllm_contract(config(), [*LORA, "base_model.model.classifier.weight"])
    assert not named.servable and "modules_to_save (base_model.model.classifier)" in named.tag()
    magnitude = vllm_contract(config(), [*LORA, "base_model.model.layers.0.q_proj.lora_magnitude_vector"])
    assert not magnitude.servable and "DoRA" in magnitude.tag()


def test_too_large_rank_and_other_adapter_types():
    big = vllm_contract(config(r=1024), LORA)
    assert not big.servable and "rank 1024 above vLLM's largest --max-lora-rank 512" in big.tag()
    assert "--ranks 512 --serving vllm" in big.tag()
    ada = vllm_contract({"peft_type": "ADALORA", "r": 8}, LORA)
    assert not ada.servable and ada.tag().startswith("no: peft_type ADALORA")


def test_check_adapter_reads_a_peft_folder(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps(config(r=16)))
    save_file({n: torch.zeros(2, 2) for n in LORA}, str(tmp_path / "adapter_model.safetensors"))
    assert check_adapter(tmp_path).tag() == "yes: --max-lora-rank 16"


def decoder_adapter(base, folder, rank: int) -> None:
    """A PEFT LoRA adapter of ``rank`` on every Llama projection of ``base`` (no saved modules), B non-zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lsq.models import DEFAULT_TARGETS

    torch.manual_seed(rank)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank,
                                      target_modules=DEFAULT_TARGETS["llama"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(folder)


def test_decoder_adapters_trained_and_squeezed_are_servable(tiny_llama, tmp_path):
    """A causal-LM LoRA adapter (all seven Llama projections, nothing saved whole) needs the smallest vLLM
    --max-lora-rank at or above its rank; so does each uniform squeeze of it, whether or not its rank is one vLLM
    names; a per-module (energy) squeeze is refused with its remedy."""
    from lsq.api import squeeze_adapter
    from lsq.config import SqueezeConfig

    for rank, max_rank in ((4, 8), (64, 64)):
        decoder_adapter(tiny_llama, tmp_path / f"r{rank}", rank)
        assert check_adapter(tmp_path / f"r{rank}").tag() == f"yes: --max-lora-rank {max_rank}"
    squeezed = squeeze_adapter(tmp_path / "r64", tmp_path / "sq", SqueezeConfig(ranks=(3, 16)), plot=False)
    assert {name: check_adapter(w.folder).tag() for name, w in squeezed.items()} == {
        "r3": "yes: --max-lora-rank 8", "r16": "yes: --max-lora-rank 16"}
    per_module = squeeze_adapter(tmp_path / "r64", tmp_path / "energy", SqueezeConfig(energy=(0.9,)), plot=False)
    tag = check_adapter(per_module["energy0.9"].folder).tag()
    assert tag.startswith("no: per-module ranks (rank_pattern") and "--serving vllm" in tag
