"""The statistics behind every verdict of the lab: a paired bootstrap over seeds and test examples,
Holm's correction across the conditions of a run, and three verdicts against a stated minimum effect.

An *effect* is one number per seed, computed from the runs with and without the treatment of that
seed (positive = the claim holds). Runs of one seed share the seed and the test set, so the arms are
paired. The sampling error has two sources, and the bootstrap resamples both:

* seeds (initialisation and batch order): seeds are drawn with replacement;
* the fixed test set: each test example gets a Poisson(1) weight (the Poisson bootstrap, Hanley &
  MacGibbon 2006), the same weights for every run of a replicate, so that arms stay paired. Effects
  that do not read test accuracies (steps to a target, gradient norms) only resample seeds.

An effect may be *censored*: "BN reached the target at step 300, the run without BN had not reached it
by step 1500" only says that the effect is at least log2(1500 / 300). Such an effect is an interval
``(lo, hi)`` (``hi = inf`` here); the test for the claim uses the lower ends and the test against it the
upper ends, so a censored value never counts for more than it shows.

The bootstrap estimates the standard error of the mean effect; the 95% interval and the one-sided
p-values then use Student's t with (seeds - 1) degrees of freedom (with 5 seeds a percentile bootstrap
alone would call five positive effects certain: no resample of them has a mean <= 0).

Verdict of a condition, with ``p_for`` the p-value of "effect <= 0" and ``p_against`` that of
"effect >= minimum effect", both Holm-adjusted over all conditions of the run:

* ``supported``: ``p_for < alpha`` and the point estimate reaches the minimum effect;
* ``contradicted``: ``p_against < alpha`` (the data rule out an effect of the claimed size);
* ``inconclusive``: neither, or fewer than :data:`MIN_SEEDS` seeds.

"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm as normal
from scipy.stats import t as student_t

__all__ = ["ALPHA", "MIN_SEEDS", "Censored", "Estimate", "bootstrap", "holm", "verdict"]

ALPHA = 0.05
#: Bootstrap replicates (the standard error they estimate is within ~2% of its limit).
REPLICATES = 2000
#: Fewer seeds than this never give a verdict other than ``inconclusive``.
MIN_SEEDS = 5


@dataclass(frozen=True)
class Censored:
    """An effect known only to lie in ``[lo, hi]`` (one end may be infinite)."""

    lo: float
    hi: float


@dataclass
class Estimate:
    """Point estimate, percentile 95% interval and one-sided bootstrap p-values of one condition."""

    effect: float  # mean over seeds of the effects (of their lower ends when censored)
    ci95: tuple[float, float]
    p_for: float  # p-value of "effect <= 0", from the lower ends
    p_against: float  # p-value of "effect >= min_effect", from the upper ends
    n_seeds: int
    censored: int  # seeds whose effect is an interval
    resampled_examples: bool


def _as_bounds(value) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(value, Censored):
        return np.asarray(value.lo, dtype=float), np.asarray(value.hi, dtype=float)
    v = np.asarray(value, dtype=float)
    return v, v


def bootstrap(
    effect_of_seed: Callable[[int, np.ndarray | None], object],
    n_seeds: int,
    min_effect: float,
    n_test: int | None = None,
    replicates: int = REPLICATES,
    seed: int = 0,
    chunk: int = 500,
) -> Estimate:
    """Paired bootstrap of the mean effect over seeds.

    ``effect_of_seed(i, w)`` returns the effect of seed ``i`` (a float or :class:`Censored`); with
    ``w`` an array ``(R, n_test)`` of test-example weights it returns the ``R`` effects under those
    weights (arrays of shape ``(R,)``, or a :class:`Censored` of such arrays); with ``w=None`` the
    effect on the test set as it is. ``n_test=None``: the effect does not read test examples.
    """
    if n_seeds < 1:
        raise ValueError("bootstrap needs at least one seed with an effect")
    rng = np.random.default_rng(seed)
    point = [_as_bounds(effect_of_seed(i, None)) for i in range(n_seeds)]
    lo0 = np.array([float(lo) for lo, _ in point])
    hi0 = np.array([float(hi) for _, hi in point])
    censored = int(np.sum(lo0 != hi0))
    est = float(lo0.mean()) if np.all(np.isfinite(lo0)) else float("nan")
    boot_lo = np.empty(replicates)
    boot_hi = np.empty(replicates)
    for start in range(0, replicates, chunk):
        r = min(chunk, replicates - start)
        if n_test:
            w = rng.poisson(1.0, size=(r, n_test)).astype(np.float32)
            per = [_as_bounds(effect_of_seed(i, w)) for i in range(n_seeds)]
            lo = np.stack([np.broadcast_to(a, (r,)) for a, _ in per], axis=1)  # (r, seeds)
            hi = np.stack([np.broadcast_to(b, (r,)) for _, b in per], axis=1)
        else:
            lo = np.broadcast_to(lo0, (r, n_seeds))
            hi = np.broadcast_to(hi0, (r, n_seeds))
        pick = rng.integers(0, n_seeds, size=(r, n_seeds))
        rows = np.arange(r)[:, None]
        with np.errstate(invalid="ignore"):
            boot_lo[start:start + r] = lo[rows, pick].mean(axis=1)
            boot_hi[start:start + r] = hi[rows, pick].mean(axis=1)
    # The bootstrap gives the standard error of the mean effect (both sources of error); the interval and
    # p-values use Student's t with n - 1 degrees of freedom, as few seeds call for. The bootstrap's spread
    # of a mean of n values is the sample's times sqrt((n-1)/n): widened back by sqrt(n/(n-1)).
    k = math.sqrt(n_seeds / (n_seeds - 1)) if n_seeds > 1 else 1.0
    q = float(student_t.ppf(0.975, n_seeds - 1)) if n_seeds > 1 else 1.959964
    est_hi = float(hi0.mean())
    lo_end, p_for = _side(est, boot_lo, k, q, n_seeds, lambda z, df: _sf(z, df), -1)
    hi_end, p_against = _side(est_hi, boot_hi, k, q, n_seeds, lambda z, df: _sf(-z, df), +1,
                              shift=min_effect)
    ci = (lo_end, hi_end)
    return Estimate(est, ci, p_for, p_against, n_seeds, censored, bool(n_test))


def _sf(z: float, df: int) -> float:
    """P(T > z) for Student's t with ``df`` degrees of freedom (normal when df < 1)."""
    return float(student_t.sf(z, df)) if df >= 1 else float(normal.sf(z))


def _side(est: float, boot: np.ndarray, k: float, q: float, n: int, tail, sign: int, shift: float = 0.0):
    """(interval end, one-sided p-value) for one end: ``sign`` -1 is the lower end with p = P(effect <= 0),
    +1 the upper end with p = P(effect >= shift)."""
    if not math.isfinite(est) or not np.all(np.isfinite(boot)):
        return sign * math.inf, 1.0
    se = float(np.std(boot)) * k
    end = est + sign * q * se
    if se == 0:
        return end, (0.0 if (est > 0 if sign < 0 else est < shift) else 1.0)
    z = (est - (0.0 if sign < 0 else shift)) / se
    return end, tail(z, n - 1)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given.

    Sorted ascending ``p_(1) <= ... <= p_(m)``: ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``.
    A hypothesis is rejected at family-wise level alpha when its adjusted p-value is below alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def verdict(effect: float, min_effect: float, p_for_adj: float, p_against_adj: float, n_seeds: int,
            alpha: float = ALPHA) -> str:
    """``supported`` / ``contradicted`` / ``inconclusive`` (see the module docstring)."""
    if n_seeds < MIN_SEEDS:
        return "inconclusive"
    if p_for_adj < alpha and math.isfinite(effect) and effect >= min_effect:
        return "supported"
    if p_against_adj < alpha:
        return "contradicted"
    return "inconclusive"
