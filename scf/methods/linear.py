"""Linear merge: a weighted average of the models' tensors (mergekit `linear`)."""

from __future__ import annotations

import torch

from scf.methods.base import TensorInputs, element_chunks
from scf.methods.params import LinearParams, per_model_values

_CHUNK = 1 << 20  # elements per step: the float32 operands of a step stay in cache


def linear(inputs: TensorInputs, params: LinearParams) -> torch.Tensor:
    """Weighted sum of ``[base, *secondaries]``, divided by the weight sum when ``normalize``.

    Args:
        inputs: the tensors of one name, in any float dtype (reference unused).
        params: validated `linear` parameters.

    Returns:
        The fused tensor, base's shape: in ``inputs.out_dtype`` when given, else float32.
    """
    models = [m.reshape(-1) for m in inputs.models]
    weights = per_model_values(params.weight, len(models))
    out_dtype = inputs.out_dtype or torch.float32
    fused = torch.empty(inputs.base.shape, dtype=out_dtype, device=inputs.base.device)
    size = min(fused.numel(), _CHUNK)
    upcast = torch.empty(size, dtype=torch.float32, device=fused.device)
    # Accumulate in float32 (in place in the result when it is float32), then round the chunk.
    acc_all = fused.view(-1) if out_dtype == torch.float32 else torch.empty_like(upcast)
    for chunk in element_chunks(fused.numel(), _CHUNK):
        n = chunk.stop - chunk.start
        acc = acc_all[chunk] if out_dtype == torch.float32 else acc_all[:n]
        # Upcast first: a bf16 operand times a Python float would be computed in bf16.
        acc.copy_(models[0][chunk]).mul_(weights[0])
        for w, model in zip(weights[1:], models[1:], strict=True):
            acc.add_(upcast[:n].copy_(model[chunk]), alpha=w)
        if params.normalize:
            acc.div_(sum(weights))
        if out_dtype != torch.float32:
            fused.view(-1)[chunk].copy_(acc)
    return fused
