"""Confidence intervals for the promotion gate (`tasks/stats.py`).

Every comparison of the gate is an interval for the mean paired difference *candidate - other*
over the items both models were evaluated on, at `gate.confidence` (default 0.95), and a rule
decides on one bound: "not worse than the best parent" needs the lower bound above `-tolerance`,
"beats the champion" the lower bound above `min_improvement`; a rate bound uses the upper
(repetition) or lower (refusal) bound of the rate's interval. Reasons print `estimate [low, high]`:
`toy_math.exact_match: -0.21 [-0.33, -0.08] vs best parent (tolerance 0.05): worse`.

**The caller orients.** These functions compute intervals of candidate - other and nothing else:
a lower-is-better metric is negated before it is passed in, so that a positive difference always
means "candidate better". Items pair by position (the gate joins on `item_id` and sorts).

- `proportion_interval(successes, n)`: a rate (repetition, refusal), Wilson score interval.
- `paired_difference(candidate, other)`: one benchmark. 0/1 scores on both sides (exact match,
  accuracy): Newcombe's interval for paired proportions; any other scores: paired bootstrap.
- `stratified_paired_difference(pairs)`: `objective: mean`, the mean over benchmarks of each
  benchmark's mean difference: stratified paired bootstrap.

Each returns an `Interval` (estimate, low, high, n, confidence, method); `format(digits=2)` gives
`-0.21 [-0.33, -0.08]`. Bad input (no items, lengths that differ, NaN or infinite scores, a
confidence outside (0, 1)) raises `ValueError` with a one-line message; the gate rejects on it.

**Wilson** (one proportion p = successes / n, z the two-sided normal quantile): centre
(p + z²/2n) / (1 + z²/n), half-width z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²). Inside [0, 1], and
near nominal coverage for small n and rates near 0 or 1, where the Wald interval collapses. n = 0
gives estimate NaN and [0, 1]: nothing is known, so a rule on either bound fails.

**Newcombe** (Newcombe 1998, Statistics in Medicine 17:2635-2650, method 10: the hybrid score or
square-and-add interval, no continuity correction). With a = both right, b = only the candidate
right, c = only the other right, d = both wrong, p1 = (a+b)/n, p2 = (a+c)/n and Wilson intervals
[l1, u1], [l2, u2] for p1 and p2:

    low  = (p1 - p2) - sqrt((p1 - l1)² - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)²)
    high = (p1 - p2) + sqrt((p2 - l2)² - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)²)

phi is Newcombe's correlation estimate: with B = ad - bc and A = (a+b)(c+d)(a+c)(b+d),
phi = (B - n/2) / sqrt(A) if B > n/2, 0 if 0 <= B <= n/2, B / sqrt(A) if B < 0, and 0 when a margin
is zero (A = 0: a model got every item right, or every item wrong; always so for n = 1). The n/2
shrinkage is part of the published method: only with it do the published values come out ("no
continuity correction" is about the Wilson limits). The interval never leaves [-1, 1], does not
collapse when few items are discordant (all concordant, b = c = 0, still has a width), and is
slightly conservative for small n (coverage 0.96 at n = 30 in tests/test_stats.py). Checked
against Fagerland, Lydersen and Laake (Statistics in Medicine 2014, 33:2850-2875; *Statistical
Analysis of Contingency Tables*, 2017, ch. 8): a=59, b=6, c=16, d=80 gives -0.0621 [-0.1186, -0.0046].

**Paired bootstrap** (scores not all 0/1): the differences d_i = candidate_i - other_i are resampled
with replacement (an item's two scores stay together) `resamples` times; the interval is the
alpha/2 and 1 - alpha/2 percentiles of the resampled means (numpy's linear interpolation), the
estimate the observed mean.

- *Percentile, not BCa.* For a mean the bootstrap distribution is nearly symmetric, so BCa's
  corrections are small, while its bias correction (the share of resamples below the estimate)
  jumps with the ties of discrete scores and it needs more resamples for the same Monte Carlo
  error. The percentile interval is simple to check by hand and never leaves the range of the
  observed differences. Its known weakness: under-coverage for small n (its spread is
  sqrt((n-1)/n) of the usual standard error; skew makes it worse: for exponential differences a
  95 % interval covered 0.91 of 1,000 datasets at n = 24 and 40, 0.93 at n = 60 and 100).
  `gate.min_items` guards against tiny samples.
- *10,000 resamples.* The Monte Carlo standard error of a 2.5 % percentile is
  sqrt(0.025 * 0.975 / B) / density, about 0.027 bootstrap standard errors at B = 10,000 (measured:
  0.00024 against 0.00025 predicted on 2,000 items). On 24 items whose differences have standard
  deviation 0.6 a bound moves by about 0.003 between seeds, on 2,000 items by about 0.0003: below
  the two decimals a reason prints. 1,000 resamples would triple it.
- *A fixed seed* (`numpy.random.default_rng(seed)`, default 0): the same inputs give the same
  interval, so the same night re-gated gives the same verdict.
- *Draws.* Item indices (`integers(0, n)`, resample after resample, in chunks of about 2 MB; the
  chunking never changes the result) or, when the differences take at most 8 distinct values
  (0/1 scores give at most 3), the multinomial counts of each value per resample: the same
  distribution, much faster. 10,000 resamples of 2,000 items on 2 shared x86 cores: ~2 ms when
  the differences take few values, ~75-90 ms for continuous scores.

**Stratified bootstrap** (`objective: mean`): each benchmark's items are resampled within it, each
resample's per-benchmark means are averaged, and the interval is the percentile interval of those
averages; the estimate is the mean of the benchmarks' mean differences, n the total item count.
Benchmarks draw from one generator in the order given (the caller sorts them by key); with one
benchmark the result equals `paired_difference`'s bootstrap. 0/1 benchmarks are bootstrapped
here too: a mean of several paired differences has no closed form, and one method keeps mixed
objectives on one footing. The closed-form alternative is MOVER (Zou & Donner 2008) over
per-benchmark Newcombe intervals; it may cover better for small all-0/1 benchmarks, and is the
first thing to try if the bootstrap's small-n under-coverage ever matters.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

Method = Literal["wilson", "newcombe", "bootstrap", "stratified_bootstrap"]

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
MIN_RESAMPLES = 100

# Bootstrap draws: at most this many item indices at once (int64 indices plus the float64 scores they
# pick: 2 MB, cache-sized, which measured fastest). The draws are one stream, resample after resample,
# so the chunk size never changes a result.
_CHUNK_ELEMENTS = 2**17
# Differences with at most this many distinct values are resampled as multinomial counts per value.
_MAX_LEVELS_FOR_COUNTS = 8


@dataclass(frozen=True)
class Interval:
    """A confidence interval for a proportion or a mean paired difference (candidate - other).

    Attributes:
        estimate: the observed value (a proportion, or the mean difference); NaN when n == 0.
        low: lower bound.
        high: upper bound.
        n: number of items (for a stratified interval: over all benchmarks).
        confidence: the two-sided confidence level, e.g. 0.95.
        method: ``wilson``, ``newcombe``, ``bootstrap`` or ``stratified_bootstrap``.
    """

    estimate: float
    low: float
    high: float
    n: int
    confidence: float
    method: Method

    def format(self, digits: int = 2) -> str:
        """The interval as ``estimate [low, high]``, e.g. ``-0.21 [-0.33, -0.08]``.

        Args:
            digits: decimals for each number. A negative value that rounds to zero keeps its
                sign (``-0.00``: a bound just below zero reads as below zero); zero itself,
                even a float ``-0.0``, prints as ``0.00``.

        Returns:
            The formatted interval.
        """
        return f"{_number(self.estimate, digits)} [{_number(self.low, digits)}, {_number(self.high, digits)}]"

    def __str__(self) -> str:
        return self.format()


def proportion_interval(successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Wilson score interval for one proportion, such as a repetition or refusal rate.

    Args:
        successes: items counted (looping generations, refusals), 0 <= successes <= n.
        n: items in all.
        confidence: two-sided confidence level in (0, 1).

    Returns:
        An ``Interval`` with method ``wilson``. For n == 0: estimate NaN, bounds [0, 1].

    Raises:
        ValueError: counts that are not integers or not 0 <= successes <= n, or a bad confidence.
    """
    successes, n = _count(successes, "successes"), _count(n, "n")
    if successes > n:
        raise ValueError(f"successes ({successes}) is more than n ({n})")
    z = _z(confidence)
    if n == 0:
        return Interval(math.nan, 0.0, 1.0, 0, confidence, "wilson")
    low, high = _wilson(successes, n, z)
    return Interval(successes / n, low, high, n, confidence, "wilson")


def newcombe_interval(
    both: int, only_candidate: int, only_other: int, neither: int, confidence: float = DEFAULT_CONFIDENCE
) -> Interval:
    """Newcombe's hybrid score interval for the difference of paired proportions (method 10).

    Args:
        both: items both models got right (a).
        only_candidate: items only the candidate got right (b).
        only_other: items only the other model got right (c).
        neither: items both got wrong (d).
        confidence: two-sided confidence level in (0, 1).

    Returns:
        An ``Interval`` with method ``newcombe`` for (a+b)/n - (a+c)/n, inside [-1, 1].

    Raises:
        ValueError: negative or non-integer counts, no items, or a bad confidence.
    """
    a, b = _count(both, "both"), _count(only_candidate, "only_candidate")
    c, d = _count(only_other, "only_other"), _count(neither, "neither")
    z = _z(confidence)
    n = a + b + c + d
    if n == 0:
        raise ValueError("no items to compare (the 2x2 table is empty)")
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = _wilson(a + b, n, z)
    l2, u2 = _wilson(a + c, n, z)
    phi = _newcombe_phi(a, b, c, d)
    estimate = p1 - p2
    low = estimate - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = estimate + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    # mathematically inside [-1, 1] (low >= l1 - u2); the clamp only absorbs rounding
    return Interval(estimate, max(-1.0, low), min(1.0, high), n, confidence, "newcombe")


def paired_difference(
    candidate: Sequence[float],
    other: Sequence[float],
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    seed: int = DEFAULT_SEED,
    resamples: int = DEFAULT_RESAMPLES,
) -> Interval:
    """Interval for mean(candidate - other) over paired items (same position = same item).

    0/1 scores on both sides use Newcombe's interval (``seed`` and ``resamples`` are then unused);
    anything else the paired percentile bootstrap.

    Args:
        candidate: the candidate's score per item, oriented so that higher is better.
        other: the other model's score per item, same items in the same order.
        confidence: two-sided confidence level in (0, 1).
        seed: seed of the bootstrap's ``numpy.random.default_rng``; same seed, same interval.
        resamples: bootstrap resamples (at least 100).

    Returns:
        An ``Interval`` with method ``newcombe`` or ``bootstrap``.

    Raises:
        ValueError: no items, lengths that differ, NaN or infinite scores, bad settings.
    """
    cand, oth = _paired_arrays(candidate, other)
    _z(confidence)
    if _is_binary(cand) and _is_binary(oth):
        cand_right, oth_right = cand == 1, oth == 1
        return newcombe_interval(
            int(np.sum(cand_right & oth_right)),
            int(np.sum(cand_right & ~oth_right)),
            int(np.sum(~cand_right & oth_right)),
            int(np.sum(~cand_right & ~oth_right)),
            confidence,
        )
    return _bootstrap([cand - oth], confidence, seed, resamples, "bootstrap")


def stratified_paired_difference(
    pairs: Sequence[tuple[Sequence[float], Sequence[float]]],
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    seed: int = DEFAULT_SEED,
    resamples: int = DEFAULT_RESAMPLES,
) -> Interval:
    """Interval for the mean over benchmarks of each benchmark's mean paired difference.

    Items are resampled within each benchmark; the benchmarks draw from one generator in the
    order given, so pass them in a fixed order (sorted by key). 0/1 scores are bootstrapped too.

    Args:
        pairs: one ``(candidate, other)`` per benchmark, each paired by position as in
            ``paired_difference``.
        confidence: two-sided confidence level in (0, 1).
        seed: seed of ``numpy.random.default_rng``; same seed, same interval.
        resamples: bootstrap resamples (at least 100).

    Returns:
        An ``Interval`` with method ``stratified_bootstrap``; n is the total number of items.

    Raises:
        ValueError: no benchmarks, or a benchmark with bad scores (named by its position).
    """
    if len(pairs) == 0:
        raise ValueError("no benchmarks to compare")
    diffs = []
    for position, pair in enumerate(pairs):
        prefix = f"benchmark #{position + 1} of {len(pairs)}: " if len(pairs) > 1 else ""
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"{prefix}expected a (candidate, other) pair of score sequences")
        try:
            cand, oth = _paired_arrays(*pair)
        except ValueError as err:
            raise ValueError(f"{prefix}{err}") from None
        diffs.append(cand - oth)
    return _bootstrap(diffs, confidence, seed, resamples, "stratified_bootstrap")


def _bootstrap(
    diffs: list[np.ndarray], confidence: float, seed: int, resamples: int, method: Method
) -> Interval:
    """Percentile interval of the mean over strata of each stratum's resampled mean difference."""
    _z(confidence)
    resamples, seed = _bootstrap_settings(resamples, seed)
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for diff in diffs:  # one generator, strata in the order given
        total += _resampled_means(diff, rng, resamples)
    alpha = 1.0 - confidence
    low, high = np.quantile(total / len(diffs), [alpha / 2, 1 - alpha / 2])
    estimate = float(np.mean([diff.mean() for diff in diffs]))
    n = sum(diff.size for diff in diffs)
    return Interval(estimate, float(low), float(high), n, confidence, method)


def _resampled_means(diff: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Means of ``resamples`` bootstrap resamples of ``diff`` (items drawn with replacement)."""
    levels, level_counts = np.unique(diff, return_counts=True)
    if levels.size <= _MAX_LEVELS_FOR_COUNTS:
        return _count_resample_means(levels, level_counts, rng, resamples)
    return _index_resample_means(diff, rng, resamples)


def _count_resample_means(
    levels: np.ndarray, level_counts: np.ndarray, rng: np.random.Generator, resamples: int
) -> np.ndarray:
    """Resampled means of data with few distinct values: a resample of n items holds each value a
    multinomial(n, count/n) number of times, the same distribution as drawing item indices."""
    n = int(level_counts.sum())
    counts = rng.multinomial(n, level_counts / n, size=resamples)  # (resamples, levels)
    return counts @ levels / n


def _index_resample_means(diff: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Resampled means by drawing item indices, a chunk of whole resamples at a time."""
    n = diff.size
    rows = max(1, _CHUNK_ELEMENTS // n)
    means = np.empty(resamples)
    picked = np.empty((min(rows, resamples), n))
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        indices = rng.integers(0, n, size=(stop - start, n))  # (rows, n), resample after resample
        chunk = picked[: stop - start]
        np.take(diff, indices, out=chunk, mode="clip")  # indices are in range; clip skips the check
        means[start:stop] = chunk.sum(axis=1) / n
    return means


def _newcombe_phi(a: int, b: int, c: int, d: int) -> float:
    """Newcombe's correlation estimate for the paired table (0 when a margin is zero)."""
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    if margins == 0:
        return 0.0
    n = a + b + c + d
    cross = a * d - b * c
    if cross > n / 2:
        shrunk = cross - n / 2
    elif cross >= 0:
        shrunk = 0.0
    else:
        shrunk = cross
    return shrunk / math.sqrt(margins)


def _wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # exact ends for 0 and n successes (the formula gives them only up to rounding)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _z(confidence: float) -> float:
    """Two-sided normal quantile for ``confidence``; raises ValueError outside (0, 1)."""
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number strictly between 0 and 1, got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _count(value: int, name: str) -> int:
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer count, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count}")
    return count


def _bootstrap_settings(resamples: int, seed: int) -> tuple[int, int]:
    resamples, seed = _count(resamples, "resamples"), _count(seed, "seed")
    if resamples < MIN_RESAMPLES:
        raise ValueError(f"resamples must be at least {MIN_RESAMPLES}, got {resamples}")
    return resamples, seed


def _paired_arrays(candidate: Sequence[float], other: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    cand, oth = _scores(candidate, "candidate"), _scores(other, "other")
    if cand.size != oth.size:
        raise ValueError(
            f"candidate has {cand.size} items but other has {oth.size}: a paired comparison needs "
            "the same items in the same order"
        )
    if cand.size == 0:
        raise ValueError("no items to compare")
    return cand, oth


def _scores(values: Sequence[float], name: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} scores must be numbers") from None
    if array.ndim != 1:
        raise ValueError(f"{name} scores must be a flat sequence, one per item (got shape {array.shape})")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        first = int(bad[0])
        raise ValueError(f"{name} score of item {first} is {array[first]} ({bad.size} not finite in all)")
    return array


def _is_binary(scores: np.ndarray) -> bool:
    return bool(np.all((scores == 0) | (scores == 1)))


def _number(value: float, digits: int) -> str:
    return f"{value + 0.0:.{digits}f}"  # + 0.0 turns a float -0.0 into 0.0
