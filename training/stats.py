"""Paired statistics for comparing base and aligned models on the same preference pairs.

On ~1000 pairs a few points of preference accuracy are within sampling noise, so every number the
evaluation reports comes with an interval, and every base-vs-aligned difference with a paired test.
Both models score the same pairs, so the tests are paired (McNemar, paired bootstrap): the
pair-to-pair variation that both share cancels, and the tests are far tighter than comparing two
independent intervals would be. Pure torch and math, so evaluation needs no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


def accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Share of pairs with margin > 0 along the last dim; a tie counts as wrong, as in evaluate.scores."""
    return (margins > 0).to(margins.dtype).mean(-1)


def mean(margins: torch.Tensor) -> torch.Tensor:
    return margins.mean(-1)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% at z=1.96).

    Wilson rather than the normal approximation because it stays inside [0, 1] and keeps its
    coverage near 0% and 100% (e.g. a refusal rate of 0/50). With no trials nothing is known: (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n]; got {successes} of {n}")
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # clamp only the last-bit rounding at 0/n and n/n
    return max(0.0, centre - half), min(1.0, centre + half)


def _log_binom_cdf_half(k: int, n: int) -> float:
    """log P[X <= k] for X ~ Bin(n, 1/2), summed in log space so n in the thousands cannot overflow."""
    log_norm = math.lgamma(n + 1) - n * math.log(2)
    terms = [log_norm - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k + 1)]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of `values`: the order statistics x_(k) and x_(n+1-k) of
    the sorted sample, k the largest whose coverage 1 - 2 P[Bin(n, 1/2) <= k - 1] is at least `level`; the
    sample's range where n is too small for any k (five or fewer at 95%)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("an interval needs at least one value")
    n, k = len(xs), 0
    while k + 1 <= n // 2 and 2 * math.exp(_log_binom_cdf_half(k, n)) <= 1 - level:
        k += 1
    return (xs[k - 1], xs[n - k]) if k else (xs[0], xs[-1])


def mcnemar_exact(base_correct: Sequence[bool], new_correct: Sequence[bool]) -> dict[str, Any]:
    """Exact two-sided McNemar test of paired right/wrong outcomes.

    Only discordant pairs carry evidence: b = right only under base, c = right only under new.
    Under no difference each is equally likely to fall either way, so min(b, c) is a Bin(b+c, 1/2)
    tail; exact rather than chi-squared because b+c is often small for close models.
    """
    if len(base_correct) != len(new_correct):
        raise ValueError(f"paired outcomes differ in length: {len(base_correct)} vs {len(new_correct)}")
    b = sum(1 for x, y in zip(base_correct, new_correct, strict=True) if x and not y)
    c = sum(1 for x, y in zip(base_correct, new_correct, strict=True) if y and not x)
    if b + c == 0:
        return {"b": 0, "c": 0, "p_value": 1.0}
    p = min(1.0, 2 * math.exp(_log_binom_cdf_half(min(b, c), b + c)))
    return {"b": b, "c": c, "p_value": float(p)}


def _paired(base: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # float64 on CPU: the seeded generator lives there, and N is small enough not to care
    base, new = base.detach().double().cpu().flatten(), new.detach().double().cpu().flatten()
    if base.numel() != new.numel():
        raise ValueError(f"paired margins differ in length: {base.numel()} vs {new.numel()}")
    if base.numel() == 0:
        raise ValueError("no pairs to compare")
    return base, new


def paired_bootstrap(base: torch.Tensor, new: torch.Tensor,
                     stat: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Bootstrap of stat(new) - stat(base), resampling whole pairs so the pairing is kept.

    `stat` reduces the last dimension (it sees [n_boot, N] resamples); the default is accuracy.
    The p-value is twice the smaller share of resampled differences on either side of zero: a
    coarse test (its floor is 2 / n_boot) that agrees with the interval.
    """
    base, new = _paired(base, new)
    stat = stat or accuracy
    gen = torch.Generator().manual_seed(seed)
    # one index matrix shared by both models is what makes the bootstrap paired
    idx = torch.randint(0, base.numel(), (n_boot, base.numel()), generator=gen)
    diffs = stat(new[idx]) - stat(base[idx])
    lo, hi = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=diffs.dtype)).tolist()
    share_le, share_ge = (diffs <= 0).double().mean().item(), (diffs >= 0).double().mean().item()
    return {"diff": float(stat(new) - stat(base)), "ci": (lo, hi),
            "p_value": float(min(1.0, 2 * min(share_le, share_ge)))}


def mean_interval(x: torch.Tensor, z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation interval of a mean; with N ~ 1000 the CLT makes this accurate enough.

    A single value gives no spread estimate, so its interval is (nan, nan) rather than a falsely
    exact point.
    """
    x = x.detach().double().flatten()
    if x.numel() < 2:
        return math.nan, math.nan
    m, half = x.mean().item(), z * x.std().item() / math.sqrt(x.numel())
    return m - half, m + half


def _r(x: float) -> float:
    return round(float(x), 4)


def describe(margins: torch.Tensor) -> dict[str, Any]:
    """Accuracy and mean margin of one model, each with its 95% interval."""
    m = margins.detach().double().cpu().flatten()
    if m.numel() == 0:
        raise ValueError("no pairs to describe")
    lo, hi = wilson_interval(int((m > 0).sum()), m.numel())
    mlo, mhi = mean_interval(m)
    return {"accuracy": _r(accuracy(m)), "accuracy_ci": [_r(lo), _r(hi)],
            "margin": _r(mean(m)), "margin_ci": [_r(mlo), _r(mhi)]}


def compare(base_margins: torch.Tensor, new_margins: torch.Tensor) -> dict[str, Any]:
    """describe(new) plus paired tests of new against base on the same pairs."""
    base, new = _paired(base_margins, new_margins)
    acc = paired_bootstrap(base, new, accuracy)
    margin = paired_bootstrap(base, new, mean)
    return {**describe(new), "vs_base": {
        "accuracy_diff": _r(acc["diff"]), "accuracy_diff_ci": [_r(v) for v in acc["ci"]],
        "mcnemar": mcnemar_exact((base > 0).tolist(), (new > 0).tolist()),
        "margin_diff": _r(margin["diff"]), "margin_diff_ci": [_r(v) for v in margin["ci"]]}}
