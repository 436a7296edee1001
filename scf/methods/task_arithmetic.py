"""The task-arithmetic family: one core, ``sparsify -> weight -> sign consensus -> sum -> lambda``.

Task vectors are taken against ``reference`` (the common ancestor; mergekit's ``base_model``).
Every contributing model ``[base, *secondaries]`` gives one task vector ``model - reference``.
`task_arithmetic`, `ties`, `dare_linear` and `dare_ties` are presets of one core (mergekit's
generalized task arithmetic); `sce` reuses its weighting and consensus steps with data-dependent
weights. Names, parameters and defaults follow mergekit.

Memory: the inputs may be bf16/fp16/fp32 and read-only (memory-mapped); nothing of their size is
made but the float32 result (used as scratch for whole-tensor statistics before it is written) and
DARE's bool keep masks. Everything else streams over flat chunks of ``CHUNK_ELEMENTS`` elements:
whole-tensor statistics first (exact, as a few numbers), then each chunk's merged value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import ConfigDict, Field, field_validator

from scf.errors import ScfError
from scf.methods.base import (
    MethodParams,
    PerModel,
    TensorInputs,
    Workspace,
    check_each,
    element_chunks,
    per_model_values,
)
from scf.sparsify import (
    TopK,
    agreeing,
    draw_keep_mask,
    elect_signs,
    magnitude_k,
    variance_across,
    variance_select_count,
)

TASK_ARITHMETIC_URL = "https://arxiv.org/abs/2212.04089"
TIES_URL = "https://arxiv.org/abs/2306.01708"
DARE_URL = "https://arxiv.org/abs/2311.03099"
SCE_URL = "https://arxiv.org/abs/2408.07990"

Sparsifier = Literal["magnitude", "random"] | None


class TaskArithmeticParams(MethodParams):
    """Parameters shared by `task_arithmetic`, `ties`, `dare_linear` and `dare_ties`.

    Each preset subclasses this with mergekit's defaults for ``normalize`` and ``rescale``.

    Attributes:
        weight: per-model weight of each task vector (scalar or one per model). mergekit requires
            it; here it defaults to 1.0.
        density: per-model fraction of each task vector kept by the sparsifier, in (0, 1].
        normalize: divide the summed task vectors by the sum of the (agreeing) weights.
        rescale: divide kept entries by ``density`` after sparsifying (DARE's rescale).
        lambda_: scale of the merged task vector (config key ``lambda``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, serialize_by_alias=True)

    weight: PerModel = 1.0
    density: PerModel = 1.0
    normalize: bool = False
    rescale: bool = False
    lambda_: float = Field(1.0, alias="lambda")

    @field_validator("weight")
    @classmethod
    def _weight_list(cls, value: PerModel) -> PerModel:
        return check_each(value, float("-inf"), float("inf"))

    @field_validator("density")
    @classmethod
    def _density_range(cls, value: PerModel) -> PerModel:
        return check_each(value, 0.0, 1.0, low_open=True)


class TiesParams(TaskArithmeticParams):
    """`ties` parameters: mergekit defaults normalize=true, rescale=false."""

    normalize: bool = True


class DareParams(TaskArithmeticParams):
    """`dare_linear` / `dare_ties` parameters: mergekit defaults normalize=false, rescale=true."""

    rescale: bool = True


class SceParams(MethodParams):
    """`sce` parameters (mergekit's).

    Attributes:
        select_topk: share of the elements with nonzero variance across task vectors to keep,
            in (0, 1]; 1 keeps all.
    """

    select_topk: float = Field(1.0, gt=0.0, le=1.0)


CHUNK_ELEMENTS = 1 << 20
"""Elements per streaming step: every float32 temporary is this size (4 MB), not the tensor's."""

Trim = Callable[[torch.Tensor, slice], torch.Tensor]
"""A task vector's sparsifier, chunk by chunk: ``keep(delta_chunk, chunk) -> bool mask``."""


@dataclass(frozen=True)
class _Combine:
    """How the (sparsified) task vectors of each element are combined into one merged delta.

    Attributes:
        weights: one weight per model ``[base, *secondaries]``.
        consensus: keep only entries whose sign agrees with the elected sign (TIES).
        normalize: divide by the sum of the weights that took part (per element with consensus;
            a zero divisor becomes 1, as in mergekit).
        lambda_: final scale of the merged task vector.
        elect_weighted: elect signs on the weighted task vectors (mergekit GTA) or the raw ones
            (mergekit SCE).
        divisor_floor: with consensus, clamp the divisor to at least this (mergekit SCE's rule)
            instead of turning a zero divisor into 1 (mergekit GTA's rule).
    """

    weights: list[float]
    consensus: bool
    normalize: bool
    lambda_: float = 1.0
    elect_weighted: bool = True
    divisor_floor: float | None = None


class _Stream:
    """One tensor's task vectors, walked in flat chunks, and where the merged values go.

    Buffers come from the engine's workspace when there is one (kept from one tensor to the
    next: no page faults per tensor), else they are allocated here.
    """

    def __init__(self, inputs: TensorInputs, method: str) -> None:
        self.reference = _reference(inputs, method).reshape(-1)
        self.models = [model.reshape(-1) for model in inputs.models]
        self.numel = self.reference.numel()
        self.device = self.reference.device
        self._workspace = inputs.workspace or Workspace()  # a throwaway one allocates afresh
        # The engine writes out_dtype: rounding each float32 chunk here is what it would do to a
        # float32 result, without a float32 copy of the whole tensor.
        self.out = torch.empty(self.numel, dtype=inputs.out_dtype or torch.float32, device=self.device)

    def buffer(self, key: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A flat scratch tensor, valid until the next request of the same key."""
        return self._workspace.get(f"task_vectors.{key}", (numel,), dtype, self.device)

    def scores(self) -> torch.Tensor:
        """A float32 tensor of the tensor's size for whole-tensor statistics (|delta|, variances).

        The result itself when it is float32: it is free until the final pass writes it, and that
        pass reads each chunk's scores before writing the chunk.
        """
        if self.out.dtype == torch.float32:
            return self.out
        return self.buffer("scores", self.numel)

    def chunk_buffers(self, key: str, count: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """``count`` chunk-sized scratch tensors."""
        size = min(self.numel, CHUNK_ELEMENTS)
        return [self.buffer(f"{key}.{i}", size, dtype) for i in range(count)]

    def chunks(
        self, models: list[torch.Tensor] | None = None
    ) -> Iterator[tuple[slice, torch.Tensor, list[torch.Tensor]]]:
        """Walk flat chunks of the task vectors ``model - reference``, computed in float32.

        Args:
            models: the flat models to take task vectors of (default: all).

        Yields:
            ``(chunk, reference_chunk, deltas)``: the flat slice, the reference's chunk as float32
            (read-only) and one float32 task-vector chunk per model, in buffers that the next step
            reuses (the caller may modify them).
        """
        models = self.models if models is None else models
        reference_buffer, *delta_buffers = self.chunk_buffers("chunk", len(models) + 1)
        for chunk in element_chunks(self.numel, CHUNK_ELEMENTS):
            length = chunk.stop - chunk.start
            reference_chunk = self.reference[chunk]
            if reference_chunk.dtype != torch.float32:
                reference_chunk = reference_buffer[:length].copy_(reference_chunk)
            # A float32 operand makes the subtraction float32 (exact upcast of bf16/fp16 first).
            deltas = [
                torch.sub(model[chunk], reference_chunk, out=buffer[:length])
                for model, buffer in zip(models, delta_buffers, strict=True)
            ]
            yield chunk, reference_chunk, deltas

    def write(self, chunk: slice, reference_chunk: torch.Tensor, merged: torch.Tensor) -> None:
        """Store ``reference + merged`` for one chunk (``merged`` is consumed)."""
        if self.out.dtype == torch.float32:
            torch.add(reference_chunk, merged, out=self.out[chunk])
        else:
            self.out[chunk].copy_(merged.add_(reference_chunk))


@dataclass
class _Scratch:
    """float32 chunk buffers for combining task vectors."""

    merged: torch.Tensor
    divisor: torch.Tensor
    elected: torch.Tensor
    product: torch.Tensor

    @classmethod
    def of(cls, stream: _Stream) -> _Scratch:
        return cls(*stream.chunk_buffers("combine", 4))

    def cut(self, size: int) -> _Scratch:
        return _Scratch(self.merged[:size], self.divisor[:size], self.elected[:size], self.product[:size])


def task_arithmetic(inputs: TensorInputs, params: TaskArithmeticParams) -> torch.Tensor:
    """``reference + lambda * sum_i weight_i * (model_i - reference)`` (mergekit `task_arithmetic`)."""
    return _generalized("task_arithmetic", inputs, params, sparsifier=None, consensus=False)


def ties(inputs: TensorInputs, params: TiesParams) -> torch.Tensor:
    """TIES: trim each task vector to its top-``density`` magnitudes, elect signs, disjoint mean."""
    return _generalized("ties", inputs, params, sparsifier="magnitude", consensus=True)


def dare_linear(inputs: TensorInputs, params: DareParams) -> torch.Tensor:
    """DARE: random drop with probability ``1 - density``, rescale by ``1/density``, weighted sum."""
    return _generalized("dare_linear", inputs, params, sparsifier="random", consensus=False)


def dare_ties(inputs: TensorInputs, params: DareParams) -> torch.Tensor:
    """DARE drop and rescale, then TIES sign consensus."""
    return _generalized("dare_ties", inputs, params, sparsifier="random", consensus=True)


def _generalized(
    method: str,
    inputs: TensorInputs,
    params: TaskArithmeticParams,
    *,
    sparsifier: Sparsifier,
    consensus: bool,
) -> torch.Tensor:
    """Task vectors -> sparsify (+ rescale) -> weight, elect, sum -> add back to the reference.

    Whole-tensor decisions come first (TIES's per-model magnitude threshold, DARE's keep masks);
    then one pass over flat chunks computes each chunk's merged value into the result.
    """
    stream = _Stream(inputs, method)
    densities = per_model_values(params.density, len(stream.models))
    if sparsifier == "magnitude":
        with _named(inputs):
            trims = [
                _magnitude_trim(stream, model, density)
                for model, density in zip(stream.models, densities, strict=True)
            ]
    elif sparsifier == "random":
        trims = _random_trims(inputs, method, densities)
    else:
        trims = [None] * len(stream.models)
    rescale = sparsifier is not None and params.rescale
    rescales = [density if rescale and density < 1 else None for density in densities]
    combine = _Combine(
        per_model_values(params.weight, len(stream.models)), consensus, params.normalize, params.lambda_
    )
    scratch = _Scratch.of(stream)
    for chunk, reference_chunk, deltas in stream.chunks():
        for delta, trim, rescale in zip(deltas, trims, rescales, strict=True):
            if trim is not None:
                delta.mul_(trim(delta, chunk))  # delta * keep, as a dense mask would: dropped -> +-0
            if rescale is not None:
                delta.div_(rescale)
        merged = _combine_chunk(deltas, combine, scratch.cut(reference_chunk.numel()))
        stream.write(chunk, reference_chunk, merged)
    return stream.out.view(inputs.base.shape)


def sce(inputs: TensorInputs, params: SceParams) -> torch.Tensor:
    """SCE: select by variance across task vectors, calculate weights, erase minority signs.

    Weights are each (selected) task vector's mean squared magnitude, normalized to sum to 1
    (uniform when that sum is below 1e-6), as in mergekit. Three passes over flat chunks: the
    variance across task vectors (into a float32 scratch tensor, for its exact top-k), the mean
    squares (in float64), and the merge itself.

    Args:
        inputs: base, secondaries and the reference, in any float dtype.
        params: validated `sce` parameters.

    Returns:
        ``reference + merged task vector``, base's shape, in ``inputs.out_dtype`` when given, else
        float32.
    """
    stream = _Stream(inputs, "sce")
    select = variances = None
    if params.select_topk < 1:
        variances = stream.scores()
        with _named(inputs):
            select = _variance_top(stream, params.select_topk, variances)
    combine = _Combine(
        _sce_weights(stream, select, variances),
        consensus=True,
        normalize=True,
        elect_weighted=False,
        divisor_floor=1e-6,
    )
    keep = select.scan() if select is not None else None
    scratch = _Scratch.of(stream)
    for chunk, reference_chunk, deltas in stream.chunks():
        if keep is not None:
            selected = keep(variances[chunk])
            for delta in deltas:
                delta.mul_(selected)
        merged = _combine_chunk(deltas, combine, scratch.cut(reference_chunk.numel()))
        stream.write(chunk, reference_chunk, merged)
    return stream.out.view(inputs.base.shape)


def _combine_chunk(deltas: list[torch.Tensor], combine: _Combine, scratch: _Scratch) -> torch.Tensor:
    """Weight, elect signs (with consensus), sum, normalize and scale one chunk of task vectors.

    The arithmetic is the stacked whole-tensor form's, element for element: products and sums in
    the same order (model order, starting from +0), so the result is bit-identical to it.

    Args:
        deltas: one float32 chunk per model, already sparsified; weighted in place.
        combine: the rules.
        scratch: buffers of the chunk's size; the result lives in ``scratch.merged``.

    Returns:
        The merged task-vector chunk (``scratch.merged``).
    """
    if combine.consensus:
        merged, divisor = _agreeing_sum(deltas, combine, scratch)
    else:
        merged = scratch.merged.zero_()
        for delta, weight in zip(deltas, combine.weights, strict=True):
            merged += delta.mul_(weight)
        divisor = _weight_sum(combine.weights)
    if combine.normalize:
        merged /= divisor
    if combine.lambda_ != 1:
        merged *= combine.lambda_
    return merged


def _agreeing_sum(
    deltas: list[torch.Tensor], combine: _Combine, scratch: _Scratch
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sign consensus: the sum of the weighted entries that agree with the elected sign.

    Returns:
        ``(merged, divisor)``: the sum, and the sum of the agreeing weights with mergekit's rule
        for a zero divisor (None when ``normalize`` is off: nothing divides by it).
    """
    if not combine.elect_weighted:
        elected = elect_signs(deltas, scratch.merged, out=scratch.elected)
    for delta, weight in zip(deltas, combine.weights, strict=True):
        delta.mul_(weight)
    if combine.elect_weighted:
        elected = elect_signs(deltas, scratch.merged, out=scratch.elected)
    merged = scratch.merged.zero_()
    divisor = scratch.divisor.zero_() if combine.normalize else None
    for delta, weight in zip(deltas, combine.weights, strict=True):
        # With raw-sign election (SCE) the weights are >= 0: a positive weight keeps the sign,
        # and a zero-weighted entry adds 0 to both sums whether it agrees or not.
        agree = agreeing(delta, elected, scratch.product)
        merged += delta.mul_(agree)
        if divisor is not None:
            divisor.add_(agree, alpha=weight)
    if divisor is not None and combine.divisor_floor is None:
        divisor.masked_fill_(divisor == 0, 1)
    elif divisor is not None:
        divisor.clamp_(min=combine.divisor_floor)
    return merged, divisor


def _weight_sum(weights: list[float]) -> float:
    """The divisor without consensus: the float32 sum of the weights, 1 when it is ~0 (mergekit)."""
    total = torch.tensor(weights, dtype=torch.float32).sum()
    return 1.0 if total.abs() < 1e-8 else float(total)


def _magnitude_trim(stream: _Stream, model: torch.Tensor, density: float) -> Trim | None:
    """TIES's trim of one task vector: keep its ``magnitude_k`` largest ``|delta|``.

    Args:
        stream: the tensor being merged.
        model: one of ``stream.models``.
        density: fraction to keep; >= 1 keeps all (no trim).

    Returns:
        The chunk-by-chunk trim, or None when nothing is trimmed.
    """
    if density >= 1:
        return None
    magnitudes = stream.scores()  # |delta| of the whole tensor, for its k-th largest
    for chunk, _, (delta,) in stream.chunks([model]):
        torch.abs(delta, out=magnitudes[chunk])
    keep = TopK.of(magnitudes, magnitude_k(density, stream.numel)).scan()
    (chunk_magnitudes,) = stream.chunk_buffers("magnitudes", 1)  # shared: models are trimmed one by one
    return lambda delta, chunk: keep(torch.abs(delta, out=chunk_magnitudes[: delta.numel()]))


def _random_trims(inputs: TensorInputs, method: str, densities: list[float]) -> list[Trim | None]:
    """DARE's drop for every model: one keep mask per model, drawn in model order before any math."""
    numel, device = inputs.base.numel(), inputs.base.device
    trims: list[Trim | None] = []
    for density in densities:
        if density >= 1:
            trims.append(None)
            continue
        with _named(inputs):
            mask = draw_keep_mask(numel, density, _generator(inputs, method), device)
        trims.append(lambda delta, chunk, mask=mask: mask[chunk])
    return trims


def _variance_top(stream: _Stream, fraction: float, variances: torch.Tensor) -> TopK:
    """SCE's select step: the top ``fraction`` of nonzero variances across the task vectors.

    Args:
        stream: the tensor being merged.
        fraction: share of the elements with nonzero variance to keep, in (0, 1).
        variances: float32 tensor of the tensor's size; holds the variances afterwards.

    Returns:
        The selection over ``variances``.
    """
    nonzero = torch.zeros((), dtype=torch.int64, device=stream.device)
    scratch = stream.chunk_buffers("variance", 3, torch.float64)
    for chunk, _, deltas in stream.chunks():
        length = chunk.stop - chunk.start
        variance = variance_across(deltas, variances[chunk], [buffer[:length] for buffer in scratch])
        nonzero += torch.count_nonzero(variance)
    return TopK.of(variances, variance_select_count(int(nonzero), fraction))


def _sce_weights(stream: _Stream, select: TopK | None, variances: torch.Tensor | None) -> list[float]:
    """Each selected task vector's mean square over the sum of them (uniform when that sum is < 1e-6).

    The squares are taken and summed in float64 (exact squares of float32 values); each mean is
    then rounded to float32 and normalized as mergekit does with its float32 means.
    """
    keep = select.scan() if select is not None else None
    n_models = len(stream.models)
    sums = torch.zeros(n_models, dtype=torch.float64, device=stream.device)
    (squares,) = stream.chunk_buffers("squares", 1, torch.float64)
    for chunk, _, deltas in stream.chunks():
        selected = keep(variances[chunk]) if keep is not None else None
        for i, delta in enumerate(deltas):
            if selected is not None:
                delta.mul_(selected)
            sums[i] += squares[: delta.numel()].copy_(delta).square_().sum()
    mean_square = (sums / max(stream.numel, 1)).to(torch.float32).cpu()
    total = float(mean_square.sum())
    if abs(total) < 1e-6:
        return [1.0 / n_models] * n_models
    return (mean_square / total).tolist()


@contextmanager
def _named(inputs: TensorInputs):
    """Prefix a ScfError from the tensor math with the tensor's name."""
    try:
        yield
    except ScfError as exc:
        raise ScfError(f"tensor {inputs.name!r}: {exc}") from None


def _reference(inputs: TensorInputs, method: str) -> torch.Tensor:
    """The reference tensor, or a ScfError explaining why task-vector methods need one."""
    if inputs.reference is None:
        raise ScfError(
            f"tensor {inputs.name!r}: method {method!r} needs `reference`, the common ancestor that "
            "base and secondaries were fine-tuned from: task vectors are differences from it"
        )
    return inputs.reference


def _generator(inputs: TensorInputs, method: str) -> torch.Generator:
    """The per-tensor generator DARE samples from (never the global RNG)."""
    if inputs.generator is None:
        raise ScfError(
            f"tensor {inputs.name!r}: method {method!r} drops at random and needs a seeded generator"
        )
    return inputs.generator
