"""Per-row KL divergences between softmax distributions, and SCF's element importance.

Rows: a tensor of rank >= 2 is seen as ``(shape[0], rest)``; each row's flattened remainder is one
categorical distribution. A rank-1 tensor is a single row. With ``q = softmax(base_row) + eps``
and ``p = softmax(other_row) + eps`` (not renormalised, exactly as in the SCF-RKL paper):

- reverse KL: ``sum(q * log(q / p))``; forward KL: ``sum(p * log(p / q))``.

Precision: fine-tuning deltas make ``q`` and ``p`` nearly equal, so the sum cancels down to a
second-order quantity; in float32 that flips a visible share of SCF's mask. Rows are therefore
evaluated in float64, a chunk of whole rows at a time, so no float64 copy of a whole (embedding-
sized) tensor is ever made.
"""

from __future__ import annotations

import torch

from scf.errors import ScfError

_CHUNK_ELEMENTS = 1 << 18  # elements per row chunk: 2 MB float64 buffers (cache-sized; measured fastest)


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """View a rank >= 1 tensor as ``(rows, row_length)``: first dimension by the rest flattened.

    Args:
        tensor: a tensor of rank >= 1.

    Returns:
        A 2-D view (a copy only if ``tensor`` is not contiguous).
    """
    if tensor.dim() == 0:
        raise ScfError("a scalar has no rows (SCF keeps a scalar's base value instead)")
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
    scratch = _Scratch(base_rows)
    for rows, (b, o) in _row_chunks(base_rows, other_rows):
        out[rows] = scratch.divergence(b, o, eps, reverse)
    return out


def importance(
    base: torch.Tensor, other: torch.Tensor, *, eps: float = 1e-8, reverse: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """SCF importance ``I = |other - base| * KL_row``, the row's divergence broadcast over the row.

    Args:
        base: float tensor of rank >= 1, any float dtype (bf16/fp16 inputs are upcast a chunk of
            rows at a time, never as a whole).
        other: float tensor of the same shape.
        eps: see ``row_divergence``.
        reverse: see ``row_divergence``.
        out: float32 tensor of ``base``'s shape to write into (else a new one).

    Returns:
        float32 tensor of ``base``'s shape (``out`` if given); every element is >= 0.
    """
    base_rows, other_rows = as_rows(base), as_rows(other)
    result = torch.empty(base.shape, dtype=torch.float32, device=base.device) if out is None else out
    result_rows = as_rows(result)
    scratch = _Scratch(base_rows)
    for rows, (b, o) in _row_chunks(base_rows, other_rows):
        b32, o32 = scratch.float32(b, o)
        divergence = scratch.divergence(b32, o32, eps, reverse).to(torch.float32)
        torch.sub(o32, b32, out=result_rows[rows]).abs_().mul_(divergence.unsqueeze(1))
    return result


def _rows_per_chunk(width: int) -> int:
    """Whole rows per chunk: about _CHUNK_ELEMENTS elements, at least one row."""
    return max(1, _CHUNK_ELEMENTS // max(1, width))


def _row_chunks(base_rows: torch.Tensor, other_rows: torch.Tensor):
    """Yield ``(row slice, (base chunk, other chunk))`` with about _CHUNK_ELEMENTS per chunk.

    A chunk always holds whole rows, at least one (a single row longer than the chunk size is
    evaluated whole).
    """
    n_rows, width = base_rows.shape
    per_chunk = _rows_per_chunk(width)
    for start in range(0, n_rows, per_chunk):
        rows = slice(start, min(start + per_chunk, n_rows))
        yield rows, (base_rows[rows], other_rows[rows])


class _Scratch:
    """Chunk buffers reused for every chunk of one tensor (three float64, two float32).

    Allocating fresh MB-sized tensors per chunk costs page faults that take longer than the math.
    """

    def __init__(self, rows: torch.Tensor) -> None:
        n_rows, width = rows.shape
        shape = (min(n_rows, _rows_per_chunk(width)), width)
        self.q, self.p, self.upcast = (torch.empty(shape, dtype=torch.float64, device=rows.device)
                                       for _ in range(3))
        self.b32, self.o32 = (torch.empty(shape, dtype=torch.float32, device=rows.device) for _ in range(2))

    def float32(self, b: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk of rows of both tensors as float32 (a view when already float32)."""
        n = b.shape[0]
        b32 = b if b.dtype == torch.float32 else self.b32[:n].copy_(b)
        o32 = o if o.dtype == torch.float32 else self.o32[:n].copy_(o)
        return b32, o32

    def divergence(self, b: torch.Tensor, o: torch.Tensor, eps: float, reverse: bool) -> torch.Tensor:
        """Row KL of a ``(rows, width)`` chunk, in float64; returns ``(rows,)``."""
        q = self._softmax(b, self.q).add_(eps)  # (rows, width)
        p = self._softmax(o, self.p).add_(eps)
        first, second = (q, p) if reverse else (p, q)
        # second <- first * log(first / second), in its own buffer
        torch.div(first, second, out=second).log_().mul_(first)
        return second.sum(dim=1)

    def _softmax(self, rows: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """float64 softmax over dim 1 of a float32 chunk into ``buffer`` (torch's fused kernel:
        max-shifted, so exp never overflows; one pass instead of five elementwise ones)."""
        upcast = self.upcast[: rows.shape[0]].copy_(rows)
        return torch.softmax(upcast, dim=1, out=buffer[: rows.shape[0]])
