"""The squeeze core (:func:`lsq.squeeze.squeeze_state_dict`) on hand-made PEFT-style state dicts.

Every output is checked the way PEFT would load it: r and lora_alpha of each module are resolved from
the *output* config's rank_pattern / alpha_pattern with PEFT's own ``get_pattern_key``, the scale is
PEFT's formula, and ``scale' * B' @ A'`` must equal the best rank-k approximation of the source update
(dense float64 SVD, tests/lsq/dense.py).
"""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key

import lsq.squeeze
from lsq.adapter import pattern_key
from lsq.config import SqueezeConfig
from lsq.errors import LsqError
from lsq.policies import energy_rank
from lsq.squeeze import squeeze_state_dict, squeezed_config
from tests.lsq.dense import best_rank_k, dense_update, rel_err

P = "base_model.model."


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Matrices here are tiny: thread hand-offs cost more than they save on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# module -> (key of A, key of B, shape of A without r, shape of B without r)
MODULES = {
    "model.layers.0.self_attn.q_proj": ("lora_A.weight", "lora_B.weight", (24,), (20,)),
    "model.layers.0.mlp.down_proj": ("lora_A.weight", "lora_B.weight", (30,), (16,)),
    "model.embed_tokens": ("lora_embedding_A", "lora_embedding_B", (40,), (12,)),
    # Conv2d(3, 10, 3x3): A (r, 3, 3, 3), B (10, r, 1, 1)
    "model.conv": ("lora_A.weight", "lora_B.weight", (3, 3, 3), (10,)),
}
EXTRA = {  # DoRA magnitude and modules_to_save: carried over untouched
    P + "model.layers.0.self_attn.q_proj.lora_magnitude_vector": (20,),
    P + "classifier.weight": (2, 20),
    P + "classifier.bias": (2,),
}


def source_config(use_rslora: bool = False, r: int = 16, alpha: float = 32) -> dict:
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "rank_pattern": {"down_proj": 12},  # resolved by suffix, as PEFT does
        "alpha_pattern": {"down_proj": 8},
        "target_modules": ["q_proj", "down_proj", "embed_tokens", "conv"],
        "modules_to_save": ["classifier"],
        "use_dora": True,
        "base_model_name_or_path": "tiny-test-model",
    }


def peft_rank_alpha(config: dict, name: str) -> tuple[int, float]:
    """r and lora_alpha of module ``name`` as PEFT's LoraModel._create_and_replace resolves them."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, a_key = get_pattern_key(ranks.keys(), name), get_pattern_key(alphas.keys(), name)
    # lsq's own resolver must agree with PEFT's on every module
    assert (pattern_key(ranks, name) or name) == r_key and (pattern_key(alphas, name) or name) == a_key
    return ranks.get(r_key, config["r"]), alphas.get(a_key, config["lora_alpha"])


def peft_scale(config: dict, name: str) -> float:
    r, alpha = peft_rank_alpha(config, name)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def make_weights(config: dict, dtype=torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (key_a, key_b, a_rest, b_rest) in MODULES.items():
        r, _ = peft_rank_alpha(config, name)
        b_tail = (1, 1) if len(a_rest) == 3 else ()
        # decaying spectra, so that energy and budget targets pick different ranks per module
        decay = 0.85 ** torch.arange(r, dtype=torch.float64)
        A = torch.randn(r, *a_rest, generator=gen, dtype=torch.float64)
        B = torch.randn(b_rest[0], r, *b_tail, generator=gen, dtype=torch.float64) * decay.view(1, r, *b_tail)
        weights[f"{P}{name}.{key_a}"], weights[f"{P}{name}.{key_b}"] = A.to(dtype), B.to(dtype)
    for key, shape in EXTRA.items():
        weights[key] = torch.randn(*shape, generator=gen).to(dtype)
    return weights


def factors(weights: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    key_a, key_b, _, _ = MODULES[name]
    return weights[f"{P}{name}.{key_a}"], weights[f"{P}{name}.{key_b}"]


def check_adapter(adapter, weights, src_config, tol: float, dtype=None) -> None:
    """Every module of one output against PEFT's resolution of its config and the dense reference."""
    out = adapter.config
    for name in MODULES:
        A, B = factors(weights, name)
        A2, B2 = factors(adapter.weights, name)
        k, alpha = peft_rank_alpha(out, name)
        assert adapter.ranks[name] == k and adapter.alphas[name] == alpha
        assert A2.shape == (k, *A.shape[1:]) and B2.shape == (B.shape[0], k, *B.shape[2:])
        assert A2.dtype == B2.dtype == (dtype or A.dtype)
        target = best_rank_k(dense_update(A, B, peft_scale(src_config, name)), k)
        err = rel_err(dense_update(A2, B2, peft_scale(out, name)), target)
        assert err <= tol, f"{adapter.name}/{name} (rank {k}): relative error {err:.2e}"
    for key in EXTRA:
        assert adapter.weights[key].dtype == weights[key].dtype and torch.equal(adapter.weights[key], weights[key])
    assert set(adapter.weights) == set(weights)
    for key, value in src_config.items():
        if key not in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
            assert out[key] == value, f"config field {key} changed"


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize(("alpha_policy", "alpha"), [("keep-scale", None), ("rank", None), ("fixed", 4.0)])
@pytest.mark.parametrize("method", ["exact", "rsvd"])
def test_every_output_is_the_best_rank_k_update_under_peft_scaling(use_rslora, alpha_policy, alpha, method):
    src = source_config(use_rslora)
    weights = make_weights(src)
    config = SqueezeConfig(
        ranks=(4, 8), energy=(0.8,), budget=(3000,), alpha_policy=alpha_policy, alpha=alpha, method=method,
        oversample=16,  # rsvd: a sketch of every direction (8 + 16 >= r), so the answer is exact too
    )
    before = {k: v.clone() for k, v in weights.items()}

    result = squeeze_state_dict(weights, src, config)

    assert [a.name for a in result.adapters] == ["r4", "r8", "energy0.8", "budget3000"]
    for adapter in result.adapters:
        check_adapter(adapter, weights, src, tol=1e-10)
        for name in MODULES:
            k, new_alpha = peft_rank_alpha(adapter.config, name)
            if alpha_policy == "keep-scale":
                assert peft_scale(adapter.config, name) == pytest.approx(peft_scale(src, name), rel=1e-12)
            elif alpha_policy == "rank":
                assert new_alpha == k
            else:
                assert new_alpha == 4.0
    assert all(torch.equal(before[k], weights[k]) for k in weights), "the source state dict was modified"
    assert src == source_config(use_rslora), "the source config was modified"

    by_name = {a.name: a for a in result.adapters}
    for name in MODULES:  # the spectrum policies, against the dense spectrum
        A, B = factors(weights, name)
        S = torch.linalg.svdvals(dense_update(A, B, peft_scale(src, name)))
        torch.testing.assert_close(result.singular_values[name][: len(S)], S[: len(result.singular_values[name])])
        assert by_name["energy0.8"].ranks[name] == energy_rank(S, 0.8)
        assert result.widths[name] == A[0].numel() + B.shape[0]
    assert sum(k * result.widths[n] for n, k in by_name["budget3000"].ranks.items()) <= 3000


@pytest.mark.parametrize(
    ("r", "alpha", "k", "use_rslora", "expected"),
    [
        (64, 16, 8, False, 2.0), (64, 16, 3, False, 0.75), (64, 16, 16, True, 8.0), (16, 32, 4, False, 8.0),
        (10, 5, 3, False, 1.5),
    ],
)
def test_keep_scale_writes_alpha_as_a_float(r, alpha, k, use_rslora, expected):
    src = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora}
    gen = torch.Generator().manual_seed(1)
    weights = {
        P + "lin.lora_A.weight": torch.randn(r, 80, generator=gen),
        P + "lin.lora_B.weight": torch.randn(70, r, generator=gen),
    }
    (adapter,) = squeeze_state_dict(weights, src, SqueezeConfig(ranks=(k,))).adapters
    assert isinstance(adapter.config["lora_alpha"], float)
    assert adapter.config["lora_alpha"] == pytest.approx(expected, rel=1e-12)
    assert adapter.config["r"] == k and adapter.config["rank_pattern"] == {} and adapter.config["alpha_pattern"] == {}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_outputs_keep_the_source_dtype_unless_told(dtype):
    src = source_config()
    weights = make_weights(src, dtype=dtype, seed=2)
    (same,) = squeeze_state_dict(weights, src, SqueezeConfig(ranks=(6,))).adapters
    # the product of two factors rounded to 8 (bf16) or 11 (fp16) mantissa bits, against float64
    check_adapter(same, weights, src, tol={torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-6}[dtype])
    (wide,) = squeeze_state_dict(weights, src, SqueezeConfig(ranks=(6,), out_dtype="float32")).adapters
    check_adapter(wide, weights, src, tol=1e-6, dtype=torch.float32)  # half inputs widen exactly
    for key in EXTRA:
        assert wide.weights[key].dtype == dtype  # out_dtype is for the factors; the rest passes through


def test_one_decomposition_serves_every_target(monkeypatch):
    src = source_config()
    weights = make_weights(src, seed=3)
    calls = []
    real = lsq.squeeze.factored_svd
    monkeypatch.setattr(lsq.squeeze, "factored_svd", lambda *a, **kw: calls.append(kw.get("keep")) or real(*a, **kw))

    together = squeeze_state_dict(weights, src, SqueezeConfig(ranks=(2, 5, 8)))

    assert len(calls) == len(MODULES) and calls == [8] * len(MODULES)  # once per module, for the largest rank
    for adapter, k in zip(together.adapters, (2, 5, 8)):
        (alone,) = squeeze_state_dict(weights, src, SqueezeConfig(ranks=(k,))).adapters
        assert adapter.name == alone.name and adapter.config == alone.config
        for key in weights:
            torch.testing.assert_close(adapter.weights[key], alone.weights[key], rtol=1e-13, atol=1e-13)
        check_adapter(adapter, weights, src, tol=1e-10)


@pytest.mark.parametrize("alpha_policy", ["keep-scale", "fixed"])
def test_worker_threads_give_the_same_bits(alpha_policy):
    """workers > 1 decomposes modules concurrently; the outputs are those of the serial loop, bit for bit,
    in the same order (modules and outputs that share a scale share one truncation)."""
    src = source_config()
    weights = make_weights(src, dtype=torch.bfloat16, seed=5)
    config = SqueezeConfig(ranks=(2, 5, 8), alpha_policy=alpha_policy, alpha=3.0 if alpha_policy == "fixed" else None)
    serial = squeeze_state_dict(weights, src, config)
    threaded = squeeze_state_dict(weights, src, config, workers=3)
    assert list(serial.singular_values) == list(threaded.singular_values)
    for a, b in zip(serial.adapters, threaded.adapters):
        assert a.config == b.config and list(a.weights) == list(b.weights) and a.alphas == b.alphas
        for key in a.weights:
            assert torch.equal(a.weights[key], b.weights[key]), key
            assert a.weights[key].is_contiguous()  # safetensors writes contiguous tensors only
        check_adapter(b, weights, src, tol=2e-2)


def test_worker_errors_reach_the_caller():
    src = source_config()
    weights = make_weights(src, seed=6)
    key = f"{P}model.conv.lora_B.weight"
    weights[key] = weights[key].clone()
    weights[key][3, 0] = float("nan")
    with pytest.raises(LsqError, match="model.conv: lora_B holds NaN or Inf"):
        squeeze_state_dict(weights, src, SqueezeConfig(ranks=(2,)), workers=2)


def test_squeeze_refuses_bad_requests():
    src = source_config()
    weights = make_weights(src)
    with pytest.raises(LsqError, match="two targets give the same output 'r16-vllm'"):
        wide = source_config(r=64) | {"rank_pattern": {}}
        squeeze_state_dict(weights, wide, SqueezeConfig(ranks=(10, 16), serving="vllm"))
    with pytest.raises(LsqError, match="not below the source rank 12 of module model.layers.0.mlp.down_proj"):
        squeeze_state_dict(weights, src, SqueezeConfig(ranks=(12,)))
    with pytest.raises(LsqError, match=r"module model.conv: factor shapes .* disagree with rank 20"):
        squeeze_state_dict(weights, src | {"rank_pattern": {"down_proj": 12, "conv": 20}}, SqueezeConfig(ranks=(4,)))
    bad = dict(weights)
    bad[P + "model.embed_tokens.lora_embedding_B"] = bad[P + "model.embed_tokens.lora_embedding_B"].clone()
    bad[P + "model.embed_tokens.lora_embedding_B"][0, 0] = float("nan")
    with pytest.raises(LsqError, match="module model.embed_tokens: lora_B holds NaN"):
        squeeze_state_dict(bad, src, SqueezeConfig(ranks=(4,)))


# --------------------------------------------------------------------------------------------------
# squeezed_config: PEFT must resolve every module to its own rank and alpha


def peft_resolves_each_module(config: dict, ranks: dict, alphas: dict) -> None:
    for name in ranks:
        assert peft_rank_alpha(config, name) == (ranks[name], alphas[name]), f"PEFT resolves {name} wrongly"


def test_squeezed_config_with_dotted_suffix_names():
    ranks = {"layers.0.q": 4, "model.layers.0.q": 8, "base.model.layers.0.q": 8, "mlp.up": 8, "x.mlp.up": 2, "q": 8}
    alphas = {n: 2.0 * k for n, k in ranks.items()}
    config = squeezed_config({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "rank_pattern": {"q": 16}}, ranks, alphas)
    assert config["r"] == 8 and config["lora_alpha"] == 16.0
    peft_resolves_each_module(config, ranks, alphas)


@pytest.mark.parametrize(
    "ranks",
    [
        {"self.attn": 4, "model.self_attn": 8, "up": 8},  # the pattern "self.attn" matches "...self_attn"
        {"a.b": 4, "a_b": 8, "c": 8},  # equally long: "a.b" matches "a_b", not the other way round
        {"self.attn": 8, "self_attn": 4, "layers.0.self_attn": 8, "c": 8},
    ],
)
def test_squeezed_config_when_a_pattern_dot_matches_another_character(ranks):
    alphas = {n: float(k) for n, k in ranks.items()}
    config = squeezed_config({"peft_type": "LORA", "r": 1, "lora_alpha": 1}, ranks, alphas)
    peft_resolves_each_module(config, ranks, alphas)


def test_squeezed_config_lists_only_the_exceptions_without_suffix_clashes():
    ranks = {"model.layers.0.q_proj": 8, "model.layers.0.v_proj": 8, "model.layers.1.q_proj": 4}
    alphas = dict.fromkeys(ranks, 16.0)
    config = squeezed_config({"peft_type": "LORA", "r": 16, "lora_alpha": 32}, ranks, alphas)
    assert config["rank_pattern"] == {"model.layers.1.q_proj": 4} and config["alpha_pattern"] == {}
    peft_resolves_each_module(config, ranks, alphas)
    stale = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "rank_pattern": {"q": 2}}
    uniform = squeezed_config(stale, dict.fromkeys(ranks, 8), alphas)
    assert (uniform["r"], uniform["lora_alpha"], uniform["rank_pattern"], uniform["alpha_pattern"]) == (8, 16.0, {}, {})


# module-name pieces; "self_attn" against "self.attn" probes PEFT's unescaped '.' in patterns
TOKENS = ["model", "0", "1", "self_attn", "self", "attn", "q_proj", "q", "proj"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    names=st.lists(
        st.lists(st.sampled_from(TOKENS), min_size=1, max_size=3).map(".".join), min_size=1, max_size=8, unique=True
    ),
    data=st.data(),
)
def test_squeezed_config_resolves_every_module_under_peft(names, data):
    ranks = {n: data.draw(st.sampled_from([1, 2, 4, 8])) for n in names}
    alphas = {n: data.draw(st.sampled_from([1.0, 2.5, 16.0])) for n in names}
    source = {"peft_type": "LORA", "r": 64, "lora_alpha": 128, "alpha_pattern": {"q": 1}}
    config = squeezed_config(source, ranks, alphas)
    peft_resolves_each_module(config, ranks, alphas)
    for key in list(config["rank_pattern"]) + list(config["alpha_pattern"]):
        assert re.fullmatch(r"[\w.]+", key) and key in ranks  # full module names, nothing else
