"""Sparsification and sign election for the task-arithmetic family, built to stream.

A whole-tensor decision (which ``k`` elements are largest) is reduced to a few numbers first
(``TopK``: the k-th largest score and how many elements equal to it are kept), then applied to
consecutive flat chunks of the tensor, so no method needs a mask or a stacked copy of the task
vectors the size of the tensor. Sampling uses the caller's ``torch.Generator``, never the global
RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scf.errors import ScfError
from scf.quantile import order_statistics

_COUNT_CHUNK = 1 << 22  # elements per step when counting (bounds the bool temporary)
_RANK_BLOCK = 1 << 18  # elements of whole rows ranked at once by DELLA (its int64 sort indices: 2 MB)


@dataclass(frozen=True)
class TopK:
    """An exact top-k selection of a score tensor, as a threshold plus a count of ties to keep.

    The kept elements are every score above ``threshold`` and the first ``ties`` scores equal to
    it in flat index order, which makes the count exact even when many scores tie (mergekit's
    ``argsort``/``topk`` leave the order among ties unspecified).

    Attributes:
        threshold: the k-th largest score; ``-inf`` keeps everything, ``inf`` nothing.
        ties: how many scores equal to ``threshold`` are kept, first ones first.
    """

    threshold: float
    ties: int

    @classmethod
    def of(cls, scores: torch.Tensor, k: int) -> TopK:
        """The top-``k`` selection of ``scores``.

        Args:
            scores: contiguous float32 tensor of finite values (any shape), e.g. ``|delta|``.
            k: how many elements to keep; ``<= 0`` keeps none, ``>= numel`` keeps all.

        Returns:
            The selection; apply it with ``scan``.
        """
        n = scores.numel()
        if k >= n:
            return cls(-math.inf, 0)
        if k <= 0:
            return cls(math.inf, 0)
        (kth_largest,) = order_statistics(scores, [n - k])
        flat = scores.view(-1)
        above = sum(
            int(torch.count_nonzero(flat[start : start + _COUNT_CHUNK] > kth_largest))
            for start in range(0, n, _COUNT_CHUNK)
        )
        return cls(kth_largest, k - above)

    def scan(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function that takes the scores chunk by chunk, in flat order, and returns keep masks.

        Each call must get the next consecutive chunk of the same scores ``of`` saw (or a
        recomputation of them); a running count fills the ties in flat index order across chunks.
        Call ``scan`` again to go over the tensor a second time.

        Returns:
            ``mask(chunk_scores) -> bool tensor`` of the chunk's shape.
        """
        ties = _TieWindow(self.threshold, 0, self.ties)

        def mask(chunk_scores: torch.Tensor) -> torch.Tensor:
            keep = chunk_scores > self.threshold
            ties.add_to(keep, chunk_scores)
            return keep

        return mask


@dataclass(frozen=True)
class RankBand:
    """The elements whose ascending rank lies in ``[start, stop)``, ranks taken as a stable sort's.

    A stable ascending sort ranks equal scores by flat index, so of the scores equal to the band's
    lowest value the last ones are kept, and of those equal to its highest value the first ones.
    That is what mergekit's breadcrumbs keeps (``sort(|delta|)[n_bot : n_bot + k]``) when its sort
    is stable; as shipped its sort is not, and the order among equal values is unspecified.

    Attributes:
        low: the ``start``-th smallest score (``inf`` for an empty band).
        high: the ``(stop - 1)``-th smallest score.
        low_skip: how many scores equal to ``low`` (first ones first) fall below the band.
        high_keep: how many scores equal to ``high`` (first ones first) are in the band.
    """

    low: float
    high: float
    low_skip: int
    high_keep: int

    @classmethod
    def of(cls, scores: torch.Tensor, start: int, stop: int) -> RankBand:
        """The band ``[start, stop)`` of ``scores`` (contiguous float32, finite, any shape).

        Args:
            scores: e.g. ``|delta|`` of a whole tensor.
            start: first ascending rank kept (0-based).
            stop: one past the last rank kept; ``stop <= start`` keeps nothing.

        Returns:
            The band; apply it with ``scan``.
        """
        if stop <= start:
            return cls(math.inf, -math.inf, 0, 0)
        low, high = order_statistics(scores, [start, stop - 1])
        flat = scores.view(-1)
        below_low = below_high = 0
        for offset in range(0, flat.numel(), _COUNT_CHUNK):
            chunk = flat[offset : offset + _COUNT_CHUNK]
            below_low += int(torch.count_nonzero(chunk < low))
            below_high += int(torch.count_nonzero(chunk < high))
        return cls(low, high, start - below_low, stop - below_high)

    def scan(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Like ``TopK.scan``: keep masks for consecutive chunks of the scores, in flat order."""
        if self.low > self.high:  # the empty band
            windows = []
        elif self.low == self.high:  # one value: its ties at positions [low_skip, high_keep)
            windows = [_TieWindow(self.low, self.low_skip, self.high_keep)]
        else:
            windows = [_TieWindow(self.low, self.low_skip, math.inf),
                       _TieWindow(self.high, 0, self.high_keep)]

        def mask(chunk_scores: torch.Tensor) -> torch.Tensor:
            keep = (chunk_scores > self.low) & (chunk_scores < self.high)
            for window in windows:
                window.add_to(keep, chunk_scores)
            return keep

        return mask


class _TieWindow:
    """The scores equal to ``value`` whose position among them, in flat order, is in [start, stop)."""

    def __init__(self, value: float, start: int, stop: float) -> None:
        self.value, self.start, self.stop = value, start, stop
        self.seen = 0  # ties met in earlier chunks

    def add_to(self, keep: torch.Tensor, chunk_scores: torch.Tensor) -> None:
        """Set ``keep`` where this chunk's ties fall in the window (chunks must come in order)."""
        if self.seen >= self.stop:  # the window is behind us: no comparison needed
            return
        positions = (chunk_scores == self.value).view(-1).nonzero().squeeze(1)
        first = max(0, self.start - self.seen)
        last = max(0, self.stop - self.seen) if math.isfinite(self.stop) else positions.numel()
        keep.view(-1)[positions[first : int(last)]] = True
        self.seen += positions.numel()


def magnitude_k(density: float, numel: int) -> int:
    """How many entries TIES's magnitude trim keeps: ``int(density * numel)``, at least 1.

    The floor of one is mergekit's (0.1.5): a positive density keeps at least one element of a
    nonempty tensor, so a small bias with a low density is not zeroed entirely.

    Args:
        density: fraction to keep, in (0, 1).
        numel: number of elements of the task vector.

    Returns:
        The number of entries to keep.
    """
    return max(1, int(density * numel)) if numel > 0 else 0


def outlier_band(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """Which ascending ranks of ``|delta|`` breadcrumbs keeps: ``[n_bottom, n_bottom + int(density * n))``.

    mergekit 0.1.5's rule: cut the ``int(gamma * n)`` largest magnitudes as outliers and the smallest
    down to ``int(density * n)`` kept; when both cuts together would leave fewer than that, the
    outlier cut shrinks (``n_bottom = max(0, n - kept - outliers)``). No floor of one element here,
    unlike TIES: a density below ``1 / n`` keeps nothing.

    Args:
        density: fraction to keep, in (0, 1).
        gamma: fraction of largest magnitudes to cut, in [0, 1].
        numel: number of elements of the task vector.

    Returns:
        ``(start, stop)`` ranks for ``RankBand.of``.
    """
    kept = int(density * numel)
    outliers = int(gamma * numel)
    bottom = max(0, numel - kept - outliers)
    return bottom, bottom + kept


def della_keep_mask(
    magnitudes: torch.Tensor, density: float, epsilon: float, generator: torch.Generator
) -> torch.Tensor:
    """DELLA's MagPrune draw for one task vector: keep probabilities rise with the magnitude's rank.

    As mergekit 0.1.5's ``della_magprune``: magnitudes are ranked along dimension 1 (the rows of a
    matrix; a tensor of rank < 2 is one row), rank ``r`` of ``L`` (1-based) gets the probability
    ``(density - epsilon) + (r - 1) / (L - 1) * 2 * epsilon``, computed in float32 in mergekit's order,
    and each element is kept with its probability. Equal magnitudes are ranked by index (a stable
    sort; mergekit's is not, so its order among them is unspecified). A row of one element, where
    mergekit's formula divides 0 by 0, gets ``density``. Drawn a block of rows at a time, in flat
    order: the draws are element for element those of one ``torch.bernoulli`` over the whole tensor
    with the same generator state.

    Args:
        magnitudes: float32 ``|delta|`` of the whole tensor (any shape, contiguous).
        density: mean keep probability, in (0, 1).
        epsilon: half the spread of the probabilities; ``density +- epsilon`` must lie in (0, 1).
        generator: the per-tensor random source (on the tensor's device).

    Returns:
        bool tensor of ``magnitudes``' shape.
    """
    rows = magnitudes.reshape(1, -1, 1) if magnitudes.dim() < 2 else magnitudes.reshape(
        magnitudes.shape[0], magnitudes.shape[1], -1)  # (rows, ranked length, trailing)
    n_rows, length, trailing = rows.shape
    keep = torch.empty(rows.shape, dtype=torch.bool, device=rows.device)
    positions = torch.arange(length, device=rows.device).view(1, length, 1)
    step = max(1, _RANK_BLOCK // max(1, length * trailing))
    for start in range(0, n_rows, step):
        block = rows[start : start + step]
        order = torch.argsort(block, dim=1, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))
        ranks = ranks.to(torch.float32) + 1
        if length > 1:  # mergekit: ((rank - min rank) / (max rank - min rank)).clamp(0, 1)
            rank_norm = ((ranks - 1) / (length - 1)).clamp(0, 1)
        else:
            rank_norm = torch.full_like(ranks, 0.5)
        probabilities = (density - epsilon) + rank_norm * 2 * epsilon
        keep[start : start + step].bernoulli_(probabilities, generator=generator)
    return keep.view(magnitudes.shape)


def l1_rescale_factor(before: float, after: float) -> float | None:
    """mergekit's L1 rescale: the factor that gives a sparsified task vector its former L1 norm back.

    mergekit 0.1.5 multiplies the kept entries by ``before / after`` (both float32 sums of
    absolute values, divided in float32) unless either norm is below 1e-7. The sums here come
    exactly (float64) and are rounded to float32 first, then the same rule applies.

    Args:
        before: ``sum(|delta|)`` before sparsifying.
        after: ``sum(|delta * keep|)``.

    Returns:
        The float32 factor (as a float), or None where mergekit leaves the entries unscaled.
    """
    before32, after32 = (torch.tensor(value, dtype=torch.float32) for value in (before, after))
    if bool(before32 < 1e-7) or bool(after32 < 1e-7):
        return None
    return float(before32 / after32)


def variance_select_count(nonzero: int, fraction: float) -> int:
    """How many elements SCE's select step keeps: ``fraction`` of the nonzero variances, as mergekit.

    mergekit (0.1.5) multiplies the count, an int64 tensor, by the float fraction: the product is
    float32, so above 2**24 the count is rounded to float32 before truncation (207,187,957 * 0.5
    gives 103,593,976, not 103,593,978). Computed the same way so the same number is kept.

    Args:
        nonzero: number of elements whose variance across task vectors is nonzero.
        fraction: ``select_topk``, in (0, 1].

    Returns:
        The number of elements to keep.
    """
    product = torch.tensor(nonzero, dtype=torch.float32) * torch.tensor(fraction, dtype=torch.float32)
    return int(product)


def draw_keep_mask(
    numel: int, density: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """DARE's random drop for one task vector: keep each entry with probability ``density``.

    Drawn once over the whole tensor, as a bool mask (a quarter of a float32 copy). On CPU the
    draw is the same, element for element, as ``bernoulli_`` on a float32 tensor of the same size
    with the same generator state: the sampler's stream does not depend on the output dtype.

    Args:
        numel: number of elements of the task vector (the mask is flat).
        density: keep probability in (0, 1).
        generator: the random source (same seed, same drop), on ``device``'s type.
        device: where the mask lives (the compute device).

    Returns:
        Flat bool tensor of ``numel`` elements.

    Raises:
        ScfError: the generator is on another device type than the tensor.
    """
    if generator.device.type != device.type:
        raise ScfError(
            f"the random generator is on {generator.device.type} but the tensor is on {device.type}"
        )
    return torch.empty(numel, dtype=torch.bool, device=device).bernoulli_(density, generator=generator)


def elect_signs(votes: list[torch.Tensor], total: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """TIES sign election on one chunk: +1 where the sum over models is >= 0, else -1.

    Args:
        votes: one float32 chunk per model (the weighted or raw task vectors that vote).
        total: float32 scratch of the chunk's size; holds ``sum(votes)`` afterwards.
        out: float32 chunk that receives the elected signs.

    Returns:
        ``out``: +1.0 / -1.0 per element (a zero sum elects +, as mergekit).
    """
    total.zero_()  # summed from +0 in model order, as a sum over a stacked dim 0 does
    for vote in votes:
        total += vote
    plus, minus = (torch.tensor(sign, dtype=out.dtype, device=out.device) for sign in (1.0, -1.0))
    return torch.where(total >= 0, plus, minus, out=out)


def agreeing(delta: torch.Tensor, elected_sign: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Which entries of one model's chunk have the elected sign (zero entries never agree).

    Args:
        delta: the model's (weighted) task-vector chunk, float32.
        elected_sign: float32 chunk of +1 / -1.
        scratch: float32 scratch of the chunk's size.

    Returns:
        bool chunk: ``sign(delta) == elected_sign``.
    """
    return torch.mul(delta, elected_sign, out=scratch) > 0


def variance_across(
    deltas: list[torch.Tensor], out: torch.Tensor, scratch: list[torch.Tensor]
) -> torch.Tensor:
    """SCE's select score for one chunk: per element, the population variance across models.

    Computed in float64 and rounded to float32 once, like ``torch.var(torch.stack(deltas), dim=0,
    unbiased=False)``, whose CPU kernel accumulates in float64 too, but one element at a time
    (about 100x slower). With two models both are exactly ``((a - b) / 2) ** 2`` before that
    rounding, so the float32 results are identical; with more they agree to float64 rounding.

    Args:
        deltas: one float32 chunk per model.
        out: float32 chunk that receives the variances.
        scratch: three float64 buffers of the chunk's size.

    Returns:
        ``out``.
    """
    mean, deviation, squares = scratch
    mean.copy_(deltas[0])
    for delta in deltas[1:]:
        mean += delta
    mean /= len(deltas)
    squares.zero_()
    for delta in deltas:
        squares += torch.sub(delta, mean, out=deviation).square_()
    return out.copy_(squares.div_(len(deltas)))
