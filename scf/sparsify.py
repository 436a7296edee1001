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
        ties_left = self.ties

        def mask(chunk_scores: torch.Tensor) -> torch.Tensor:
            nonlocal ties_left
            keep = chunk_scores > self.threshold
            if ties_left > 0:
                tie_positions = (chunk_scores == self.threshold).view(-1).nonzero().squeeze(1)[:ties_left]
                keep.view(-1)[tie_positions] = True
                ties_left -= tie_positions.numel()
            return keep

        return mask


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
