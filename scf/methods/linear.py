"""Linear merge: a weighted average of the models' tensors (mergekit `linear`)."""

from __future__ import annotations

import torch
from pydantic import field_validator, model_validator

from scf.methods.base import (
    MethodParams,
    PerModel,
    TensorInputs,
    check_each,
    element_chunks,
    per_model_values,
)

LINEAR_URL = "https://arxiv.org/abs/2203.05482"
_CHUNK = 1 << 20  # elements per step: the float32 operands of a step stay in cache


class LinearParams(MethodParams):
    """Parameters of `linear`.

    Attributes:
        weight: per-model weight (scalar or one per model ``[base, *secondaries]``). mergekit
            requires it; here it defaults to 1.0 (a plain mean).
        normalize: divide by the sum of the weights (mergekit default True).
    """

    weight: PerModel = 1.0
    normalize: bool = True

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: PerModel) -> PerModel:
        return check_each(value, float("-inf"), float("inf"))

    @model_validator(mode="after")
    def _nonzero_sum(self) -> LinearParams:
        weights = self.weight if isinstance(self.weight, list) else [self.weight]
        if self.normalize and sum(weights) == 0:
            raise ValueError("weight: the weights sum to 0, so normalize=true would divide by zero")
        return self


def linear(inputs: TensorInputs, params: LinearParams) -> torch.Tensor:
    """Weighted sum of ``[base, *secondaries]``, divided by the weight sum when ``normalize``.

    Args:
        inputs: the tensors of one name, in any float dtype (reference unused).
        params: validated `linear` parameters.

    Returns:
        The fused float32 tensor, base's shape.
    """
    models = [m.reshape(-1) for m in inputs.models]
    weights = per_model_values(params.weight, len(models))
    fused = torch.empty(inputs.base.shape, dtype=torch.float32, device=inputs.base.device)
    upcast = torch.empty(min(fused.numel(), _CHUNK), dtype=torch.float32, device=fused.device)
    for chunk in element_chunks(fused.numel(), _CHUNK):
        out = fused.view(-1)[chunk]
        # Upcast first: a bf16 operand times a Python float would be computed in bf16.
        out.copy_(models[0][chunk]).mul_(weights[0])
        for w, model in zip(weights[1:], models[1:], strict=True):
            out.add_(upcast[: out.numel()].copy_(model[chunk]), alpha=w)
        if params.normalize:
            out.div_(sum(weights))
    return fused
