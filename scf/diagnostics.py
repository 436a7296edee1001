"""Merge diagnostics from the SCF-RKL paper, section 3: how far the fused weights moved from the base.

- normalized spectral shift of a matrix: ``||sigma(W_f) - sigma(W_b)||_2 / ||sigma(W_b)||_2`` over
  all singular values (0 = same spectrum);
- largest principal angle, in degrees, between the spans of the top-k left singular vectors of
  base and fused (0 = same dominant output subspace, 90 = a direction of one is orthogonal to
  the other);
- per-layer sparsity: share of each layer's elements left at the base value.

Cost: one SVD per matrix for base and fused (float64 up to 2**20 elements, float32 above), so
diagnostics are computed only for chosen 2-D tensors, and matrices larger than
`MAX_ELEMENTS` are skipped (listed under ``skipped``) rather than making a merge take hours.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable

import torch

DEFAULT_TOP_K = 16
DEFAULT_N_LAYERS = 3
MAX_ELEMENTS = 2**26  # ~67M: a 7B-8B model's MLP matrices fit, a 70B model's do not
_FLOAT64_ELEMENTS = 2**20
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_DEFAULT_KINDS = ("attn", "attention", "mlp")


def layer_index(name: str) -> int | None:
    """The transformer layer number in a tensor name (``model.layers.7.mlp...`` -> 7), or None."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def select_matrices(shapes: dict[str, tuple[int, ...]], patterns: list[str],
                    n_layers: int = DEFAULT_N_LAYERS) -> list[str]:
    """Choose the 2-D tensors to diagnose.

    Args:
        shapes: every tensor name with its shape.
        patterns: glob patterns (``fnmatch``) of names; empty means the attention and MLP
            weights of ``n_layers`` evenly spaced layers (first, ..., last).
        n_layers: how many layers the default picks.

    Returns:
        The chosen names, in the order of ``shapes``.
    """
    matrices = [name for name, shape in shapes.items() if len(shape) == 2]
    if patterns:
        return [n for n in matrices if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    layers = sorted({i for n in matrices if (i := layer_index(n)) is not None})
    if not layers:
        return []
    count = min(n_layers, len(layers))
    picks = {layers[round(j * (len(layers) - 1) / max(count - 1, 1))] for j in range(count)}
    return [n for n in matrices if layer_index(n) in picks and any(k in n for k in _DEFAULT_KINDS)]


def matrix_diagnostics(base: torch.Tensor, fused: torch.Tensor,
                       top_k: int = DEFAULT_TOP_K) -> dict[str, float]:
    """Spectral shift and largest principal angle between base and fused versions of a matrix.

    Args:
        base: the base matrix (any float dtype and device).
        fused: the fused matrix, same shape.
        top_k: size of the compared left singular subspaces (capped at the smaller dimension).

    Returns:
        ``{"spectral_shift": float, "principal_angle_deg": float}``.
    """
    dtype = torch.float64 if base.numel() <= _FLOAT64_ELEMENTS else torch.float32
    u_base, s_base, _ = torch.linalg.svd(base.to(dtype), full_matrices=False)
    u_fused, s_fused, _ = torch.linalg.svd(fused.to(dtype), full_matrices=False)
    shift = torch.linalg.vector_norm(s_fused - s_base) / torch.linalg.vector_norm(s_base).clamp_min(1e-30)
    k = min(top_k, s_base.numel())
    # Cosines of the principal angles are the singular values of U_b^T U_f (k x k).
    cosines = torch.linalg.svdvals(u_base[:, :k].T @ u_fused[:, :k]).clamp(0.0, 1.0)
    angle = math.degrees(math.acos(float(cosines.min())))
    return {"spectral_shift": float(shift), "principal_angle_deg": angle}


def layer_sparsity(records: Iterable[dict]) -> dict[str, float]:
    """Share of elements left at the base value, per transformer layer.

    Args:
        records: per-tensor report entries (``name``, ``shape``, ``sparsity``).

    Returns:
        ``{layer number as str: sparsity}`` plus ``"other"`` for tensors outside layers
        (embeddings, final norm, head), weighted by element count.
    """
    kept: dict[str, float] = {}
    total: dict[str, int] = {}
    for record in records:
        index = layer_index(record["name"])
        key = "other" if index is None else str(index)
        numel = math.prod(record["shape"])
        kept[key] = kept.get(key, 0.0) + record["sparsity"] * numel
        total[key] = total.get(key, 0) + numel
    order = sorted(kept, key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
    return {k: kept[k] / total[k] if total[k] else 1.0 for k in order}
