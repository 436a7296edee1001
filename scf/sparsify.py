"""Pure tensor functions that sparsify task vectors and elect signs (the task-arithmetic family).

Everything here takes tensors and returns tensors; sampling uses the caller's ``torch.Generator``,
never the global RNG.
"""

from __future__ import annotations

import torch

from scf.errors import ScfError
from scf.quantile import order_statistics

_TIE_CHUNK = 1 << 22  # elements per step when filling ties (bounds the nonzero() index buffer)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` elements with the largest ``scores``.

    Elements equal to the k-th largest score are taken in flat index order until ``k`` are set,
    so the count is exact even with ties (mergekit's sort leaves that order unspecified).

    Args:
        scores: float32 tensor (any shape), e.g. ``|delta|``.
        k: how many elements to keep; ``<= 0`` keeps none, ``>= numel`` keeps all.

    Returns:
        bool tensor of ``scores``' shape with exactly ``clamp(k, 0, numel)`` True values.
    """
    scores = scores.contiguous()
    n = scores.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    (kth_largest,) = order_statistics(scores, [n - k])
    mask = scores > kth_largest
    missing = k - int(mask.sum())
    flat_mask, flat_scores = mask.view(-1), scores.reshape(-1)
    for start in range(0, n, _TIE_CHUNK):
        if missing == 0:
            break
        ties = (flat_scores[start : start + _TIE_CHUNK] == kth_largest).nonzero().squeeze(1)[:missing]
        flat_mask[start + ties] = True
        missing -= ties.numel()
    return mask


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest-magnitude entries of a task vector, zero the rest.

    Args:
        delta: float32 task vector.
        density: fraction to keep, in (0, 1]; 1 returns ``delta`` unchanged. A tensor so small that
            ``int(density * numel) == 0`` is zeroed entirely (mergekit asserts instead).

    Returns:
        A new tensor (or ``delta`` itself when density >= 1).
    """
    if density >= 1:
        return delta
    return delta * topk_mask(delta.abs(), int(density * delta.numel()))


def bernoulli(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's random drop: keep each entry with probability ``density``, independently.

    Args:
        delta: float32 task vector.
        density: keep probability in (0, 1]; 1 returns ``delta`` unchanged.
        generator: the random source (same seed, same drop), on ``delta``'s device type.

    Returns:
        ``delta`` with dropped entries set to 0 (a new tensor unless density >= 1). Rescaling
        is left to the caller.
    """
    if density >= 1:
        return delta
    if generator.device.type != delta.device.type:
        raise ScfError(
            f"the random generator is on {generator.device.type} but the tensor is on {delta.device.type}"
        )
    keep = torch.empty_like(delta).bernoulli_(density, generator=generator)
    return keep.mul_(delta)


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election: which entries agree with the sign of the per-element sum.

    Args:
        deltas: ``(models, *shape)`` stacked (weighted) task vectors.

    Returns:
        bool ``(models, *shape)``: True where an entry's sign equals the elected sign; the elected
        sign is + where the sum over models is >= 0, else -. Zero entries never agree.
    """
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == elected


def variance_topk_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """SCE's select step: keep the elements whose task vectors vary most across models.

    Args:
        deltas: ``(models, *shape)`` stacked task vectors.
        fraction: share of the elements with nonzero variance to keep, in (0, 1]; 1 keeps all.

    Returns:
        bool mask of ``shape`` (shared by all models).
    """
    if fraction >= 1:
        return torch.ones(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * fraction)
    return topk_mask(variance, k)
