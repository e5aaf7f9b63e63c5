"""The statistics behind the lab's verdicts, against independent statements of the same methods:
Holm's procedure on a worked example, the bootstrap's interval against Student's t for the mean of
normal data, coverage of the interval by simulation, test-example resampling against the binomial
standard error, censored effects, and the three verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from batchnorm.lab import stats as S


def test_holm_worked_example():
    # Wikipedia "Holm–Bonferroni method", worked example: four p-values 0.01, 0.04, 0.03, 0.005 at
    # alpha 0.05: H4 (0.005) and H1 (0.01) are rejected, then 0.03 > 0.05/2 stops the procedure.
    p = [0.01, 0.04, 0.03, 0.005]
    adj = S.holm(p)
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [a < 0.05 for a in adj] == [True, False, False, True]


def test_holm_is_monotone_and_capped():
    rng = np.random.default_rng(1)
    for _ in range(50):
        p = rng.uniform(0, 1, size=rng.integers(1, 20))
        adj = np.array(S.holm(list(p)))
        order = np.argsort(p)
        assert np.all(np.diff(adj[order]) >= -1e-15) and np.all(adj <= 1) and np.all(adj >= p)
        # never stricter than Bonferroni, never looser than unadjusted
        assert np.all(adj <= np.minimum(1, p * len(p)) + 1e-15)


def test_seed_interval_matches_student_t():
    """Normal effects over n seeds: the widened bootstrap interval is close to the t-interval."""
    e = np.array([0.8, 1.3, 0.2, 1.1, 0.6, 0.9, 1.5, 0.4, 1.0, 0.7])
    est = S.bootstrap(lambda i, w: e[i], len(e), min_effect=0.5, replicates=20000)
    lo, hi = sps.t.interval(0.95, len(e) - 1, loc=e.mean(), scale=sps.sem(e))
    assert est.effect == pytest.approx(e.mean())
    tol = 0.03 * (hi - lo)
    assert est.ci95[0] == pytest.approx(lo, abs=tol) and est.ci95[1] == pytest.approx(hi, abs=tol)
    p = sps.ttest_1samp(e, 0.0, alternative="greater").pvalue
    assert est.p_for == pytest.approx(p, rel=0.2)
    assert not est.resampled_examples and est.censored == 0


def test_interval_coverage_by_simulation():
    """Over 300 simulated experiments with 5 seeds each, the 95% interval covers the true mean in 90-99%
    of them."""
    rng = np.random.default_rng(2)
    hits = 0
    for k in range(300):
        e = rng.normal(1.0, 2.0, size=5)
        est = S.bootstrap(lambda i, w, e=e: e[i], 5, 0.5, replicates=1000, seed=k)
        hits += est.ci95[0] <= 1.0 <= est.ci95[1]
    assert 0.9 <= hits / 300 <= 0.99


def test_test_example_resampling_matches_binomial_error():
    """One seed, an accuracy on n test examples: the bootstrap's spread is the binomial standard error."""
    n = 2000
    rng = np.random.default_rng(3)
    right = (rng.uniform(size=n) < 0.7).astype(np.float32)

    def acc(i, w):
        return 100 * (right.mean() if w is None else (w @ right) / w.sum(axis=1))

    est = S.bootstrap(acc, 1, 1.0, n_test=n, replicates=4000)
    p = right.mean()
    se = 100 * math.sqrt(p * (1 - p) / n)
    assert est.resampled_examples
    assert (est.ci95[1] - est.ci95[0]) / (2 * 1.96) == pytest.approx(se, rel=0.1)


def test_paired_examples_cancel_shared_errors():
    """Two arms that get the same examples right: their difference has no test-set error at all."""
    n = 1000
    right = (np.random.default_rng(4).uniform(size=n) < 0.6).astype(np.float32)

    def diff(i, w):
        a = right.mean() if w is None else (w @ right) / w.sum(axis=1)
        return 100 * (a - a) + [1.0, 1.2, 0.8, 1.1, 0.9][i]

    est = S.bootstrap(diff, 5, 0.5, n_test=n, replicates=2000)
    assert est.ci95[1] - est.ci95[0] < 0.6


def test_censored_effects_count_only_what_they_show():
    # BN reached the target, the run without BN did not: effect >= 1 (lower end), unbounded above
    effects = [S.Censored(1.0, math.inf)] * 5
    est = S.bootstrap(lambda i, w: effects[i], 5, 0.3)
    assert est.effect == 1.0 and est.censored == 5 and est.p_for < 0.01 and est.p_against == 1.0
    assert S.verdict(est.effect, 0.3, est.p_for, est.p_against, 5) == "supported"
    # the other way round: effect <= -1; it can contradict the claim, never support it
    effects = [S.Censored(-math.inf, -1.0)] * 5
    est = S.bootstrap(lambda i, w: effects[i], 5, 0.3)
    assert math.isnan(est.effect) and est.p_for == 1.0 and est.p_against < 0.01
    assert S.verdict(est.effect, 0.3, est.p_for, est.p_against, 5) == "contradicted"


@pytest.mark.parametrize("effects,verdict", [
    ([1.0, 1.2, 0.9, 1.1, 1.05], "supported"),          # consistent and larger than the claimed 0.5
    ([0.2, 0.3, 0.25, 0.22, 0.28], "contradicted"),     # real but clearly smaller than claimed
    ([2.0, -1.5, 1.5, -2.0, 0.5], "inconclusive"),      # spread covers both 0 and 0.5
    ([-1.0, -1.2, -0.9, -1.1, -1.0], "contradicted"),   # the opposite of the claim
    ([1.0, 1.2, 0.9, 1.1], "inconclusive"),             # fewer than MIN_SEEDS seeds: never a verdict
])
def test_verdicts(effects, verdict):
    est = S.bootstrap(lambda i, w: effects[i], len(effects), 0.5)
    assert S.verdict(est.effect, 0.5, est.p_for, est.p_against, len(effects)) == verdict


def test_holm_turns_a_marginal_condition_inconclusive():
    """A condition supported alone is inconclusive in a run of 20 conditions (family-wise control)."""
    e = [0.9, 0.4, 1.4, 0.7, 1.2]
    est = S.bootstrap(lambda i, w: e[i], 5, 0.5)
    assert S.verdict(est.effect, 0.5, est.p_for, est.p_against, 5) == "supported"
    adj = S.holm([est.p_for] + [0.5] * 19)[0]
    assert adj > 0.05 and S.verdict(est.effect, 0.5, adj, 1.0, 5) == "inconclusive"
