"""Passthrough (mergekit `passthrough`): each output tensor is one input tensor, optionally scaled.

The engine picks the input tensor (the base's, or with ``slices`` a layer of one input, renumbered);
this function only applies ``scale``: the product is taken in float32 and rounded once to the output
dtype, as torch computes ``tensor * scale`` for a bf16 or fp16 tensor. Without ``scale`` the values
are copied bit for bit.
"""

from __future__ import annotations

import torch

from scf.methods.base import TensorInputs
from scf.methods.params import PassthroughParams


def passthrough(inputs: TensorInputs, params: PassthroughParams) -> torch.Tensor:
    """The input tensor (``inputs.base``), times ``params.scale`` when it is set.

    Args:
        inputs: the one input tensor as ``base`` (no secondaries, no reference).
        params: validated `passthrough` parameters.

    Returns:
        A new tensor, base's shape, in ``inputs.out_dtype`` (the base's dtype when None).
    """
    out_dtype = inputs.out_dtype or inputs.base.dtype
    if params.scale is None:
        return inputs.base.to(out_dtype, copy=True)
    return (inputs.base.float() * params.scale).to(out_dtype)
