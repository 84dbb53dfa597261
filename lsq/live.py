"""Resize the LoRA modules of a live ``PeftModel`` in place (the basis of In-Squeeze).

Each LoRA layer's factors are decomposed from the factors (:func:`lsq.linalg.factored_svd`) and
replaced by the rank-k factors of the best rank-k approximation of its update; ``r``, ``lora_alpha``
and ``scaling`` of the layer and the model's ``peft_config`` are updated so that ``save_pretrained``
writes a consistent adapter. DoRA magnitudes and LoRA biases are kept. New ``nn.Parameter`` objects
replace the old ones (shapes change), so an optimizer over the old ones must be rebuilt;
:class:`ModuleResize` carries the linear maps that relate old and new factors
(``A' = map_a @ A``, ``B' = B @ map_b``) for carrying optimizer state over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lsq.adapter import scale_of
from lsq.errors import LsqError
from lsq.linalg import factored_svd, truncate
from lsq.squeeze import squeezed_config

PEFT_PREFIX = "base_model.model."


@dataclass
class ModuleResize:
    """What changed in one module. Maps are in float32 on the module's device."""

    name: str
    old_rank: int
    new_rank: int
    old_alpha: float
    new_alpha: float
    old_scale: float
    new_scale: float
    retained_energy: float
    relative_error: float
    old_params: tuple[nn.Parameter, nn.Parameter] = field(repr=False)  # (A, B) before
    new_params: tuple[nn.Parameter, nn.Parameter] = field(repr=False)  # (A', B') after
    map_a: Tensor = field(repr=False)  # (k, r): A' = map_a @ A  (A flattened to (r, d_in))
    map_b: Tensor = field(repr=False)  # (r, k): B' = B @ map_b  (B flattened to (d_out, r))


def lora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """``{module name without the PEFT prefix: LoRA layer}`` for every layer holding ``adapter_name``."""
    layers = {}
    for name, module in model.named_modules():
        has = adapter_name in getattr(module, "lora_A", {}) or adapter_name in getattr(module, "lora_embedding_A", {})
        if has and hasattr(module, "scaling"):
            layers[name.removeprefix(PEFT_PREFIX)] = module
    return layers


def _factors(layer: nn.Module, adapter: str) -> tuple[nn.Parameter, nn.Parameter, bool]:
    if adapter in getattr(layer, "lora_embedding_A", {}):
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter], True
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, False


def _new_alpha(policy: str, alpha: float | None, old_alpha: float, r: int, k: int, rslora: bool) -> float:
    if policy == "rank":
        return float(k)
    if policy == "fixed":
        if alpha is None:
            raise LsqError("alpha_policy 'fixed' needs an alpha")
        return float(alpha)
    return scale_of(old_alpha, r, rslora) * (k**0.5 if rslora else k)


def _least_squares_map(X: Tensor, Y: Tensor, stored_dtype: torch.dtype) -> Tensor:
    """Least-norm ``M`` minimising ``||X @ M - Y||``: ``X: (d, r)``, ``Y: (d, k)`` -> ``(r, k)`` (exact when Y = X M).

    Singular values of ``X`` below ``max(d, r) * eps(stored_dtype) * sigma_max`` (numpy's ``matrix_rank``
    tolerance: the rounding level of the stored factor) count as zero. A factor that is rank-deficient up to
    rounding (an update whose numerical rank is below k) would otherwise give a map with entries of 1e3 and
    more, and a projected second moment millions of times too large, freezing that rank slot under Adam.
    Cost: one ``d x r`` SVD, O(d r^2).
    """
    return torch.linalg.pinv(X, rtol=max(X.shape) * torch.finfo(stored_dtype).eps) @ Y


@torch.no_grad()
def resize_lora_(
    model: nn.Module,
    rank: int | Mapping[str, int],
    *,
    adapter_name: str = "default",
    alpha_policy: str = "keep-scale",
    alpha: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> list[ModuleResize]:
    """Resize every LoRA layer of ``model`` (a ``PeftModel`` or a model with LoRA layers) to ``rank``.

    Args:
        rank: one rank for all layers, or ``{module name: rank}`` (names without ``base_model.model.``);
            layers not in the mapping keep their rank.
        alpha_policy: ``keep-scale`` (default), ``rank`` or ``fixed`` (with ``alpha``), as in squeezing.

    Each new rank must be at least 1 and below the layer's current rank. The model's output changes
    only by the discarded singular triplets (Eckart-Young). Cost per layer as
    :func:`lsq.linalg.factored_svd` plus two least-squares maps (an SVD of each factor).
    """
    layers = lora_layers(model, adapter_name)
    if not layers:
        raise LsqError(f"model has no LoRA layers for adapter {adapter_name!r}")
    wanted = {n: rank for n in layers} if isinstance(rank, int) else dict(rank)
    unknown = sorted(set(wanted) - set(layers))
    if unknown:
        raise LsqError(f"no LoRA layer named {unknown[0]!r} (of {len(layers)} layers)")
    peft_config = getattr(model, "peft_config", {}).get(adapter_name)
    rslora = bool(getattr(peft_config, "use_rslora", False))
    changes = []
    for name, k in wanted.items():
        layer = layers[name]
        r = layer.r[adapter_name]
        if not 1 <= k < r:
            raise LsqError(f"layer {name}: new rank {k} must be at least 1 and below its rank {r}")
        A, B, is_embedding = _factors(layer, adapter_name)
        A2, B2 = A.reshape(r, -1), B.reshape(B.shape[0], r)
        spec = factored_svd(A2, B2, layer.scaling[adapter_name], keep=k, compute_dtype=compute_dtype)
        old_alpha, old_scale = float(layer.lora_alpha[adapter_name]), float(layer.scaling[adapter_name])
        new_alpha = _new_alpha(alpha_policy, alpha, old_alpha, r, k, rslora)
        new_A2, new_B2 = truncate(spec, k, scale_of(new_alpha, k, rslora))
        map_a = _least_squares_map(A2.to(compute_dtype).mT, new_A2.mT, A.dtype).mT.float()  # (k, r)
        map_b = _least_squares_map(B2.to(compute_dtype), new_B2, B.dtype).float()  # (r, k)
        new_A = nn.Parameter(new_A2.reshape((k, *A.shape[1:])).to(A.dtype), requires_grad=A.requires_grad)
        new_B = nn.Parameter(new_B2.reshape((B.shape[0], k, *B.shape[2:])).to(B.dtype), requires_grad=B.requires_grad)
        _install(layer, adapter_name, new_A, new_B, is_embedding)
        layer.r[adapter_name] = k
        layer.lora_alpha[adapter_name] = new_alpha
        layer.scaling[adapter_name] = scale_of(new_alpha, k, rslora)
        energy = spec.energy
        changes.append(
            ModuleResize(
                name, r, k, old_alpha, new_alpha, old_scale, layer.scaling[adapter_name], float(energy[k - 1]), spec.relative_error(k), (A, B), (new_A, new_B), map_a, map_b,
            )
        )
    if peft_config is not None:
        _update_config(peft_config, layers, adapter_name)
    return changes


def _install(layer: nn.Module, adapter: str, new_A: nn.Parameter, new_B: nn.Parameter, is_embedding: bool) -> None:
    """Put the new factors into the layer; the sub-modules' size attributes follow the new rank."""
    if is_embedding:
        layer.lora_embedding_A[adapter] = new_A
        layer.lora_embedding_B[adapter] = new_B
        return
    mod_a, mod_b = layer.lora_A[adapter], layer.lora_B[adapter]
    mod_a.weight, mod_b.weight = new_A, new_B
    k = new_A.shape[0]
    for mod, attrs in ((mod_a, ("out_features", "out_channels")), (mod_b, ("in_features", "in_channels"))):
        for attr in attrs:
            if hasattr(mod, attr):
                setattr(mod, attr, k)


def _update_config(peft_config, layers: Mapping[str, nn.Module], adapter: str) -> None:
    """Make ``peft_config`` describe the layers' current ranks and alphas (r, lora_alpha, patterns)."""
    ranks = {n: int(layer.r[adapter]) for n, layer in layers.items()}
    alphas = {n: float(layer.lora_alpha[adapter]) for n, layer in layers.items()}
    new = squeezed_config({}, ranks, alphas)
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        setattr(peft_config, key, new[key])
