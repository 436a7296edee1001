"""The task-arithmetic family: one core, ``sparsify -> rescale -> weight -> elect signs -> sum -> lambda``.

Task vectors are taken against ``reference`` (the common ancestor; mergekit's ``base_model``).
Every contributing model ``[base, *secondaries]`` gives one task vector ``model - reference``.
`task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `breadcrumbs`, `breadcrumbs_ties`, `della`
and `della_linear` are presets of one core (mergekit's generalized task arithmetic), differing in
the sparsifier, in sign consensus and in defaults; `sce` reuses its weighting and consensus steps
with data-dependent weights. Names, parameters and defaults follow mergekit 0.1.5.

Memory: the inputs may be bf16/fp16/fp32 and read-only (memory-mapped); nothing of their size is
made but the float32 result (used as scratch for whole-tensor statistics before it is written) and
the bool keep masks of the random sparsifiers (DARE, DELLA). Everything else streams over flat
chunks of ``base.CHUNK_ELEMENTS`` elements: whole-tensor statistics first (exact, as a few numbers), then
each chunk's merged value.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from scf.errors import ScfError
from scf.methods.base import Stream, TensorInputs, require_reference
from scf.methods.params import (
    BreadcrumbsParams,
    DareParams,
    DellaParams,
    SceParams,
    TaskArithmeticParams,
    TiesParams,
    per_model_values,
)
from scf.sparsify import (
    RankBand,
    TopK,
    agreeing,
    della_keep_mask,
    draw_keep_mask,
    elect_signs,
    l1_rescale_factor,
    magnitude_k,
    outlier_band,
    variance_across,
    variance_select_count,
)

Sparsifier = Literal["magnitude", "random", "outliers", "della"] | None
"""How a preset trims task vectors: TIES, DARE, breadcrumbs, DELLA (or not at all)."""

ChunkMask = Callable[[torch.Tensor, slice], torch.Tensor]
"""One pass of a task vector's sparsifier: ``keep(delta_chunk, chunk) -> bool mask``, chunks in order."""

Trim = Callable[[], ChunkMask]
"""A task vector's sparsifier: each call starts a pass over the chunks (selections scan in order)."""

Rescale = Callable[[torch.Tensor], torch.Tensor]
"""What a sparsified task-vector chunk is scaled by (in place), e.g. ``1 / density``."""


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


@dataclass
class _Scratch:
    """float32 chunk buffers for combining task vectors."""

    merged: torch.Tensor
    divisor: torch.Tensor
    elected: torch.Tensor
    product: torch.Tensor

    @classmethod
    def of(cls, stream: Stream) -> _Scratch:
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


def breadcrumbs(inputs: TensorInputs, params: BreadcrumbsParams) -> torch.Tensor:
    """Model Breadcrumbs: cut each task vector's ``gamma`` largest and its smallest magnitudes, sum."""
    return _generalized("breadcrumbs", inputs, params, sparsifier="outliers", consensus=False)


def breadcrumbs_ties(inputs: TensorInputs, params: BreadcrumbsParams) -> torch.Tensor:
    """Breadcrumbs' two-sided cut, then TIES sign consensus."""
    return _generalized("breadcrumbs_ties", inputs, params, sparsifier="outliers", consensus=True)


def della(inputs: TensorInputs, params: DellaParams) -> torch.Tensor:
    """DELLA: drop at random with probabilities ranked by magnitude (MagPrune), L1 rescale, TIES consensus."""
    return _generalized("della", inputs, params, sparsifier="della", consensus=True)


def della_linear(inputs: TensorInputs, params: DellaParams) -> torch.Tensor:
    """DELLA's MagPrune drop and L1 rescale, then a weighted sum (no sign consensus)."""
    return _generalized("della_linear", inputs, params, sparsifier="della", consensus=False)


def _generalized(
    method: str,
    inputs: TensorInputs,
    params: TaskArithmeticParams,
    *,
    sparsifier: Sparsifier,
    consensus: bool,
) -> torch.Tensor:
    """Task vectors -> sparsify (+ rescale) -> weight, elect, sum -> add back to the reference.

    Whole-tensor decisions come first (TIES's per-model magnitude threshold, breadcrumbs' rank band,
    the random keep masks, the L1 norms a rescale restores); then one pass over flat chunks
    computes each chunk's merged value into the result.
    """
    stream = Stream(inputs, require_reference(inputs, method))
    n_models = len(stream.models)
    densities = per_model_values(params.density, n_models)
    with _named(inputs):
        trims = _trims(stream, inputs, method, params, sparsifier, densities)
        rescales = _rescales(stream, trims, params, sparsifier, densities)
    combine = _Combine(per_model_values(params.weight, n_models), consensus, params.normalize, params.lambda_)
    scratch = _Scratch.of(stream)
    masks = [trim() if trim is not None else None for trim in trims]
    for chunk, reference_chunk, deltas in stream.chunks():
        for delta, mask, rescale in zip(deltas, masks, rescales, strict=True):
            if mask is not None:
                delta.mul_(mask(delta, chunk))  # delta * keep, as a dense mask would: dropped -> +-0
            if rescale is not None:
                rescale(delta)
        merged = _combine_chunk(deltas, combine, scratch.cut(reference_chunk.numel()))
        stream.write(chunk, reference_chunk, merged)
    return stream.out.view(inputs.base.shape)


def _trims(
    stream: Stream,
    inputs: TensorInputs,
    method: str,
    params: TaskArithmeticParams,
    sparsifier: Sparsifier,
    densities: list[float],
) -> list[Trim | None]:
    """Each model's sparsifier (None: kept whole, as at density 1 for every sparsifier)."""
    models = stream.models
    if sparsifier == "magnitude":
        return [_magnitude_trim(stream, model, density)
                for model, density in zip(models, densities, strict=True)]
    if sparsifier == "outliers":
        gammas = per_model_values(params.gamma, len(models))
        return [_outlier_trim(stream, model, density, gamma)
                for model, density, gamma in zip(models, densities, gammas, strict=True)]
    if sparsifier == "random":
        return _random_trims(inputs, method, densities)
    if sparsifier == "della":
        epsilons = per_model_values(params.epsilon, len(models))
        return [_della_trim(stream, inputs, method, model, density, epsilon)
                for model, density, epsilon in zip(models, densities, epsilons, strict=True)]
    return [None] * len(models)


def _rescales(
    stream: Stream, trims: list[Trim | None], params: TaskArithmeticParams, sparsifier: Sparsifier,
    densities: list[float],
) -> list[Rescale | None]:
    """How each sparsified task vector is rescaled, when ``rescale`` is on.

    TIES and DARE divide by ``density`` (the DARE paper's rule, kept from before); breadcrumbs and
    DELLA restore the L1 norm as mergekit 0.1.5 does, which takes a pass for the norms.
    """
    if not params.rescale or sparsifier is None:
        return [None] * len(trims)
    if sparsifier in ("magnitude", "random"):
        return [(lambda delta, d=density: delta.div_(d)) if trim is not None else None
                for trim, density in zip(trims, densities, strict=True)]
    factors = _l1_factors(stream, trims)
    return [(lambda delta, f=factor: delta.mul_(f)) if factor is not None else None for factor in factors]


def _l1_factors(stream: Stream, trims: list[Trim | None]) -> list[float | None]:
    """Per model, ``sum|delta| / sum|delta * keep|`` (float64 sums; mergekit's float32 rule)."""
    sums = torch.zeros(len(trims), 2, dtype=torch.float64, device=stream.device)
    masks = [trim() if trim is not None else None for trim in trims]
    (magnitudes,) = stream.chunk_buffers("l1", 1)
    for chunk, _, deltas in stream.chunks():
        for i, (delta, mask) in enumerate(zip(deltas, masks, strict=True)):
            if mask is None:
                continue
            size = delta.numel()
            sums[i, 0] += torch.abs(delta, out=magnitudes[:size]).sum(dtype=torch.float64)
            delta.mul_(mask(delta, chunk))
            sums[i, 1] += torch.abs(delta, out=magnitudes[:size]).sum(dtype=torch.float64)
    return [l1_rescale_factor(float(before), float(after)) if mask is not None else None
            for mask, (before, after) in zip(masks, sums.tolist(), strict=True)]


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
    stream = Stream(inputs, require_reference(inputs, "sce"))
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


def _magnitudes(stream: Stream, model: torch.Tensor) -> torch.Tensor:
    """``|model - reference|`` of the whole tensor as float32, in ``stream.scores()``."""
    magnitudes = stream.scores()
    for chunk, _, (delta,) in stream.chunks([model]):
        torch.abs(delta, out=magnitudes[chunk])
    return magnitudes


def _selection_trim(stream: Stream, selection: TopK | RankBand) -> Trim:
    """A trim that recomputes ``|delta|`` per chunk and applies a whole-tensor selection to it."""
    (chunk_magnitudes,) = stream.chunk_buffers("magnitudes", 1)  # shared: one model at a time

    def start() -> ChunkMask:
        keep = selection.scan()
        return lambda delta, chunk: keep(torch.abs(delta, out=chunk_magnitudes[: delta.numel()]))

    return start


def _magnitude_trim(stream: Stream, model: torch.Tensor, density: float) -> Trim | None:
    """TIES's trim of one task vector: keep its ``magnitude_k`` largest ``|delta|``.

    Args:
        stream: the tensor being merged.
        model: one of ``stream.models``.
        density: fraction to keep; >= 1 keeps all (no trim).

    Returns:
        The trim, or None when nothing is trimmed.
    """
    if density >= 1:
        return None
    top = TopK.of(_magnitudes(stream, model), magnitude_k(density, stream.numel))
    return _selection_trim(stream, top)


def _outlier_trim(stream: Stream, model: torch.Tensor, density: float, gamma: float) -> Trim | None:
    """Breadcrumbs' trim of one task vector: the band of ranks ``outlier_band`` gives (None at density 1)."""
    if density >= 1:
        return None
    start, stop = outlier_band(density, gamma, stream.numel)
    return _selection_trim(stream, RankBand.of(_magnitudes(stream, model), start, stop))


def _della_trim(
    stream: Stream, inputs: TensorInputs, method: str, model: torch.Tensor, density: float, epsilon: float
) -> Trim | None:
    """DELLA's trim of one task vector: a mask drawn from rank-based probabilities (None at density 1)."""
    if density >= 1:
        return None
    magnitudes = _magnitudes(stream, model).view(inputs.base.shape)
    mask = della_keep_mask(magnitudes, density, epsilon, _generator(inputs, method)).view(-1)
    return lambda: (lambda delta, chunk: mask[chunk])


def _random_trims(inputs: TensorInputs, method: str, densities: list[float]) -> list[Trim | None]:
    """DARE's drop for every model: one keep mask per model, drawn in model order before any math."""
    numel, device = inputs.base.numel(), inputs.base.device
    trims: list[Trim | None] = []
    for density in densities:
        if density >= 1:
            trims.append(None)
            continue
        mask = draw_keep_mask(numel, density, _generator(inputs, method), device)
        trims.append(lambda mask=mask: (lambda delta, chunk: mask[chunk]))
    return trims


def _variance_top(stream: Stream, fraction: float, variances: torch.Tensor) -> TopK:
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


def _sce_weights(stream: Stream, select: TopK | None, variances: torch.Tensor | None) -> list[float]:
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


def _generator(inputs: TensorInputs, method: str) -> torch.Generator:
    """The per-tensor generator the random sparsifiers draw from (never the global RNG).

    Called inside ``_named``, which prefixes the tensor's name to the error.
    """
    if inputs.generator is None:
        raise ScfError(f"method {method!r} drops at random and needs a seeded generator")
    return inputs.generator
