"""The squeeze core: a LoRA state dict in, one state dict (and config) per target rank out.

Each module is decomposed once (:mod:`lsq.linalg`) and every target takes a prefix of its singular
triplets, so asking for ranks 8, 16 and 32 costs one decomposition, not three. Policies that need the
spectra of all modules first (energy, budget, serving) get a cheap first pass that computes singular
values only. Tensors other than the LoRA factors (DoRA magnitudes, ``modules_to_save``, biases) are
carried over unchanged. Reading and writing folders is :mod:`lsq.adapter`'s job, not this module's.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lsq.adapter import LoraModule, find_modules, scale_of
from lsq.config import SqueezeConfig
from lsq.errors import LsqError
from lsq.linalg import NonFiniteFactor, Spectrum, factored_svd, randomized_factored_svd, truncate
from lsq.policies import Target, resolve_ranks

Progress = Callable[[Iterable[Any]], Iterable[Any]]


@dataclass
class SqueezedAdapter:
    """One output: a PEFT config dict, its state dict, and the numbers behind each module's rank."""

    name: str
    target: Target
    config: dict[str, Any]
    weights: dict[str, Tensor] = field(repr=False)
    ranks: dict[str, int]
    alphas: dict[str, float]


@dataclass
class SqueezeResult:
    """Every output of one squeeze, plus what the report needs about the source."""

    adapters: list[SqueezedAdapter]
    modules: list[LoraModule]
    singular_values: dict[str, Tensor]  # module -> all singular values of its source update (float64)
    widths: dict[str, int]  # module -> d_in + d_out (parameters per unit of rank)


def target_alpha(config: SqueezeConfig, module: LoraModule, k: int) -> float:
    """The new lora_alpha of ``module`` at rank ``k`` under the config's alpha policy."""
    if config.alpha_policy == "rank":
        return float(k)
    if config.alpha_policy == "fixed":
        assert config.alpha is not None
        return float(config.alpha)
    # keep-scale: s' = s, so alpha' = s * k (or s * sqrt(k) with rsLoRA); a float, never truncated
    return scale_of(module.alpha, module.rank, module.use_rslora) * (k**0.5 if module.use_rslora else k)


def load_factors(weights: Mapping[str, Tensor], module: LoraModule) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of a module as 2-D matrices ``(r, d_in)`` and ``(d_out, r)``, checked against the config.

    Conv factors ``A: (r, C_in, *kernel)``, ``B: (C_out, r, 1, ...)`` are flattened (the update of a
    conv LoRA is ``B.flatten(1) @ A.flatten(1)`` reshaped to the kernel).
    """
    return as_matrices(weights[module.key_a], weights[module.key_b], module)


def as_matrices(A: Tensor, B: Tensor, module: LoraModule) -> tuple[Tensor, Tensor]:
    """:func:`load_factors` on tensors already read."""
    if A.ndim < 2 or B.ndim < 2 or any(s != 1 for s in B.shape[2:]):
        raise LsqError(f"module {module.name}: unsupported factor shapes A {tuple(A.shape)}, B {tuple(B.shape)}")
    if not (A.is_floating_point() and B.is_floating_point()):
        raise LsqError(f"module {module.name}: factors must be floating point, got {A.dtype} and {B.dtype}")
    if A.shape[0] != module.rank or B.shape[1] != module.rank:
        raise LsqError(
            f"module {module.name}: factor shapes A {tuple(A.shape)}, B {tuple(B.shape)} disagree with "
            f"rank {module.rank} from adapter_config.json"
        )
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])


def decompose(A: Tensor, B: Tensor, module: LoraModule, config: SqueezeConfig, keep: int, *, exact: bool = False) -> Spectrum:
    """One module's spectrum under ``config`` (``exact`` forces :func:`factored_svd`, e.g. for policies).

    The factors' NaN/Inf check happens inside the decomposition (:class:`lsq.linalg.NonFiniteFactor`)
    and comes out as an :class:`LsqError` naming the module.
    """
    A, B = A.to(config.torch_device), B.to(config.torch_device)
    try:
        if config.method == "rsvd" and not exact:
            return randomized_factored_svd(
                A, B, module.scale, max(keep, 1), oversample=config.oversample, power_iters=config.power_iters,
                seed=config.seed, compute_dtype=config.torch_compute_dtype,
            )
        return factored_svd(A, B, module.scale, keep=keep, compute_dtype=config.torch_compute_dtype)
    except NonFiniteFactor as exc:
        raise LsqError(f"module {module.name}: {exc}") from None


def _spectra(weights: Mapping[str, Tensor], modules: list[LoraModule], config: SqueezeConfig, progress: Progress):
    """First pass: every module's singular values (exact, no singular vectors) and width."""
    spectra, widths = {}, {}
    for m in progress(modules):
        A, B = load_factors(weights, m)
        spectra[m.name] = decompose(A, B, m, config, 0, exact=True).S.double().cpu()
        widths[m.name] = A.shape[1] + B.shape[0]
    return spectra, widths


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """``map(fn, items)`` in order, on ``workers`` threads with at most ``2 * workers`` items in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="lsq-squeeze")
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pattern_clash(names: Iterable[str]) -> bool:
    """Whether a module name used as a PEFT pattern (``(.*\\.)?(name)$``) matches another module.

    A pattern ``b`` matches a dotted suffix ``s`` of ``a`` (or ``a`` itself) when both have the same
    length and agree outside ``b``'s dots, i.e. when ``s`` with ``b``'s dot positions masked is ``b``:
    a set lookup per suffix and dot layout instead of a regex per pair of modules.
    """
    layouts: dict[int, dict[frozenset[int], set[str]]] = {}  # length -> dot positions -> names
    for b in names:
        layouts.setdefault(len(b), {}).setdefault(frozenset(i for i, c in enumerate(b) if c == "."), set()).add(b)
    for a in names:
        for start in [0] + [i + 1 for i, c in enumerate(a) if c == "."]:
            s = a[start:]
            for dots, group in layouts.get(len(s), {}).items():
                masked = "".join("." if i in dots else c for i, c in enumerate(s))
                if masked != a and masked in group:
                    return True
    return False


def squeezed_config(source: Mapping[str, Any], ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """The source config with r, lora_alpha, rank_pattern and alpha_pattern set for new ranks.

    ``r`` and ``lora_alpha`` take the most common values; modules that differ go into the patterns by
    full module name, longest name first. When one module's name, read as PEFT reads a pattern (a regex
    matched against a dotted suffix, so its '.' matches any character), matches another module (a
    dotted suffix of it, or ``self.attn`` against ``m.self_attn``), every module is listed so each finds
    its own: a pattern can match only longer names or equally long names with fewer dots, which the
    order puts first.
    """
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    names = sorted(ranks, key=lambda n: (-len(n), n.count("."), n))
    uniform = len(set(ranks.values())) == 1 and len(set(alphas.values())) == 1
    suffix_clash = not uniform and _pattern_clash(names)
    config = dict(source)
    config["r"] = r
    config["lora_alpha"] = alpha
    config["rank_pattern"] = {n: ranks[n] for n in names if suffix_clash or ranks[n] != r}
    config["alpha_pattern"] = {n: alphas[n] for n in names if suffix_clash or alphas[n] != alpha}
    return config


def squeeze_state_dict(
    weights: Mapping[str, Tensor],
    source_config: Mapping[str, Any],
    config: SqueezeConfig,
    progress: Progress = lambda it: it,
    workers: int = 1,
) -> SqueezeResult:
    """Squeeze a PEFT LoRA state dict to every target of ``config``.

    Args:
        weights: the adapter's state dict (PEFT's saved keys); may be lazy (:class:`lsq.adapter.LazyWeights`).
        source_config: the adapter's ``adapter_config.json`` as a dict.
        config: targets, alpha policy, method and dtypes.
        progress: wraps the iteration over modules (e.g. ``tqdm``); identity by default.
        workers: modules decomposed at once in threads (reads stay in the calling thread, at most
            ``2 * workers`` modules in flight). Many small decompositions scale better across threads
            than inside each: the CLI sets torch to one thread and uses one worker per core.

    Returns:
        :class:`SqueezeResult`. For each output and module, ``s' B' A'`` equals the best rank-k
        approximation of the source ``s B A`` (exactly with ``method="exact"``; rsvd within its bound).

    Cost: one decomposition per module, ``O((d_in + d_out) r^2)``; peak memory is one module's work
    plus the outputs. Raises :class:`LsqError` on bad shapes, non-finite values or impossible ranks.
    """
    modules = find_modules(list(weights.keys()), source_config)
    source_ranks = {m.name: m.rank for m in modules}
    targets = config.targets
    spectra = widths = None
    if any(t.needs_spectrum for t in targets):
        spectra, widths = _spectra(weights, modules, config, progress)
    plans = [(t, resolve_ranks(t, source_ranks, spectra, widths)) for t in targets]
    names = [t.folder_name(Counter(r.values()).most_common(1)[0][0]) for t, r in plans]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LsqError(f"two targets give the same output {dup!r}; drop one")

    factor_keys = {k for m in modules for k in (m.key_a, m.key_b)}
    passthrough = {k: weights[k] for k in weights.keys() if k not in factor_keys}  # loaded once, shared
    outputs = [dict(passthrough) for _ in plans]
    alphas: list[dict[str, float]] = [{} for _ in plans]
    singular_values, all_widths = {}, {}

    def one(item: tuple[LoraModule, Tensor, Tensor]):
        m, raw_a, raw_b = item
        A, B = as_matrices(raw_a, raw_b, m)
        out_a, out_b = config.torch_out_dtype(A.dtype), config.torch_out_dtype(B.dtype)
        spec = decompose(A, B, m, config, max(ranks[m.name] for _, ranks in plans))
        # outputs that share a target scale share factors: truncate once at their largest rank, cast
        # once, and take prefixes (s' B'_k A'_k is then the rank-k truncation for every k of the group)
        by_scale: dict[float, list[int]] = {}
        module_alphas = []
        for i, (_, ranks) in enumerate(plans):
            k = ranks[m.name]
            module_alphas.append(alpha := target_alpha(config, m, k))
            by_scale.setdefault(scale_of(alpha, k, m.use_rslora), []).append(i)
        factors = {}
        for new_scale, group in by_scale.items():
            new_A, new_B = truncate(spec, max(plans[i][1][m.name] for i in group), new_scale)
            new_A, new_B = new_A.to("cpu", out_a), new_B.to("cpu", out_b)
            for i in group:
                k = plans[i][1][m.name]
                factors[i] = (new_A[:k].reshape((k, *raw_a.shape[1:])),
                              new_B[:, :k].contiguous().reshape((raw_b.shape[0], k, *raw_b.shape[2:])))
        return m, spec.S.double().cpu(), A.shape[1] + B.shape[0], module_alphas, factors

    read = ((m, weights[m.key_a], weights[m.key_b]) for m in progress(modules))  # reads stay in this thread
    for m, S, width, module_alphas, factors in _ordered_map(one, read, workers):
        singular_values[m.name], all_widths[m.name] = S, width
        for i, (new_a, new_b) in factors.items():
            alphas[i][m.name] = module_alphas[i]
            outputs[i][m.key_a], outputs[i][m.key_b] = new_a, new_b
    adapters = [
        SqueezedAdapter(name, t, squeezed_config(source_config, ranks, alphas[i]), outputs[i], ranks, alphas[i])
        for i, ((t, ranks), name) in enumerate(zip(plans, names))
    ]
    return SqueezeResult(adapters, modules, singular_values, all_widths)
