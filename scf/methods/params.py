"""Every merge method's parameters: one pydantic model per method, with defaults, bounds and help.

Torch-free on purpose: the registry, `scf methods`, and config validation (`tasks/config.py`) import
this module without paying for torch. The tensor code lives in the method modules, which take a
validated instance of these models (one per call; the engine may later resolve one per tensor,
for mergekit's per-filter and per-layer parameter forms).

Names and defaults are mergekit's (0.1.5) unless a field says otherwise. Per-model parameters
(``PerModel``) take one number for every model or a list with one value per contributing model, in
the order ``[base, *secondaries]``; the registry checks the list length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PerModel = float | list[float]
"""A per-model parameter: one value for every model, or a list with one value per model."""


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown keys, inf and NaN are errors; immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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


def check_each(value: PerModel, low: float, high: float, *, low_open: bool = False,
               high_open: bool = False) -> PerModel:
    """Raise ValueError unless every value of a per-model parameter lies in the given interval.

    Args:
        value: a scalar or a list of floats.
        low: lower bound (inclusive unless ``low_open``).
        high: upper bound (inclusive unless ``high_open``).
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.

    Returns:
        ``value`` unchanged, so it can end a pydantic field validator.
    """
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise ValueError("must not be an empty list")
    for v in values:
        above_low = v > low if low_open else v >= low
        below_high = v < high if high_open else v <= high
        if not (math.isfinite(v) and above_low and below_high):  # NaN fails every comparison
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"must be a finite number in {interval}, got {v}")
    return value


def _pairs(first: PerModel, second: PerModel) -> list[tuple[float, float]]:
    """Per-model values of two parameters side by side (a scalar pairs with every list entry)."""
    if isinstance(first, list) and isinstance(second, list):
        return list(zip(first, second, strict=False))  # unequal lengths: the registry says so
    if isinstance(first, list):
        return [(f, float(second)) for f in first]
    if isinstance(second, list):
        return [(float(first), s) for s in second]
    return [(float(first), float(second))]


_WEIGHT_HELP = "weight of each model (mergekit requires it; defaults to 1.0 here)"
_FINITE = float("-inf"), float("inf")


# --- SCF ------------------------------------------------------------------------------------------


class ScfParams(MethodParams):
    """Parameters of `scf_rkl` and `scf_kl` (the paper's defaults)."""

    eps: float = Field(1e-8, gt=0.0, le=1.0,
                       description="added to every softmax probability before the KL (no renormalising)")
    q_low: float = Field(0.25, ge=0.0, le=1.0, description="lower quantile of the spread term (Q1)")
    q_center: float = Field(0.5, ge=0.0, le=1.0, description="centre quantile of the threshold (the median)")
    q_high: float = Field(0.75, ge=0.0, le=1.0, description="upper quantile of the spread term (Q3)")
    alpha: float = Field(1.5, ge=0.0, description="spreads above the centre where the threshold sits; "
                                                   "larger keeps more of the base")

    @model_validator(mode="after")
    def _ordered_quantiles(self) -> ScfParams:
        if not self.q_low <= self.q_center <= self.q_high:
            raise ValueError(
                f"need q_low <= q_center <= q_high, got q_low={self.q_low}, "
                f"q_center={self.q_center}, q_high={self.q_high}"
            )
        return self


# --- linear and the spherical interpolations ------------------------------------------------------


class LinearParams(MethodParams):
    """Parameters of `linear`."""

    weight: PerModel = Field(1.0, description=_WEIGHT_HELP)
    normalize: bool = Field(True, description="divide by the sum of the weights")

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: PerModel) -> PerModel:
        return check_each(value, *_FINITE)

    @model_validator(mode="after")
    def _nonzero_sum(self) -> LinearParams:
        weights = self.weight if isinstance(self.weight, list) else [self.weight]
        if self.normalize and sum(weights) == 0:
            raise ValueError("weight: the weights sum to 0, so normalize=true would divide by zero")
        return self


class SlerpParams(MethodParams):
    """Parameters of `slerp` (mergekit requires ``t``; there is no default)."""

    t: float = Field(description="interpolation factor: 0 gives the base, 1 the secondary; values "
                                 "outside [0, 1] extrapolate along the arc, as in mergekit")


class NuslerpParams(MethodParams):
    """Parameters of `nuslerp` (``t = weight[1] / (weight[0] + weight[1])``)."""

    weight: PerModel = Field(1.0, description="relative weight of base and secondary: t = w1 / (w0 + w1), "
                                              "0.5 when the sum is about 0 (mergekit requires it)")
    nuslerp_row_wise: bool = Field(False, description="with nuslerp_flatten=false: interpolate the "
                                                      "vectors along the first dimension (columns)")
    nuslerp_flatten: bool = Field(True, description="interpolate the whole tensor as one vector; false: "
                                                    "each vector along the last dimension (rows)")

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: PerModel) -> PerModel:
        return check_each(value, *_FINITE)


class MultislerpParams(MethodParams):
    """Parameters of `multislerp`."""

    weight: PerModel = Field(1.0, description=_WEIGHT_HELP)
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, le=1.0, description="added to norms before dividing by them")

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: PerModel) -> PerModel:
        return check_each(value, *_FINITE)

    @model_validator(mode="after")
    def _nonzero_sum(self) -> MultislerpParams:
        weights = self.weight if isinstance(self.weight, list) else [self.weight]
        if self.normalize_weights and sum(weights) == 0:
            raise ValueError("weight: the weights sum to 0, so normalize_weights=true would divide by zero")
        return self


class ModelStockParams(MethodParams):
    """Parameters of `model_stock`."""

    filter_wise: bool = Field(False, description="one interpolation ratio per row (vector along the last "
                                                 "dimension) instead of one per tensor")


class NearswapParams(MethodParams):
    """Parameters of `nearswap` (mergekit requires ``t``; there is no default)."""

    t: float = Field(ge=0.0, description="similarity threshold: each element moves from the base towards "
                                         "the secondary by min(1, t / |base - secondary|)")


class PassthroughParams(MethodParams):
    """Parameters of `passthrough` (mergekit's: an optional ``scale``)."""

    scale: float | None = Field(None, description="multiply every copied tensor by this (none: copy exactly)")


# --- the task-arithmetic family -------------------------------------------------------------------


class TaskArithmeticParams(MethodParams):
    """Parameters shared by the generalized task-arithmetic presets.

    Each preset subclasses this with mergekit's defaults for ``normalize`` and ``rescale``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, serialize_by_alias=True)

    weight: PerModel = Field(1.0, description="weight of each task vector (mergekit requires it; defaults "
                                              "to 1.0 here)")
    density: PerModel = Field(1.0, description="fraction of each task vector the sparsifier keeps, in (0, 1]")
    normalize: bool = Field(False, description="divide the summed task vectors by the sum of the (agreeing) "
                                               "weights")
    rescale: bool = Field(False, description="divide kept entries by density after sparsifying")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")

    @field_validator("weight")
    @classmethod
    def _weight_list(cls, value: PerModel) -> PerModel:
        return check_each(value, *_FINITE)

    @field_validator("density")
    @classmethod
    def _density_range(cls, value: PerModel) -> PerModel:
        return check_each(value, 0.0, 1.0, low_open=True)


class TiesParams(TaskArithmeticParams):
    """`ties` parameters: mergekit defaults normalize=true, rescale=false."""

    normalize: bool = Field(True, description="divide by the sum of the agreeing weights (disjoint mean)")


class DareParams(TaskArithmeticParams):
    """`dare_linear` / `dare_ties` parameters: mergekit defaults normalize=false, rescale=true."""

    rescale: bool = Field(True, description="divide kept entries by density (the DARE paper's rule)")


_L1_RESCALE_HELP = ("scale each sparsified task vector back to its L1 norm before sparsifying "
                    "(mergekit's rescale)")


class BreadcrumbsParams(TaskArithmeticParams):
    """`breadcrumbs` / `breadcrumbs_ties` parameters (mergekit: normalize=false, rescale=false for both)."""

    gamma: PerModel = Field(0.01, description="fraction of each task vector's largest magnitudes cut as "
                                              "outliers before the smallest are cut down to density")
    rescale: bool = Field(False, description=_L1_RESCALE_HELP)

    @field_validator("gamma")
    @classmethod
    def _gamma_range(cls, value: PerModel) -> PerModel:
        return check_each(value, 0.0, 1.0)


class DellaParams(TaskArithmeticParams):
    """`della` parameters: mergekit defaults normalize=true, rescale=true, epsilon=0.15."""

    epsilon: PerModel = Field(0.15, description="spread of the keep probabilities: density - epsilon for "
                                                "the smallest magnitude of a row up to density + epsilon "
                                                "for the largest")
    normalize: bool = Field(True, description="divide by the sum of the agreeing weights")
    rescale: bool = Field(True, description=_L1_RESCALE_HELP)

    @field_validator("epsilon")
    @classmethod
    def _epsilon_range(cls, value: PerModel) -> PerModel:
        return check_each(value, 0.0, 1.0, high_open=True)

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> DellaParams:
        for density, epsilon in _pairs(self.density, self.epsilon):
            if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                raise ValueError(
                    f"density - epsilon and density + epsilon must lie in (0, 1) where density < 1 "
                    f"(they are the keep probabilities), got density={density}, epsilon={epsilon}"
                )
        return self


class DellaLinearParams(DellaParams):
    """`della_linear` parameters: mergekit defaults normalize=false, rescale=true."""

    normalize: bool = Field(False, description="divide the summed task vectors by the sum of the weights")


class SceParams(MethodParams):
    """`sce` parameters (mergekit's)."""

    select_topk: float = Field(1.0, gt=0.0, le=1.0, description="share of the elements with nonzero variance "
                                                                "across task vectors to keep; 1 keeps all")
