"""Paired statistics against hand-computed values and direct (exact integer) reference computations."""

import math
from fractions import Fraction

import pytest
import torch

from training.stats import (
    compare,
    describe,
    mcnemar_exact,
    mean_interval,
    median_interval,
    paired_bootstrap,
    wilson_interval,
)


def reference_mcnemar_p(b: int, c: int) -> float:
    """2 * P[X <= min(b, c)], X ~ Bin(b + c, 1/2), in exact integer arithmetic."""
    n = b + c
    tail = Fraction(sum(math.comb(n, i) for i in range(min(b, c) + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))


def outcomes(b: int, c: int, both: int = 0, neither: int = 0) -> tuple[list[bool], list[bool]]:
    base = [True] * b + [False] * c + [True] * both + [False] * neither
    new = [False] * b + [True] * c + [True] * both + [False] * neither
    return base, new


@pytest.mark.parametrize("k, n, expected", [
    (50, 100, (0.4038, 0.5962)),   # centre stays at 0.5; half-width 1.96/1.038416 * sqrt(0.0025 + 0.000096)
    (0, 10, (0.0, 0.2775)),        # upper = 2 * (1.96^2 / 20) / (1 + 1.96^2 / 10)
    (10, 10, (0.7225, 1.0)),       # the mirror image
    (81, 100, (0.7222, 0.8749)),
])
def test_wilson_known_values(k, n, expected):
    lo, hi = wilson_interval(k, n)
    assert (round(lo, 4), round(hi, 4)) == expected


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_mcnemar_small_hand_computed():
    # P[X <= 1] for Bin(10, 1/2) = (C(10,0) + C(10,1)) / 1024 = 11/1024; two-sided 22/1024
    base, new = outcomes(b=1, c=9, both=5, neither=3)
    result = mcnemar_exact(base, new)
    assert (result["b"], result["c"]) == (1, 9)
    assert math.isclose(result["p_value"], 22 / 1024, rel_tol=1e-12)
    # concordant pairs carry no evidence
    assert mcnemar_exact(*outcomes(1, 9))["p_value"] == result["p_value"]


@pytest.mark.parametrize("b, c", [(0, 5), (3, 4), (400, 500), (2400, 2600), (5, 0)])
def test_mcnemar_matches_exact_reference(b, c):
    p = mcnemar_exact(*outcomes(b, c))["p_value"]
    assert math.isclose(p, reference_mcnemar_p(b, c), rel_tol=1e-9)


def test_mcnemar_large_and_degenerate():
    assert mcnemar_exact(*outcomes(400, 500))["p_value"] < 0.01
    assert mcnemar_exact(*outcomes(450, 450))["p_value"] == 1.0
    none = mcnemar_exact(*outcomes(0, 0, both=7, neither=2))
    assert none == {"b": 0, "c": 0, "p_value": 1.0}
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def synthetic(shift: float, n: int = 1000, seed: int = 1,
              centred: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins where new = base + shift + noise; centred noise makes the sample mean diff exactly `shift`."""
    g = torch.Generator().manual_seed(seed)
    base, noise = torch.randn(n, generator=g), 0.3 * torch.randn(n, generator=g)
    return base, base + shift + (noise - noise.mean() if centred else noise)


def test_bootstrap_covers_shift_and_is_significant():
    base, new = synthetic(0.2)
    margin = paired_bootstrap(base, new, lambda x: x.mean(-1))
    lo, hi = margin["ci"]
    assert lo < 0.2 < hi and lo < margin["diff"] < hi
    assert margin["p_value"] < 0.01
    acc = paired_bootstrap(base, new)   # default: accuracy
    assert acc["ci"][0] > 0 and acc["p_value"] < 0.01
    observed = ((new > 0).float().mean() - (base > 0).float().mean()).item()
    assert math.isclose(acc["diff"], observed, abs_tol=1e-6)


def test_bootstrap_interval_has_nominal_coverage():
    # over fresh samples the 95% interval should hold the true mean shift about 95% of the time
    hits = 0
    for seed in range(200):
        base, new = synthetic(0.1, n=200, seed=seed, centred=False)
        lo, hi = paired_bootstrap(base, new, lambda x: x.mean(-1), n_boot=500, seed=seed)["ci"]
        hits += lo < 0.1 < hi
    assert 0.89 <= hits / 200 <= 0.99


def test_bootstrap_deterministic_and_null():
    base, new = synthetic(0.0)
    assert paired_bootstrap(base, new, seed=3) == paired_bootstrap(base, new, seed=3)
    same = paired_bootstrap(base, base.clone())
    assert same["diff"] == 0.0 and same["ci"] == (0.0, 0.0) and same["p_value"] == 1.0
    assert paired_bootstrap(base, new, lambda x: x.mean(-1))["p_value"] > 0.05
    with pytest.raises(ValueError):
        paired_bootstrap(base, new[:-1])


def test_mean_interval_matches_formula():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    lo, hi = mean_interval(x)
    half = 1.96 * math.sqrt(5 / 3) / 2   # sample std sqrt(5/3), sqrt(n) = 2
    assert math.isclose(lo, 2.5 - half) and math.isclose(hi, 2.5 + half)
    assert all(math.isnan(v) for v in mean_interval(torch.tensor([1.0])))


def reference_median_rank(n: int, level: float) -> int:
    """The largest k with 1 - 2 P[X <= k - 1] >= level, X ~ Bin(n, 1/2), in exact integer arithmetic."""
    k = 0
    while k + 1 <= n // 2 and 1 - 2 * Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n) >= level:
        k += 1
    return k


@pytest.mark.parametrize("n", [6, 10, 21, 41, 61, 200])
def test_median_interval_takes_the_order_statistics_exact_arithmetic_gives(n):
    values = [float(v) for v in torch.randperm(n, generator=torch.Generator().manual_seed(n))]  # 0 .. n-1 shuffled
    k = reference_median_rank(n, 0.95)
    assert median_interval(values) == ((k - 1, n - k) if k else (0, n - 1))
    assert n < 10 or 0 < k - 1 < n - k < n - 1  # from ten values on, narrower than the range


def test_median_interval_of_too_few_values_is_their_range_and_of_none_an_error():
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert median_interval([5.0]) == (5.0, 5.0)
    with pytest.raises(ValueError):
        median_interval([])


def test_median_interval_holds_the_true_median_about_as_often_as_it_says():
    hits, trials = 0, 400
    g = torch.Generator().manual_seed(0)
    for _ in range(trials):
        sample = torch.randn(41, generator=g).exp()  # skewed, median 1
        lo, hi = median_interval(sample.tolist())
        hits += lo <= 1.0 <= hi
    assert 0.93 <= hits / trials <= 0.995


def test_compare_and_describe_shapes_and_ranges():
    base, new = synthetic(0.2)
    row = describe(base)
    assert list(row) == ["accuracy", "accuracy_ci", "margin", "margin_ci"]
    result = compare(base, new)
    assert list(result) == ["accuracy", "accuracy_ci", "margin", "margin_ci", "vs_base"]
    assert result["accuracy"] == round((new > 0).double().mean().item(), 4)
    lo, hi = result["accuracy_ci"]
    assert 0 <= lo < result["accuracy"] < hi <= 1
    lo, hi = result["margin_ci"]
    assert lo < result["margin"] < hi
    vs = result["vs_base"]
    assert set(vs) == {"accuracy_diff", "accuracy_diff_ci", "mcnemar", "margin_diff", "margin_diff_ci"}
    assert vs["accuracy_diff_ci"][0] <= vs["accuracy_diff"] <= vs["accuracy_diff_ci"][1]
    assert vs["margin_diff_ci"][0] < 0.2 < vs["margin_diff_ci"][1]
    assert vs["mcnemar"]["c"] > vs["mcnemar"]["b"] and vs["mcnemar"]["p_value"] < 0.01
    assert isinstance(vs["mcnemar"]["p_value"], float)
    rounded = (result["accuracy"], result["margin"], vs["accuracy_diff"], vs["margin_diff"],
               *vs["margin_diff_ci"])
    for value in rounded:
        assert value == round(value, 4)
