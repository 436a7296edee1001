"""SCF-RKL: sparse complementary fusion with reverse KL (the paper's Algorithm 1), and `scf_kl`.

Per tensor, for each secondary ``s`` against the base ``b``:

1. ``I = |s - b| * KL_row`` (``scf.divergence.importance``; rows = first dimension);
2. ``tau = Q(q_center) + alpha * (Q(q_high) - Q(q_low))`` over all elements of ``I``, exact
   quantiles with linear interpolation (``scf.quantile``);
3. mask ``M = I >= tau``; fused ``= where(M, s, b)``.

Every fused value is bit-identical to the base's or a secondary's value (discrete composition).
A scalar tensor is never masked (the base is kept). When base and secondary are identical, ``I`` is
all zero, so ``tau = 0`` and the mask is all true: the fused tensor is the secondary's, which equals
the base's. With several secondaries each gets its own mask against the base; where masks
overlap, the secondary with the larger importance wins (on an exact tie, the earlier one).
"""

from __future__ import annotations

import numpy as np
import torch

from scf.divergence import importance
from scf.errors import ScfError
from scf.methods.base import TensorInputs, Workspace
from scf.methods.params import ScfParams
from scf.quantile import quantiles

_SELECT_CHUNK = 1 << 22  # elements per step of the final select (4 MB masks: few kernel launches)


def scf_rkl(inputs: TensorInputs, params: ScfParams) -> torch.Tensor:
    """SCF with reverse KL, ``KL(q_base || p_secondary)``: the paper's Algorithm 1.

    Args:
        inputs: base and one or more secondaries (reference and generator unused).
        params: validated SCF parameters.

    Returns:
        The fused tensor in the inputs' common dtype: each element is the base's or one
        secondary's value.
    """
    return _scf(inputs, params, reverse=True)


def scf_kl(inputs: TensorInputs, params: ScfParams) -> torch.Tensor:
    """SCF with forward KL, ``KL(p_secondary || q_base)`` (the paper's ablation).

    Args:
        inputs: base and one or more secondaries (reference and generator unused).
        params: validated SCF parameters.

    Returns:
        The fused tensor in the inputs' common dtype: each element is the base's or one
        secondary's value.
    """
    return _scf(inputs, params, reverse=False)


def threshold(importance_values: torch.Tensor, params: ScfParams) -> float:
    """The mask threshold ``tau = Q(q_center) + alpha * (Q(q_high) - Q(q_low))``, exact.

    Args:
        importance_values: float32 importance of one tensor (any shape).
        params: SCF parameters (quantile levels and alpha).

    Returns:
        The smallest float32 value ``t`` with ``t >= tau`` (tau computed in float64), so that
        ``I >= t`` in float32 is exactly ``I >= tau``.
    """
    low, center, high = quantiles(importance_values, [params.q_low, params.q_center, params.q_high])
    tau = center + params.alpha * (high - low)
    tau32 = np.float32(tau)
    if float(tau32) < tau:
        tau32 = np.nextafter(tau32, np.float32(np.inf))
    return float(tau32)


def _threshold(name: str, scores: torch.Tensor, params: ScfParams) -> float:
    """``threshold`` with errors (inf/NaN weights) naming the tensor."""
    try:
        return threshold(scores, params)
    except ScfError as exc:
        raise ScfError(f"tensor {name!r}: {exc}") from None


def _take_where_important(
    scores: torch.Tensor, tau: float, secondary: torch.Tensor, base: torch.Tensor
) -> torch.Tensor:
    """``where(scores >= tau, secondary, base)``, a chunk at a time, in the inputs' common dtype.

    Chunks keep the mask small and in cache instead of a full-size boolean tensor. Values are
    copied in their stored dtype (exact).
    """
    dtype = torch.promote_types(base.dtype, secondary.dtype)
    fused = torch.empty(base.shape, dtype=dtype, device=base.device)
    flat_scores, flat_fused = scores.view(-1), fused.view(-1)
    flat_secondary, flat_base = secondary.reshape(-1), base.reshape(-1)
    mask = torch.empty(min(flat_scores.numel(), _SELECT_CHUNK), dtype=torch.bool, device=scores.device)
    for start in range(0, flat_scores.numel(), _SELECT_CHUNK):
        chunk = slice(start, start + _SELECT_CHUNK)
        take = torch.ge(flat_scores[chunk], tau, out=mask[: flat_scores[chunk].numel()])
        torch.where(take, flat_secondary[chunk], flat_base[chunk], out=flat_fused[chunk])
    return fused


def _scf(inputs: TensorInputs, params: ScfParams, *, reverse: bool) -> torch.Tensor:
    """Shared body of scf_rkl / scf_kl."""
    base = inputs.base
    if not inputs.secondaries:
        raise ScfError(f"tensor {inputs.name!r}: SCF needs at least one secondary model")
    if base.dim() == 0 or base.numel() == 0:  # no distribution (scalar) or nothing to mask
        return base.clone()
    workspace = inputs.workspace or Workspace()
    if len(inputs.secondaries) == 1:
        (secondary,) = inputs.secondaries
        scores = importance(base, secondary, eps=params.eps, reverse=reverse,
                            out=workspace.get("scf.importance", base.shape, torch.float32, base.device))
        return _take_where_important(scores, _threshold(inputs.name, scores, params), secondary, base)
    fused: torch.Tensor | None = None
    winner: torch.Tensor | None = None  # importance of the secondary chosen so far, per element
    for secondary in inputs.secondaries:
        scores = importance(base, secondary, eps=params.eps, reverse=reverse,
                            out=workspace.get("scf.importance", base.shape, torch.float32, base.device))
        take = scores >= _threshold(inputs.name, scores, params)  # (same shape as base)
        if fused is None:
            winner = torch.where(take, scores, -1.0)  # importance is >= 0, so -1 never wins
            fused = torch.where(take, secondary, base)
            continue
        take &= scores > winner
        torch.where(take, scores, winner, out=winner)
        torch.where(take, secondary, fused, out=fused)
        del scores, take
    return fused
