"""The task-arithmetic family: one core, ``sparsify -> weight -> sign consensus -> sum -> lambda``.

Task vectors are taken against ``reference`` (the common ancestor; mergekit's ``base_model``).
Every contributing model ``[base, *secondaries]`` gives one task vector ``model - reference``.
`task_arithmetic`, `ties`, `dare_linear` and `dare_ties` are presets of ``merge_task_vectors``
(mergekit's generalized task arithmetic); `sce` reuses its weighting and consensus steps with
data-dependent weights. Names, parameters and defaults follow mergekit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import ConfigDict, Field, field_validator

from scf.errors import ScfError
from scf.methods.base import MethodParams, PerModel, TensorInputs, check_each, per_model_values, weight_tensor
from scf.sparsify import bernoulli, magnitude, sign_consensus, variance_topk_mask

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


def merge_task_vectors(
    deltas: torch.Tensor | list[torch.Tensor],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float = 1.0,
    elect_weighted: bool = True,
    divisor_floor: float | None = None,
) -> torch.Tensor:
    """The shared core after sparsifying: weight, sign consensus, sum, normalize, lambda.

    Args:
        deltas: ``(models, *shape)`` stacked (already sparsified) task vectors, or a list of them.
            Without consensus a list is summed one model at a time, so no stacked copy is made.
        weights: one weight per model.
        consensus: keep only entries whose sign agrees with the elected sign (TIES).
        normalize: divide by the sum of the weights that took part (per element with consensus;
            a zero divisor becomes 1, as in mergekit).
        lambda_: final scale of the merged task vector.
        elect_weighted: elect signs on the weighted task vectors (mergekit GTA) or the raw ones
            (mergekit SCE).
        divisor_floor: with consensus, clamp the divisor to at least this (mergekit SCE's rule)
            instead of turning a zero divisor into 1 (mergekit GTA's rule).

    Returns:
        The merged task vector, ``shape``.
    """
    if consensus:
        stacked = torch.stack(deltas) if isinstance(deltas, list) else deltas
        w = weight_tensor(weights, stacked[0])  # (models, 1, ..., 1)
        weighted = stacked * w
        agree = sign_consensus(weighted if elect_weighted else stacked)
        merged = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        if divisor_floor is None:
            divisor[divisor == 0] = 1
        else:
            divisor.clamp_(min=divisor_floor)
    else:
        merged, divisor = _weighted_sum(deltas, weights)
    if normalize:
        merged /= divisor
    if lambda_ != 1:
        merged *= lambda_
    return merged


def _weighted_sum(deltas: torch.Tensor | list[torch.Tensor], weights: list[float]):
    """``sum_i w_i * delta_i`` accumulated one model at a time, and the divisor ``sum_i w_i``.

    Starting from zeros and adding in model order gives bit for bit what ``(stack * w).sum(0)``
    gives (torch's reduction starts from +0 too), with one accumulator instead of two stacked
    copies of every task vector.
    """
    w = torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device)
    merged = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, w, strict=True):
        merged += delta * weight
    divisor = w.sum()
    if divisor.abs() < 1e-8:
        divisor = torch.ones_like(divisor)
    return merged, divisor


def task_arithmetic(inputs: TensorInputs, params: TaskArithmeticParams) -> torch.Tensor:
    """``reference + lambda * sum_i weight_i * (model_i - reference)`` (mergekit `task_arithmetic`)."""
    return _generalized(inputs, params, sparsifier=None, consensus=False)


def ties(inputs: TensorInputs, params: TiesParams) -> torch.Tensor:
    """TIES: trim each task vector to its top-``density`` magnitudes, elect signs, disjoint mean."""
    return _generalized(inputs, params, sparsifier="magnitude", consensus=True)


def dare_linear(inputs: TensorInputs, params: DareParams) -> torch.Tensor:
    """DARE: random drop with probability ``1 - density``, rescale by ``1/density``, weighted sum."""
    return _generalized(inputs, params, sparsifier="random", consensus=False)


def dare_ties(inputs: TensorInputs, params: DareParams) -> torch.Tensor:
    """DARE drop and rescale, then TIES sign consensus."""
    return _generalized(inputs, params, sparsifier="random", consensus=True)


def sce(inputs: TensorInputs, params: SceParams) -> torch.Tensor:
    """SCE: select by variance across task vectors, calculate weights, erase minority signs.

    Weights are each task vector's mean squared magnitude, normalized to sum to 1 (uniform when
    that sum is below 1e-6), as in mergekit.

    Args:
        inputs: base, secondaries and the reference.
        params: validated `sce` parameters.

    Returns:
        ``reference + merged task vector``, float32.
    """
    reference = _reference(inputs, "sce")
    deltas = torch.stack([model - reference for model in inputs.models])  # (models, *shape)
    if params.select_topk < 1:
        with _named(inputs):
            deltas *= variance_topk_mask(deltas, params.select_topk)
    merged = merge_task_vectors(
        deltas, _sce_weights(deltas), consensus=True, normalize=True, elect_weighted=False, divisor_floor=1e-6
    )
    return reference + merged


def _sce_weights(deltas: torch.Tensor) -> list[float]:
    """Each task vector's mean square over the sum of them (uniform when that sum is < 1e-6)."""
    squares = deltas.pow(2)
    mean_square = squares.mean(dim=tuple(range(1, deltas.dim()))) if deltas.dim() > 1 else squares
    total = float(mean_square.sum())
    if abs(total) < 1e-6:
        return [1.0 / len(mean_square)] * len(mean_square)
    return (mean_square / total).tolist()


def _generalized(
    inputs: TensorInputs, params: TaskArithmeticParams, *, sparsifier: Sparsifier, consensus: bool
) -> torch.Tensor:
    """Task vectors -> sparsify (+ rescale) -> merge_task_vectors -> add back to the reference."""
    method = {None: "task_arithmetic", "magnitude": "ties", "random": "dare"}[sparsifier]
    reference = _reference(inputs, method)
    n_models = len(inputs.models)
    weights = per_model_values(params.weight, n_models)
    densities = per_model_values(params.density, n_models)
    deltas = []
    for model, density in zip(inputs.models, densities, strict=True):
        delta = model - reference
        if sparsifier == "magnitude":
            with _named(inputs):
                delta = magnitude(delta, density)
        elif sparsifier == "random":
            delta = bernoulli(delta, density, _generator(inputs, method))
        if sparsifier is not None and params.rescale and density < 1:
            delta = delta / density
        deltas.append(delta)
    merged = merge_task_vectors(
        deltas, weights, consensus=consensus, normalize=params.normalize, lambda_=params.lambda_
    )
    return reference + merged


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
