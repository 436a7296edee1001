"""What every merge method receives and the pieces of parameter checking they share.

A method is a pure function ``fn(inputs: TensorInputs, params: MethodParams) -> Tensor``. It gets one
tensor name's worth of tensors on the compute device: float32, or, for a method registered with
``stored_dtype=True``, in the dtype they are stored in (bf16/fp16/fp32, possibly read-only views of
memory-mapped files), which it converts to float32 a chunk at a time. It returns the fused tensor
(a float dtype, base's shape and device). It never opens files, never touches the global RNG and
never modifies its inputs (the engine compares the result against them afterwards).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict


class Workspace:
    """Scratch buffers that outlive one tensor, so the next tensor's scratch costs no page faults.

    A fresh multi-MB tensor is paid for once more on first touch (a page fault per 4 KiB, on CPU
    about as long as a pass of arithmetic over it). Merging asks for the same scratch for every
    tensor, so each buffer grows to the largest size it is asked for once and is reused after.
    A buffer is only valid until the next `get` of its key: never return one from a method.
    """

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, key: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` backed by the buffer named ``key``.

        Args:
            key: the buffer's name (one per concurrent use, e.g. ``"scf.importance"``).
            shape: the shape wanted.
            dtype: its dtype.
            device: its device.

        Returns:
            A view of the buffer (grown, and so reallocated, when too small).
        """
        numel = math.prod(shape)
        flat = self._flat.get(key)
        if flat is None or flat.numel() < numel or flat.dtype != dtype or flat.device != torch.device(device):
            self._flat.pop(key, None)  # free the old buffer before making the larger one
            flat = self._flat[key] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(tuple(shape))

    def clear(self) -> None:
        """Free every buffer."""
        self._flat.clear()


@dataclass
class TensorInputs:
    """The tensors of one name, as the engine hands them to a method.

    Attributes:
        name: tensor name (used in error messages and to seed per-tensor RNGs).
        base: the base model's tensor on the compute device (float32, or its stored dtype for a
            ``stored_dtype`` method).
        secondaries: one tensor per secondary model, same shape and device as ``base``.
        reference: the common ancestor's tensor (task-vector methods), or None.
        generator: a ``torch.Generator`` on the compute device seeded from (seed, name) by the
            engine, for methods that sample (DARE); None when the method needs none.
        workspace: tensor-sized scratch buffers kept from one tensor to the next (None: the
            method allocates its own).
        out_dtype: the dtype the engine writes; a method may return it directly (rounding each
            float32 chunk as the engine would round the whole) to skip a float32 copy of the result.
    """

    name: str
    base: torch.Tensor
    secondaries: list[torch.Tensor]
    reference: torch.Tensor | None = None
    generator: torch.Generator | None = None
    workspace: Workspace | None = None
    out_dtype: torch.dtype | None = None

    @property
    def models(self) -> list[torch.Tensor]:
        """The contributing models in per-model-parameter order: ``[base, *secondaries]``."""
        return [self.base, *self.secondaries]


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown keys, inf and NaN are errors; immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


PerModel = float | list[float]
"""A per-model parameter: one value for every model, or a list with one value per model."""


def per_model_values(value: PerModel, n_models: int) -> list[float]:
    """Expand a per-model parameter to one value per contributing model.

    Args:
        value: a scalar (shared by all models) or a list already of length ``n_models``.
        n_models: number of contributing models, ``1 + len(secondaries)``.

    Returns:
        A list of ``n_models`` floats.
    """
    if isinstance(value, Sequence):
        return [float(v) for v in value]
    return [float(value)] * n_models


def check_each(value: PerModel, low: float, high: float, *, low_open: bool = False) -> PerModel:
    """Raise ValueError unless every value of a per-model parameter lies in the given interval.

    Args:
        value: a scalar or a list of floats.
        low: lower bound (inclusive unless ``low_open``).
        high: upper bound (inclusive).
        low_open: exclude ``low`` itself.

    Returns:
        ``value`` unchanged, so it can end a pydantic field validator.
    """
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise ValueError("must not be an empty list")
    for v in values:
        above_low = v > low if low_open else v >= low
        if not (math.isfinite(v) and above_low and v <= high):  # NaN fails every comparison
            bracket = "(" if low_open else "["
            raise ValueError(f"must be a finite number in {bracket}{low}, {high}], got {v}")
    return value


def element_chunks(numel: int, chunk: int) -> list[slice]:
    """Consecutive slices of at most ``chunk`` elements covering ``range(numel)`` (flat views).

    Methods work a cache-sized chunk at a time: every float32 temporary is chunk-sized, not
    tensor-sized, and inputs stored in bf16/fp16 are upcast one chunk at a time.
    """
    return [slice(start, min(start + chunk, numel)) for start in range(0, numel, chunk)]
