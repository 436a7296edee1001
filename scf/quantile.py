"""Exact order statistics and quantiles of float32 tensors of any size, in O(n), on CPU or CUDA.

``torch.quantile`` refuses more than 2**24 elements and ``sort``/``kthvalue`` are slow on the
~10**9-element tensors of real embeddings. This module selects exactly with a two-level radix
select on the float32 bit pattern, using only plain torch ops (shifts, ``bincount``, comparisons),
so CPU and CUDA run the same code:

1. one pass histograms the high 16 bits of every element (sign, exponent, 7 mantissa bits);
   a cumulative sum of that histogram says which bucket holds the k-th smallest element;
2. one pass per wanted bucket histograms the low 16 bits of the elements in that bucket, which
   pins the k-th element's full bit pattern, so its value is exact.

For non-negative floats the int32 bit pattern orders like the float; negative floats order in
reverse, which is handled by flipping their half of each histogram, not by touching the data.

Quantiles interpolate linearly between neighbouring order statistics like numpy/torch's default:
up to 2**24 elements the result is bit-identical to ``torch.quantile`` (which computes positions in
the input's float32); beyond that, where torch refuses, it is identical to ``numpy.quantile`` (float64
positions, as numpy computes them).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np
import torch

from scf.errors import ScfError

_HALF = 1 << 16  # buckets per level: 16 bits
_SIGN_SPLIT = 1 << 15  # raw buckets at or above this hold negative floats
_CHUNK_ELEMENTS = 1 << 20  # elements per pass step: fewer, cache-sized steps (4 MB int32 scratch)
_TORCH_QUANTILE_MAX = 1 << 24  # the largest input torch.quantile accepts


def order_statistics(values: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """Exact k-th smallest elements (0-based, as in a sorted copy) of a float32 tensor.

    Args:
        values: float32 tensor of any shape and device; every element must be finite.
        ks: 0-based ranks, each in ``[0, values.numel())``.

    Returns:
        One float per rank, the exact element value (as ``sorted(values.flatten())[k]``).

    Raises:
        ScfError: wrong dtype, empty tensor, rank out of range, or an inf/NaN element.
    """
    bits = _int_bits(values)
    n = bits.numel()
    for k in ks:
        if not 0 <= k < n:
            raise ScfError(f"order statistic rank {k} is out of range for {n} elements")

    # Pass 1: which high-16-bit bucket holds each wanted rank.
    high_counts = _ordered(_histogram_high(bits))
    before_bucket = torch.cumsum(high_counts, 0).cpu()
    wanted: dict[int, list[tuple[int, int]]] = {}  # bucket -> [(k, rank inside bucket)]
    for k in ks:
        bucket = int(torch.searchsorted(before_bucket, k, right=True))
        below = int(before_bucket[bucket - 1]) if bucket > 0 else 0
        wanted.setdefault(bucket, []).append((k, k - below))

    # Pass 2: within the wanted buckets, the low 16 bits pin the exact values.
    raw_buckets = [_raw_bucket(bucket) for bucket in wanted]
    low_counts = _histogram_low(bits, raw_buckets)
    found: dict[int, float] = {}
    for (_, ranks), raw, counts in zip(wanted.items(), raw_buckets, low_counts, strict=True):
        negative = raw >= _SIGN_SPLIT  # negative floats: bigger low bits mean smaller values
        before_low = torch.cumsum(counts.flip(0) if negative else counts, 0)
        for k, rank in ranks:
            low = int(torch.searchsorted(before_low, rank, right=True))
            found[k] = _float_from_bits((raw << 16) | (_HALF - 1 - low if negative else low))
    return [found[k] for k in ks]


def quantiles(values: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """Exact quantiles of all elements with linear interpolation (numpy/torch's default method).

    Args:
        values: float32 tensor of any shape and device; every element must be finite.
        qs: quantile levels in ``[0, 1]``.

    Returns:
        One float per level. Up to 2**24 elements: bit-identical to
        ``torch.quantile(values.flatten(), torch.tensor(qs))``; beyond: identical to
        ``numpy.quantile(values.flatten().numpy(), qs)``.

    Raises:
        ScfError: wrong dtype, empty tensor, a level outside [0, 1], or an inf/NaN element.

    Example:
        >>> quantiles(torch.tensor([4.0, 1.0, 3.0, 2.0]), [0.25, 0.5])
        [1.75, 2.5]
    """
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ScfError(f"quantile level {q} is outside [0, 1]")
    n = values.numel()
    if n == 0:
        raise ScfError("cannot take quantiles of an empty tensor")
    if n <= _TORCH_QUANTILE_MAX:
        return _quantiles_like_torch(values, qs)
    return _quantiles_like_numpy(values, qs)


def _quantiles_like_torch(values: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """torch.quantile's arithmetic: float32 positions, then torch.lerp on the same device."""
    last = torch.tensor(values.numel() - 1, dtype=torch.float32)
    positions = torch.tensor(list(qs), dtype=torch.float32) * last
    below = positions.floor().long().tolist()
    above = positions.ceil().long().tolist()
    stats = dict(zip(below + above, order_statistics(values, below + above), strict=True))
    device = values.device
    start = torch.tensor([stats[k] for k in below], dtype=torch.float32, device=device)
    end = torch.tensor([stats[k] for k in above], dtype=torch.float32, device=device)
    weight = (positions - positions.floor()).to(device)
    return torch.lerp(start, end, weight).tolist()


def _quantiles_like_numpy(values: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """numpy.quantile's arithmetic: float64 positions, float32 difference, float64 blend."""
    last = values.numel() - 1
    positions = [q * last for q in qs]
    below = [math.floor(p) for p in positions]
    above = [min(b + 1, last) for b in below]
    stats = dict(zip(below + above, order_statistics(values, below + above), strict=True))
    out = []
    for pos, lo, hi in zip(positions, below, above, strict=True):
        start, end = np.float32(stats[lo]), np.float32(stats[hi])
        weight = pos - lo
        diff = end - start  # float32, as numpy subtracts the two float32 neighbours
        if weight >= 0.5:
            out.append(float(np.float64(end) - np.float64(diff) * (1.0 - weight)))
        else:
            out.append(float(np.float64(start) + np.float64(diff) * weight))
    return out


def _int_bits(values: torch.Tensor) -> torch.Tensor:
    """The flat int32 view of a float32 tensor's bit patterns (no copy when contiguous)."""
    if values.dtype != torch.float32:
        raise ScfError(f"exact quantiles need a float32 tensor, got {values.dtype}")
    if values.numel() == 0:
        raise ScfError("cannot take order statistics of an empty tensor")
    return values.detach().contiguous().view(-1).view(torch.int32)


def _chunks(flat: torch.Tensor):
    """Consecutive 1-D slices of at most _CHUNK_ELEMENTS elements."""
    for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
        yield flat[start : start + _CHUNK_ELEMENTS]


def _scratch(bits: torch.Tensor) -> torch.Tensor:
    """A reusable int32 buffer of one chunk (fresh large allocations cost page faults each time)."""
    return torch.empty(min(bits.numel(), _CHUNK_ELEMENTS), dtype=torch.int32, device=bits.device)


def _histogram_high(bits: torch.Tensor) -> torch.Tensor:
    """Counts per raw high-16-bit bucket (bucket = top 16 bits as an unsigned number)."""
    counts = torch.zeros(_HALF, dtype=torch.int64, device=bits.device)
    scratch = _scratch(bits)
    for chunk in _chunks(bits):
        raw = scratch[: chunk.numel()]
        torch.bitwise_right_shift(chunk, 16, out=raw).bitwise_and_(_HALF - 1)
        counts += torch.bincount(raw, minlength=_HALF)
    nonfinite = counts[0x7F80:_SIGN_SPLIT].sum() + counts[0xFF80:].sum()  # exponent all ones
    if int(nonfinite) > 0:
        raise ScfError(f"cannot rank values: {int(nonfinite)} element(s) are inf or NaN")
    return counts


def _histogram_low(bits: torch.Tensor, raw_buckets: list[int]) -> torch.Tensor:
    """Counts per low-16-bit value among the elements of each given raw high bucket, in one pass.

    Returns:
        int64 tensor ``(len(raw_buckets), 2**16)`` on the CPU.
    """
    groups = len(raw_buckets)
    device = bits.device
    # Each element's group (its target bucket's position, or `groups` for all other buckets)
    # goes above its low 16 bits, so one counting op histograms every target at once.
    group_of_bucket = torch.full((_HALF,), groups, dtype=torch.int32, device=device)
    group_of_bucket[raw_buckets] = torch.arange(groups, dtype=torch.int32, device=device)
    counts = torch.zeros((groups + 1) * _HALF, dtype=torch.int64, device=device)
    raw_all, combined_all = _scratch(bits), _scratch(bits)
    for chunk in _chunks(bits):
        raw, combined = raw_all[: chunk.numel()], combined_all[: chunk.numel()]
        torch.bitwise_right_shift(chunk, 16, out=raw).bitwise_and_(_HALF - 1)
        torch.index_select(group_of_bucket, 0, raw, out=combined).bitwise_left_shift_(16)
        combined.bitwise_or_(torch.bitwise_and(chunk, _HALF - 1, out=raw))
        # bincount, not a scatter-add into `counts`: about twice as fast on CPU.
        counts += torch.bincount(combined, minlength=(groups + 1) * _HALF)
    return counts.view(groups + 1, _HALF)[:groups].cpu()


def _ordered(raw_counts: torch.Tensor) -> torch.Tensor:
    """Raw bucket counts reordered by value: negative buckets (reversed) first, then non-negative."""
    return torch.cat([raw_counts[_SIGN_SPLIT:].flip(0), raw_counts[:_SIGN_SPLIT]])


def _raw_bucket(ordered_bucket: int) -> int:
    """The raw high-16-bit pattern of a bucket index in value order (inverse of _ordered)."""
    if ordered_bucket >= _SIGN_SPLIT:
        return ordered_bucket - _SIGN_SPLIT
    return _HALF - 1 - ordered_bucket


def _float_from_bits(pattern: int) -> float:
    """The float32 whose IEEE-754 bit pattern is the unsigned 32-bit ``pattern``."""
    return struct.unpack("<f", struct.pack("<I", pattern))[0]
