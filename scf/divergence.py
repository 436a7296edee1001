"""Per-row KL divergences between softmax distributions, and SCF's element importance.

Rows: a tensor of rank >= 2 is seen as ``(shape[0], rest)``; each row's flattened remainder is one
categorical distribution. A rank-1 tensor is a single row. With ``q = softmax(base_row) + eps``
and ``p = softmax(other_row) + eps`` (not renormalised, exactly as in the SCF-RKL paper):

- reverse KL: ``sum(q * log(q / p))``; forward KL: ``sum(p * log(p / q))``.

Precision: fine-tuning deltas make ``q`` and ``p`` nearly equal, so the sum cancels down to a
second-order quantity; in float32 that flips a visible share of SCF's mask. Rows are therefore
evaluated in float64, a chunk of whole rows at a time, so no float64 copy of a whole (embedding-
sized) tensor is ever made. Rows are consumed while still in cache to also build the importance.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 17  # float64 elements per row chunk: two 1 MB buffers that stay in cache


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """View a rank >= 1 tensor as ``(rows, row_length)``: first dimension by the rest flattened.

    Args:
        tensor: a tensor of rank >= 1.

    Returns:
        A 2-D view (a copy only if ``tensor`` is not contiguous).
    """
    if tensor.dim() == 0:
        raise ValueError("a scalar has no rows")
    if tensor.dim() == 1:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], -1)


def row_divergence(
    base: torch.Tensor, other: torch.Tensor, *, eps: float = 1e-8, reverse: bool = True
) -> torch.Tensor:
    """KL divergence of every row of ``base`` and ``other`` (softmax + eps distributions).

    Args:
        base: float tensor of rank >= 1 (gives ``q``).
        other: float tensor of the same shape (gives ``p``).
        eps: added to each softmax probability (no renormalising).
        reverse: True for ``KL(q || p) = sum q log(q/p)`` (SCF-RKL), False for ``KL(p || q)``.

    Returns:
        float64 tensor of shape ``(rows,)`` on ``base``'s device.
    """
    base_rows, other_rows = as_rows(base), as_rows(other)
    out = torch.empty(base_rows.shape[0], dtype=torch.float64, device=base.device)
    for rows, (b, o) in _row_chunks(base_rows, other_rows):
        out[rows] = _chunk_divergence(b, o, eps, reverse)
    return out


def importance(
    base: torch.Tensor, other: torch.Tensor, *, eps: float = 1e-8, reverse: bool = True
) -> torch.Tensor:
    """SCF importance ``I = |other - base| * KL_row``, the row's divergence broadcast over the row.

    Args:
        base: float32 tensor of rank >= 1.
        other: float32 tensor of the same shape.
        eps: see ``row_divergence``.
        reverse: see ``row_divergence``.

    Returns:
        float32 tensor of ``base``'s shape; every element is >= 0.
    """
    base_rows, other_rows = as_rows(base), as_rows(other)
    result = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    result_rows = as_rows(result)
    for rows, (b, o) in _row_chunks(base_rows, other_rows):
        divergence = _chunk_divergence(b, o, eps, reverse).to(torch.float32)
        chunk = result_rows[rows]
        torch.sub(o, b, out=chunk).abs_().mul_(divergence.unsqueeze(1))
    return result


def _row_chunks(base_rows: torch.Tensor, other_rows: torch.Tensor):
    """Yield ``(row slice, (base chunk, other chunk))`` with about _CHUNK_ELEMENTS per chunk.

    A chunk always holds whole rows, at least one (a single row longer than the chunk size is
    evaluated whole).
    """
    n_rows, width = base_rows.shape
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, width))
    for start in range(0, n_rows, per_chunk):
        rows = slice(start, min(start + per_chunk, n_rows))
        yield rows, (base_rows[rows], other_rows[rows])


def _chunk_divergence(b: torch.Tensor, o: torch.Tensor, eps: float, reverse: bool) -> torch.Tensor:
    """Row KL of a ``(rows, width)`` chunk, in float64."""
    q = torch.softmax(b.to(torch.float64), dim=1).add_(eps)  # (rows, width)
    p = torch.softmax(o.to(torch.float64), dim=1).add_(eps)
    first, second = (q, p) if reverse else (p, q)
    # second <- first * log(first / second), reusing its buffer
    torch.div(first, second, out=second).log_().mul_(first)
    return second.sum(dim=1)
