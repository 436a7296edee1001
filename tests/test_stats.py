"""Confidence intervals for the gate: exact values for hand-worked and published cases, the
degenerate tables, the bootstrap against a plain loop, determinism, coverage, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks import stats
from tasks.stats import (
    Interval,
    newcombe_interval,
    paired_difference,
    proportion_interval,
    stratified_paired_difference,
)

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def _items(both: int, only_candidate: int, only_other: int, neither: int) -> tuple[list[int], list[int]]:
    """0/1 scores per item for a paired 2x2 table (candidate, other)."""
    candidate = [1] * both + [1] * only_candidate + [0] * only_other + [0] * neither
    other = [1] * both + [0] * only_candidate + [1] * only_other + [0] * neither
    return candidate, other


def _square_and_add(p1, p2, l1, u1, l2, u2, phi) -> tuple[float, float]:
    """Newcombe's method 10 from its published formula, on hand-written inputs."""
    low = (p1 - p2) - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = (p1 - p2) + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    return low, high


def _percentile(values: list[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    h = (len(ordered) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


# ---- Wilson ---------------------------------------------------------------------------------


def test_wilson_hand_worked_seven_of_ten():
    # p = 0.7, n = 10, z^2 = 3.841459: denominator 1 + z^2/n = 1.384146,
    # centre (0.7 + z^2/20) / 1.384146 = 0.644493, half-width
    # z / 1.384146 * sqrt(0.21/10 + z^2/400) = 0.247715 -> [0.396778, 0.892209]
    interval = proportion_interval(7, 10)
    assert interval.estimate == 0.7
    assert interval.low == pytest.approx(0.396778, abs=1e-6)
    assert interval.high == pytest.approx(0.892209, abs=1e-6)
    assert (interval.n, interval.confidence, interval.method) == (10, 0.95, "wilson")


def test_wilson_ends_are_exact_and_zero_items_is_the_whole_range():
    none = proportion_interval(0, 10)  # upper bound z^2 / (n + z^2) = 3.841459 / 13.841459
    assert none.low == 0.0 and none.high == pytest.approx(0.277533, abs=1e-6)
    every = proportion_interval(10, 10)
    assert every.high == 1.0 and every.low == pytest.approx(1 - 0.277533, abs=1e-6)
    empty = proportion_interval(0, 0)
    assert math.isnan(empty.estimate) and (empty.low, empty.high, empty.n) == (0.0, 1.0, 0)


def test_wilson_at_another_confidence():
    # z(0.90) = 1.644854; 7/10: denominator 1.270554, centre 0.657412, half 0.215712
    interval = proportion_interval(7, 10, 0.90)
    assert interval.low == pytest.approx(0.441700, abs=1e-6)
    assert interval.high == pytest.approx(0.873123, abs=1e-6)


# ---- Newcombe -------------------------------------------------------------------------------


def test_newcombe_matches_the_published_example():
    # Fagerland, Lydersen & Laake, Statistics in Medicine 2014 33:2850 and "Statistical Analysis of
    # Contingency Tables" (2017) ch. 8: complete response before/after consolidation therapy (Cavo et
    # al. 2012), table [[59, 6], [16, 80]]: Newcombe square-and-add -0.0621 (95% CI -0.1186 to -0.0046).
    interval = newcombe_interval(59, 6, 16, 80)
    assert interval.format(4) == "-0.0621 [-0.1186, -0.0046]"
    assert (interval.n, interval.method) == (161, "newcombe")


def test_newcombe_hand_worked_ten_items_positive_correlation():
    # 10 items: 5 both right, 2 only the candidate, 0 only the other, 3 neither.
    # p1 = 7/10, p2 = 5/10; Wilson: [0.396778, 0.892209] and [0.236593, 0.763407];
    # B = ad - bc = 15 > n/2 = 5, A = 7*3*5*5 = 525, phi = (15 - 5) / sqrt(525) = 0.436436
    expected = _square_and_add(0.7, 0.5, 0.396778, 0.892209, 0.236593, 0.763407, 0.436436)
    interval = paired_difference(*_items(5, 2, 0, 3))
    assert interval.method == "newcombe"
    assert interval.estimate == pytest.approx(0.2, abs=1e-15)
    assert (interval.low, interval.high) == pytest.approx(expected, abs=2e-6)
    assert (interval.low, interval.high) == pytest.approx((-0.102671, 0.449268), abs=1e-6)
    assert interval.format() == "0.20 [-0.10, 0.45]"


def test_newcombe_hand_worked_negative_correlation():
    # 1 both, 4 only candidate, 3 only other, 2 neither: p1 = 0.5, p2 = 0.4;
    # Wilson [0.236593, 0.763407] and [0.168180, 0.687326];
    # B = 2 - 12 = -10 < 0, A = 5*5*4*6 = 600, phi = -10 / sqrt(600) = -0.408248
    expected = _square_and_add(0.5, 0.4, 0.236593, 0.763407, 0.168180, 0.687326, -0.408248)
    interval = newcombe_interval(1, 4, 3, 2)
    assert (interval.low, interval.high) == pytest.approx(expected, abs=2e-6)
    assert (interval.low, interval.high) == pytest.approx((-0.362315, 0.515910), abs=1e-6)


def test_newcombe_small_positive_correlation_is_shrunk_to_zero():
    # 4, 3, 1, 2: B = 8 - 3 = 5 = n/2, so phi = 0 (not 5 / sqrt(525)): the independent-samples
    # square-and-add with the same Wilson limits as the 5, 2, 0, 3 table
    expected = _square_and_add(0.7, 0.5, 0.396778, 0.892209, 0.236593, 0.763407, 0.0)
    interval = newcombe_interval(4, 3, 1, 2)
    assert (interval.low, interval.high) == pytest.approx(expected, abs=2e-6)
    assert (interval.low, interval.high) == pytest.approx((-0.201655, 0.526079), abs=1e-6)


def test_newcombe_all_concordant_has_width():
    # 5 both right, 5 both wrong: estimate 0, phi = (25 - 5) / sqrt(625) = 0.8, Wilson for 5/10 twice
    interval = newcombe_interval(5, 0, 0, 5)
    e = 0.263407  # 0.5 - 0.236593 = 0.763407 - 0.5
    half = math.sqrt(e * e - 2 * 0.8 * e * e + e * e)
    assert interval.estimate == 0.0
    assert (interval.low, interval.high) == pytest.approx((-half, half), abs=2e-6)
    assert interval.high == pytest.approx(0.166593, abs=1e-6)


def test_newcombe_zero_margins_use_phi_zero():
    # every item right for both: margins c+d and b+d are 0 -> phi = 0; half-width 1 - l(10/10)
    every = newcombe_interval(10, 0, 0, 0)
    assert every.estimate == 0.0
    assert (every.low, every.high) == pytest.approx((-0.277533, 0.277533), abs=1e-6)
    # the candidate right on every item: its margin c+d is 0 (A = 0, phi = 0, no division by zero)
    candidate_perfect = newcombe_interval(6, 4, 0, 0)
    p2_low, p2_high = proportion_interval(6, 10).low, proportion_interval(6, 10).high
    l1 = proportion_interval(10, 10).low
    expected = _square_and_add(1.0, 0.6, l1, 1.0, p2_low, p2_high, 0.0)
    assert (candidate_perfect.low, candidate_perfect.high) == pytest.approx(expected, abs=1e-12)


def test_newcombe_one_item():
    # n = 1: a margin is always zero, phi = 0. Wilson for 1/1 is [0.206549, 1], for 0/1 [0, 0.793451]
    win = paired_difference([1], [0])
    assert win.estimate == 1.0 and win.n == 1
    # low = 1 - sqrt((1 - 0.206549)^2 + (0.793451 - 0)^2) = 1 - 1.122109
    assert win.low == pytest.approx(-0.122109, abs=1e-6) and win.high == 1.0
    tie = paired_difference([0], [0])
    assert (tie.low, tie.high) == pytest.approx((-0.793451, 0.793451), abs=1e-6)


def test_newcombe_stays_in_range_for_every_small_table():
    for n in range(1, 13):
        for a in range(n + 1):
            for b in range(n + 1 - a):
                for c in range(n + 1 - a - b):
                    interval = newcombe_interval(a, b, c, n - a - b - c)
                    assert -1.0 <= interval.low <= interval.estimate <= interval.high <= 1.0


def test_newcombe_swapping_the_models_mirrors_the_interval():
    forward = paired_difference(*_items(5, 2, 0, 3))
    backward = paired_difference(*reversed(_items(5, 2, 0, 3)))
    assert (backward.estimate, backward.low, backward.high) == pytest.approx(
        (-forward.estimate, -forward.high, -forward.low), abs=1e-12
    )


def test_newcombe_coverage_is_close_to_nominal():
    rng = np.random.default_rng(11)
    probs = [0.5, 0.15, 0.05, 0.3]  # both, only candidate, only other, neither
    true_difference = probs[1] - probs[2]
    tables = rng.multinomial(30, probs, size=2000)
    intervals = [newcombe_interval(*map(int, table)) for table in tables]
    covered = np.mean([i.low <= true_difference <= i.high for i in intervals])
    assert 0.93 <= covered <= 0.98  # measured 0.96: slightly conservative, as Newcombe reports


def test_binary_scores_as_floats_or_bools_take_the_newcombe_path():
    candidate, other = _items(5, 2, 0, 3)
    as_floats = paired_difference([float(v) for v in candidate], np.array(other, dtype=float))
    as_bools = paired_difference([bool(v) for v in candidate], [bool(v) for v in other])
    assert as_floats == as_bools == newcombe_interval(5, 2, 0, 3)


# ---- paired bootstrap -----------------------------------------------------------------------


def _continuous(n: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    other = rng.random(n)
    return other + rng.normal(0.05, 0.2, n), other


def test_bootstrap_equals_a_plain_loop_drawing_item_indices():
    candidate, other = _continuous(37)
    diffs = [float(c - o) for c, o in zip(candidate, other, strict=True)]
    rng = np.random.default_rng(7)
    means = []
    for _ in range(500):  # one resample at a time, the same draws as the module's chunks
        picks = rng.integers(0, 37, size=37)
        means.append(sum(diffs[i] for i in picks) / 37)
    interval = paired_difference(candidate, other, seed=7, resamples=500)
    assert interval.method == "bootstrap"
    assert interval.estimate == pytest.approx(sum(diffs) / 37, abs=1e-12)
    assert interval.low == pytest.approx(_percentile(means, 0.025), abs=1e-12)
    assert interval.high == pytest.approx(_percentile(means, 0.975), abs=1e-12)


def test_bootstrap_of_few_distinct_values_equals_a_plain_loop_drawing_counts():
    # scores on a 0 / 0.5 / 1 scale: the differences take at most 5 values, resampled as counts
    rng = np.random.default_rng(5)
    candidate, other = rng.integers(0, 3, 60) / 2, rng.integers(0, 3, 60) / 2
    diffs = candidate - other
    levels = sorted(set(diffs.tolist()))
    counts = np.array([np.sum(diffs == v) for v in levels])
    draw = np.random.default_rng(9)
    means = []
    for _ in range(400):
        resampled = draw.multinomial(60, counts / 60)
        means.append(sum(k * v for k, v in zip(resampled.tolist(), levels, strict=True)) / 60)
    interval = paired_difference(candidate, other, seed=9, resamples=400)
    assert interval.low == pytest.approx(_percentile(means, 0.025), abs=1e-12)
    assert interval.high == pytest.approx(_percentile(means, 0.975), abs=1e-12)


def test_counting_values_is_the_same_bootstrap_as_drawing_indices():
    # the same 0/0.5/1 data, once as is (counts path), once with a 1e-9 jitter that makes every
    # difference distinct (index path): the intervals agree within Monte Carlo error (~0.002)
    rng = np.random.default_rng(5)
    candidate, other = rng.integers(0, 3, 200) / 2, rng.integers(0, 3, 200) / 2
    counted = paired_difference(candidate, other, seed=1)
    drawn = paired_difference(candidate + np.arange(200) * 1e-9, other, seed=2)
    assert abs(counted.low - drawn.low) < 0.01 and abs(counted.high - drawn.high) < 0.01


def test_bootstrap_is_deterministic_for_a_seed_and_independent_of_the_chunk_size(monkeypatch):
    candidate, other = _continuous(300)
    first = paired_difference(candidate, other, seed=42)
    assert paired_difference(list(candidate), list(other), seed=42) == first
    assert paired_difference(candidate, other, seed=43) != first
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 1)  # one resample per draw
    assert paired_difference(candidate, other, seed=42) == first
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 10**9)  # every resample in one draw
    assert paired_difference(candidate, other, seed=42) == first


def test_bootstrap_coverage_on_skewed_differences():
    rng = np.random.default_rng(2024)
    covered = 0
    for k in range(200):
        other = rng.random(60)
        candidate = other + rng.exponential(0.1, 60) - 0.05  # true mean difference 0.05, skewed
        interval = paired_difference(candidate, other, seed=k, resamples=2000)
        covered += interval.low <= 0.05 <= interval.high
    # percentile intervals under-cover skewed data a little: 0.93 over 1,000 such datasets at n = 60,
    # 0.91 at n = 24 and 40
    assert 0.90 <= covered / 200 <= 0.99


def test_bootstrap_of_constant_differences_is_a_point():
    interval = paired_difference([0.7, 0.4, 0.9], [0.2, -0.1, 0.4])
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((0.5, 0.5, 0.5), abs=1e-12)


# ---- stratified bootstrap -------------------------------------------------------------------


def test_stratified_with_one_benchmark_equals_the_paired_bootstrap():
    candidate, other = _continuous(150)
    single = paired_difference(candidate, other, seed=5)
    stratified = stratified_paired_difference([(candidate, other)], seed=5)
    assert stratified.method == "stratified_bootstrap"
    assert (stratified.estimate, stratified.low, stratified.high, stratified.n) == (
        single.estimate,
        single.low,
        single.high,
        single.n,
    )


def test_stratified_is_the_mean_of_benchmark_means_resampled_within_each():
    # benchmark A: 5 items, candidate +1 on each; benchmark B: 50 items, -1 on each. Each benchmark's
    # mean is the same in every resample, so the interval is the point 0 (a pooled bootstrap of the
    # 55 items would give a mean of -45/55 and a wide interval).
    interval = stratified_paired_difference([([1] * 5, [0] * 5), ([0] * 50, [1] * 50)])
    assert (interval.estimate, interval.low, interval.high, interval.n) == (0.0, 0.0, 0.0, 55)


def test_stratified_equals_a_plain_loop_over_benchmarks():
    first, second = _continuous(23, seed=1), _continuous(41, seed=2)
    diffs = [[float(c - o) for c, o in zip(*pair, strict=True)] for pair in (first, second)]
    rng = np.random.default_rng(3)
    per_benchmark = []
    for d in diffs:  # benchmarks in order, each with all its resamples
        per_benchmark.append(
            [sum(d[i] for i in rng.integers(0, len(d), size=len(d))) / len(d) for _ in range(300)]
        )
    means = [(x + y) / 2 for x, y in zip(*per_benchmark, strict=True)]
    interval = stratified_paired_difference([first, second], seed=3, resamples=300)
    assert interval.estimate == pytest.approx((sum(diffs[0]) / 23 + sum(diffs[1]) / 41) / 2, abs=1e-12)
    assert interval.low == pytest.approx(_percentile(means, 0.025), abs=1e-12)
    assert interval.high == pytest.approx(_percentile(means, 0.975), abs=1e-12)
    assert interval.n == 64


def test_stratified_coverage_over_benchmarks_of_different_sizes():
    rng = np.random.default_rng(77)
    covered = 0
    for k in range(200):
        pairs = []
        for n, shift in ((20, 0.1), (60, -0.05), (35, 0.0)):  # true objective (0.1 - 0.05 + 0) / 3
            other = rng.random(n)
            pairs.append((other + shift + rng.normal(0, 0.3, n), other))
        interval = stratified_paired_difference(pairs, seed=k, resamples=2000)
        covered += interval.low <= 0.05 / 3 <= interval.high
    assert 0.90 <= covered / 200 <= 0.99


# ---- formatting -----------------------------------------------------------------------------


def test_format_prints_estimate_and_bounds():
    interval = Interval(-0.2149, -0.3312, -0.0791, 24, 0.95, "bootstrap")
    assert interval.format() == "-0.21 [-0.33, -0.08]"
    assert str(interval) == "-0.21 [-0.33, -0.08]"
    assert interval.format(3) == "-0.215 [-0.331, -0.079]"
    assert Interval(-0.0, -0.004, 0.0, 10, 0.95, "newcombe").format() == "0.00 [-0.00, 0.00]"


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "other", "message"),
    [
        ([1, 0, 1], [1, 0], "candidate has 3 items but other has 2: a paired comparison needs the same"),
        ([], [], "no items to compare"),
        ([0.5, float("nan"), 0.2], [0.1, 0.2, 0.3], "candidate score of item 1 is nan (1 not finite in all)"),
        ([0.5, 0.2], [0.1, float("inf")], "other score of item 1 is inf (1 not finite in all)"),
        ([[1, 0], [0, 1]], [[1, 0], [0, 1]], "candidate scores must be a flat sequence, one per item"),
        (["a", "b"], [1, 0], "candidate scores must be numbers"),
    ],
)
def test_bad_scores_are_rejected_with_a_clear_message(candidate, other, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        paired_difference(candidate, other)


@pytest.mark.parametrize("confidence", [0, 1, 1.5, -0.1, float("nan"), True, "0.95"])
def test_bad_confidence_is_rejected(confidence):
    with pytest.raises(ValueError, match="confidence must be a number strictly between 0 and 1"):
        paired_difference([0.5, 0.2], [0.1, 0.3], confidence)
    with pytest.raises(ValueError, match="confidence must be"):
        proportion_interval(1, 2, confidence)


def test_bad_bootstrap_settings_and_counts_are_rejected():
    with pytest.raises(ValueError, match="resamples must be at least 100, got 10"):
        paired_difference([0.5, 0.2], [0.1, 0.3], resamples=10)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        paired_difference([0.5, 0.2], [0.1, 0.3], seed=-1)
    with pytest.raises(ValueError, match=r"successes \(11\) is more than n \(10\)"):
        proportion_interval(11, 10)
    with pytest.raises(ValueError, match="successes must be an integer count, got 2.5"):
        proportion_interval(2.5, 10)
    with pytest.raises(ValueError, match="only_other must be >= 0, got -1"):
        newcombe_interval(1, 1, -1, 1)
    with pytest.raises(ValueError, match="the 2x2 table is empty"):
        newcombe_interval(0, 0, 0, 0)


def test_stratified_names_the_bad_benchmark():
    with pytest.raises(ValueError, match="no benchmarks to compare"):
        stratified_paired_difference([])
    good = ([0.5, 0.2], [0.1, 0.3])
    with pytest.raises(ValueError, match="benchmark #2 of 2: candidate has 2 items but other has 1"):
        stratified_paired_difference([good, ([0.1, 0.2], [0.3])])
    with pytest.raises(ValueError, match=r"benchmark #1 of 2: expected a \(candidate, other\) pair"):
        stratified_paired_difference([[0.1, 0.2, 0.3], good])
