"""What every merge method receives, and the scratch and chunking helpers they share.

A method is a pure function ``fn(inputs: TensorInputs, params) -> Tensor`` whose ``params`` is a
validated model from ``scf.methods.params``. It gets one tensor name's worth of tensors on the
compute device: float32, or, for a method registered with ``stored_dtype=True``, in the dtype they
are stored in (bf16/fp16/fp32, possibly read-only views of memory-mapped files), which it converts
to float32 a chunk at a time. It returns the fused tensor (a float dtype, base's shape and device).
It never opens files, never touches the global RNG and never modifies its inputs (the engine
compares the result against them afterwards).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from scf.errors import ScfError


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


def element_chunks(numel: int, chunk: int) -> list[slice]:
    """Consecutive slices of at most ``chunk`` elements covering ``range(numel)`` (flat views).

    Methods work a cache-sized chunk at a time: every float32 temporary is chunk-sized, not
    tensor-sized, and inputs stored in bf16/fp16 are upcast one chunk at a time.
    """
    return [slice(start, min(start + chunk, numel)) for start in range(0, numel, chunk)]


def require_reference(inputs: TensorInputs, method: str) -> torch.Tensor:
    """The reference tensor, or a ScfError explaining why task-vector methods need one."""
    if inputs.reference is None:
        raise ScfError(
            f"tensor {inputs.name!r}: method {method!r} needs `reference`, the common ancestor that "
            "base and secondaries were fine-tuned from: task vectors are differences from it"
        )
    return inputs.reference


def check_one_secondary(inputs: TensorInputs, method: str) -> None:
    """ScfError unless there is exactly one secondary (the registry checks this before a merge)."""
    if len(inputs.secondaries) != 1:
        raise ScfError(
            f"tensor {inputs.name!r}: method {method!r} merges the base with exactly one secondary, "
            f"got {len(inputs.secondaries)}"
        )


CHUNK_ELEMENTS = 1 << 20
"""Elements per streaming step: every float32 temporary is this size (4 MB), not the tensor's."""


class Stream:
    """One tensor's inputs, walked in flat float32 chunks, and the result they are merged into.

    With a ``reference`` the chunks are task vectors ``model - reference``; without one, the models
    themselves. Buffers come from the engine's workspace when there is one (kept from one tensor
    to the next: no page faults per tensor), else they are allocated here. The result is made in
    the engine's output dtype: rounding each float32 chunk is what the engine would do to a float32
    result, without a float32 copy of the whole tensor.

    Attributes:
        models: the flat models ``[base, *secondaries]``, as stored (read-only).
        reference: the flat reference, or None.
        numel: elements of the tensor.
        device: the compute device.
        out: the flat result, in ``inputs.out_dtype`` (float32 when None).
    """

    def __init__(self, inputs: TensorInputs, reference: torch.Tensor | None) -> None:
        self.models = [model.reshape(-1) for model in inputs.models]
        self.reference = None if reference is None else reference.reshape(-1)
        self.numel = inputs.base.numel()
        self.device = inputs.base.device
        self._workspace = inputs.workspace or Workspace()  # a throwaway one allocates afresh
        self.out = torch.empty(self.numel, dtype=inputs.out_dtype or torch.float32, device=self.device)

    def buffer(self, key: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A flat scratch tensor, valid until the next request of the same key."""
        return self._workspace.get(f"stream.{key}", (numel,), dtype, self.device)

    def scores(self) -> torch.Tensor:
        """A float32 tensor of the tensor's size for whole-tensor statistics (|delta|, variances).

        The result itself when it is float32: it is free until the final pass writes it, and that
        pass reads each chunk's scores before writing the chunk.
        """
        if self.out.dtype == torch.float32:
            return self.out
        return self.buffer("scores", self.numel)

    def chunk_buffers(self, key: str, count: int, dtype: torch.dtype = torch.float32,
                      step: int | None = None) -> list[torch.Tensor]:
        """``count`` scratch tensors of one chunk's size (``step``, default ``CHUNK_ELEMENTS``)."""
        size = min(self.numel, step or CHUNK_ELEMENTS)
        return [self.buffer(f"{key}.{i}", size, dtype) for i in range(count)]

    def chunks(
        self, models: list[torch.Tensor] | None = None, *, step: int | None = None
    ) -> Iterator[tuple[slice, torch.Tensor | None, list[torch.Tensor]]]:
        """Walk flat chunks of the task vectors (or the models, without a reference) in float32.

        Args:
            models: the flat models to walk (default: all).
            step: elements per chunk (default ``CHUNK_ELEMENTS``; a multiple of a row length walks
                whole rows).

        Yields:
            ``(chunk, reference_chunk, values)``: the flat slice, the reference's chunk as float32
            (read-only; None without a reference) and one float32 chunk per model, in buffers that
            the next step reuses (the caller may modify them).
        """
        models = self.models if models is None else models
        step = step or CHUNK_ELEMENTS
        reference_buffer, *buffers = self.chunk_buffers("chunk", len(models) + 1, step=step)
        for chunk in element_chunks(self.numel, step):
            length = chunk.stop - chunk.start
            if self.reference is None:
                yield chunk, None, [buffer[:length].copy_(model[chunk]) for model, buffer in
                                    zip(models, buffers, strict=True)]
                continue
            reference_chunk = self.reference[chunk]
            if reference_chunk.dtype != torch.float32:
                reference_chunk = reference_buffer[:length].copy_(reference_chunk)
            # A float32 operand makes the subtraction float32 (exact upcast of bf16/fp16 first).
            deltas = [
                torch.sub(model[chunk], reference_chunk, out=buffer[:length])
                for model, buffer in zip(models, buffers, strict=True)
            ]
            yield chunk, reference_chunk, deltas

    def write(self, chunk: slice, reference_chunk: torch.Tensor | None, merged: torch.Tensor) -> None:
        """Store ``reference + merged`` (or ``merged``, without a reference) for one chunk.

        ``merged`` is consumed (it may be modified).
        """
        if reference_chunk is None:
            self.out[chunk].copy_(merged)
        elif self.out.dtype == torch.float32:
            torch.add(reference_chunk, merged, out=self.out[chunk])
        else:
            self.out[chunk].copy_(merged.add_(reference_chunk))

    def result(self, shape: torch.Size) -> torch.Tensor:
        """The result in the tensor's shape."""
        return self.out.view(shape)
