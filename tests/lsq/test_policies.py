"""Rank policies (:mod:`lsq.policies`) against brute force on tiny cases."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsq.errors import LsqError
from lsq.policies import SERVING_RANKS, Target, budget_ranks, energy_rank, parse_targets, resolve_ranks, snap_up

VLLM = SERVING_RANKS["vllm"]


def spectrum(max_len: int = 8, min_len: int = 1):
    """Descending non-negative singular values, with ties and zeros likely."""
    value = st.one_of(st.just(0.0), st.integers(0, 4).map(float), st.floats(0, 10, allow_subnormal=False))
    return st.lists(value, min_size=min_len, max_size=max_len).map(
        lambda v: torch.tensor(sorted(v, reverse=True), dtype=torch.float64)
    )


def kept(spectra, ranks) -> float:
    return sum(float(spectra[n][:k].square().sum()) for n, k in ranks.items())


# --------------------------------------------------------------------------------------------------
# energy


def brute_energy_rank(S: torch.Tensor, tau: float) -> int:
    """Smallest k whose first k squared singular values reach ``tau`` of the total (plain loop)."""
    sq = [float(s) ** 2 for s in S]
    total = sum(sq)
    if total == 0:
        return 1
    acc = 0.0
    for k, v in enumerate(sq, 1):
        acc += v
        if acc >= tau * total:
            return k
    return len(sq)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(S=spectrum(), tau=st.floats(1e-6, 1.0))
def test_energy_rank_matches_brute_force(S, tau):
    k = energy_rank(S, tau)
    # thresholds within 1e-9 of a cumulative fraction may round either way: bracket them
    assert brute_energy_rank(S, tau * (1 - 1e-9)) <= k <= brute_energy_rank(S, min(1.0, tau * (1 + 1e-9)))
    assert 1 <= k <= len(S)
    assert energy_rank(S, min(1.0, tau + 0.05)) >= k  # monotone in tau


def test_energy_rank_edges():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert energy_rank(S, 1.0) == 3  # tau = 1 needs every nonzero value and no zero one
    assert energy_rank(S, 9 / 14) == 1  # exactly 9 of 14: reached at k = 1
    assert energy_rank(S, 9 / 14 + 1e-6) == 2
    assert energy_rank(torch.zeros(4, dtype=torch.float64), 0.9) == 1  # a zero update keeps rank 1
    assert energy_rank(torch.tensor([1.0] + [1e-5] * 20, dtype=torch.float64), 1.0) == 21
    # a relative slack of 1e-12 absorbs rounding: a tail holding 2e-17 of the energy does not count
    assert energy_rank(torch.tensor([1.0] + [1e-9] * 20, dtype=torch.float64), 1.0) == 1
    assert energy_rank(torch.tensor([2.0], dtype=torch.bfloat16), 0.5) == 1


# --------------------------------------------------------------------------------------------------
# budget


def brute_budget(spectra, widths, budget, caps):
    """Largest kept sum of sigma^2 over every rank assignment with 1 <= k <= min(cap, len(S)) that fits."""
    names = list(spectra)
    ranges = [range(1, min(caps[n], len(spectra[n])) + 1) for n in names]
    best = None
    for ks in itertools.product(*ranges):
        if sum(k * widths[n] for n, k in zip(names, ks)) <= budget:
            value = kept(spectra, dict(zip(names, ks)))
            best = value if best is None else max(best, value)
    return best


@st.composite
def budget_case(draw, equal_widths: bool):
    n = draw(st.integers(1, 3))
    names = [f"model.layers.{i}.proj" for i in range(n)]
    spectra = {m: draw(spectrum(max_len=5)) for m in names}
    width = draw(st.integers(1, 9))
    widths = {m: width if equal_widths else draw(st.integers(1, 9)) for m in names}
    caps = {m: draw(st.integers(1, 6)) for m in names}
    floor = sum(widths.values())
    budget = draw(st.integers(floor, floor + 6 * max(widths.values()) * n))
    return spectra, widths, budget, caps


def check_feasible(ranks, spectra, widths, budget, caps):
    assert set(ranks) == set(spectra)
    assert sum(k * widths[n] for n, k in ranks.items()) <= budget
    for n, k in ranks.items():
        assert 1 <= k <= max(1, min(caps[n], len(spectra[n])))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(case=budget_case(equal_widths=True))
def test_budget_is_optimal_when_widths_are_equal(case):
    spectra, widths, budget, caps = case
    ranks = budget_ranks(spectra, widths, budget, caps)
    check_feasible(ranks, spectra, widths, budget, caps)
    assert kept(spectra, ranks) == pytest.approx(brute_budget(spectra, widths, budget, caps), rel=1e-12, abs=1e-12)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(case=budget_case(equal_widths=False))
def test_budget_with_unequal_widths_is_feasible_near_optimal_and_monotone(case):
    spectra, widths, budget, caps = case
    ranks = budget_ranks(spectra, widths, budget, caps)
    check_feasible(ranks, spectra, widths, budget, caps)
    got, best = kept(spectra, ranks), brute_budget(spectra, widths, budget, caps)
    assert got <= best * (1 + 1e-12) + 1e-12
    # greedy by gain per parameter loses at most one item against the LP relaxation: the largest gain
    largest_gain = max((float(S[1]) ** 2 for n, S in spectra.items() if len(S) > 1 and caps[n] > 1), default=0.0)
    assert best - got <= largest_gain * (1 + 1e-12) + 1e-12
    more = budget_ranks(spectra, widths, budget + max(widths.values()), caps)
    assert kept(spectra, more) >= got * (1 - 1e-12)  # a larger budget never keeps less


def test_budget_below_rank_one_everywhere_is_refused():
    spectra = {"a": torch.ones(3, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}
    with pytest.raises(LsqError, match="minimum of 30 parameters"):
        budget_ranks(spectra, {"a": 10, "b": 20}, 29, {"a": 3, "b": 3})
    assert budget_ranks(spectra, {"a": 10, "b": 20}, 30, {"a": 3, "b": 3}) == {"a": 1, "b": 1}


def test_budget_fills_a_narrow_module_after_a_wide_one_stops_fitting():
    spectra = {"wide": torch.tensor([5.0, 4.0, 3.0]).double(), "narrow": torch.tensor([1.0, 0.3, 0.2]).double()}
    widths = {"wide": 100, "narrow": 1}
    # after rank 1 for both (101 parameters) the wide module's next triplet leads (16/100 per parameter
    # against 0.09/1) but fits only from a budget of 201
    assert budget_ranks(spectra, widths, 150, {"wide": 3, "narrow": 3}) == {"wide": 1, "narrow": 3}
    assert budget_ranks(spectra, widths, 201, {"wide": 3, "narrow": 3}) == {"wide": 2, "narrow": 1}
    assert budget_ranks(spectra, widths, 201, {"wide": 1, "narrow": 2}) == {"wide": 1, "narrow": 2}  # caps hold


# --------------------------------------------------------------------------------------------------
# serving, resolution, targets


def test_snap_up():
    for rank in range(1, 513):
        assert snap_up(rank, "vllm") == min(v for v in VLLM if v >= rank)


def test_snap_up_past_the_largest_rank():
    with pytest.raises(LsqError, match="513 exceeds the largest rank vllm accepts \\(512\\)"):
        snap_up(513, "vllm")


SOURCES = {"model.layers.0.self_attn.q_proj": 64, "model.layers.0.mlp.down_proj": 32, "lm_head": 48}


def test_uniform_rank():
    assert resolve_ranks(Target("rank", 8), SOURCES) == {n: 8 for n in SOURCES}
    assert resolve_ranks(Target("rank", 31), SOURCES) == {n: 31 for n in SOURCES}


@pytest.mark.parametrize("k", [32, 40, 64, 100])
def test_uniform_rank_not_below_a_source_rank_names_the_module(k):
    expected = rf"rank {k} is not below the source rank 32 of module model\.layers\.0\.mlp\.down_proj"
    with pytest.raises(LsqError, match=expected):
        resolve_ranks(Target("rank", k), SOURCES)


def test_uniform_rank_is_snapped_for_serving():
    assert resolve_ranks(Target("rank", 9, "vllm"), SOURCES) == {n: 16 for n in SOURCES}
    assert resolve_ranks(Target("rank", 8, "vllm"), SOURCES) == {n: 8 for n in SOURCES}
    with pytest.raises(LsqError, match=r"rank 32 \(snapped up for vllm\) is not below the source rank 32"):
        resolve_ranks(Target("rank", 17, "vllm"), SOURCES)


def _spectra_with_energy_ranks(wanted: dict[str, int], length: int, tau: float):
    """Spectra whose energy rank at ``tau`` is ``wanted[name]`` (a flat head, then a negligible tail)."""
    spectra = {n: torch.cat([torch.ones(k), torch.full((length - k,), 1e-6)]).double() for n, k in wanted.items()}
    assert {n: energy_rank(S, tau) for n, S in spectra.items()} == wanted
    return spectra


def test_energy_per_module_and_serving():
    wanted = {"model.layers.0.self_attn.q_proj": 5, "model.layers.0.mlp.down_proj": 12, "lm_head": 40}
    spectra = _spectra_with_energy_ranks(wanted, 48, 0.99)
    widths = dict.fromkeys(SOURCES, 100)
    # per module, capped at the source rank (down_proj's 12 <= 32; lm_head's 40 <= 48)
    assert resolve_ranks(Target("energy", 0.99), SOURCES, spectra, widths) == wanted
    capped = resolve_ranks(Target("energy", 0.99), {**SOURCES, "lm_head": 20}, spectra, widths)
    assert capped["lm_head"] == 20
    # serving: one rank for all, the largest energy rank snapped up (40 -> 64); 64 exceeds the
    # smallest source rank (32), so no serving rank meets the threshold: refused, naming the module
    with pytest.raises(LsqError, match=r"--energy 0.99: module lm_head needs rank 40; the vllm rank .*\(64\) exceeds the source rank 32"):
        resolve_ranks(Target("energy", 0.99, "vllm"), SOURCES, spectra, widths)
    small = {n: k for n, k in wanted.items() if k <= 12}
    uniform = resolve_ranks(Target("energy", 0.99, "vllm"), dict.fromkeys(small, 64), spectra, widths)
    assert uniform == dict.fromkeys(small, 16)
    with pytest.raises(ValueError, match="needs the spectra"):
        resolve_ranks(Target("energy", 0.99), SOURCES)


def test_budget_and_serving():
    spectra = {n: torch.linspace(2, 1, 64, dtype=torch.float64) for n in SOURCES}
    widths = {"model.layers.0.self_attn.q_proj": 100, "model.layers.0.mlp.down_proj": 200, "lm_head": 300}
    ranks = resolve_ranks(Target("budget", 6000), SOURCES, spectra, widths)
    assert ranks == budget_ranks(spectra, widths, 6000, SOURCES)
    assert sum(k * widths[n] for n, k in ranks.items()) <= 6000
    # serving: the largest accepted rank whose uniform adapter fits: 8 * 600 <= 6000 < 16 * 600
    assert resolve_ranks(Target("budget", 6000, "vllm"), SOURCES, spectra, widths) == {n: 8 for n in SOURCES}
    assert resolve_ranks(Target("budget", 600, "vllm"), SOURCES, spectra, widths) == {n: 1 for n in SOURCES}
    with pytest.raises(LsqError, match=r"--budget 599 is below the minimum of 600 parameters"):
        resolve_ranks(Target("budget", 599, "vllm"), SOURCES, spectra, widths)


@pytest.mark.parametrize(
    ("target", "uniform", "name"),
    [
        (Target("rank", 8), None, "r8"),
        (Target("energy", 0.95), None, "energy0.95"),
        (Target("energy", 1.0), None, "energy1"),
        (Target("energy", 0.9999999), None, "energy0.9999999"),  # not rounded to "energy1"
        (Target("budget", 1000), None, "budget1000"),
        (Target("budget", 1000000), None, "budget1000000"),  # not "budget1e+06"
        (Target("budget", 123456789), None, "budget123456789"),
        (Target("rank", 16, "vllm"), 16, "r16-vllm"),
        (Target("energy", 0.95, "vllm"), 32, "energy0.95-vllm-r32"),
        (Target("budget", 5000000, "vllm"), 8, "budget5000000-vllm-r8"),
    ],
)
def test_folder_names(target, uniform, name):
    assert target.folder_name(uniform) == name


def test_parse_targets_keeps_the_cli_order_and_serving():
    targets = parse_targets(ranks=(8, 4), energy=(0.9,), budget=(1000,), serving="vllm")
    assert [(t.policy, t.value, t.serving) for t in targets] == [
        ("rank", 8, "vllm"), ("rank", 4, "vllm"), ("energy", 0.9, "vllm"), ("budget", 1000, "vllm")
    ]
    assert [t.needs_spectrum for t in targets] == [False, False, True, True]
    assert parse_targets() == []
    assert parse_targets(energy=(0.5,)) == [Target("energy", 0.5, None)]
