"""NearSwap (mergekit `nearswap`): take the secondary's value where it is close to the base's.

mergekit's ``base_model`` is our ``base``, its other model our one secondary. Per element, with
``d = |b - s|``: ``w = clamp(t / max(d, 1e-6), 0, 1)`` and the result ``w * s + (1 - w) * b``. So
elements closer than ``t`` become the secondary's, farther ones move by ``t / d`` of the way.
Element by element in float32, with mergekit's operations (``t / x`` is ``reciprocal(x) * t`` in
torch), so outputs are bit-identical to mergekit's.
"""

from __future__ import annotations

import torch

from scf.methods.base import Stream, TensorInputs, check_one_secondary
from scf.methods.params import NearswapParams

_DIFFERENCE_FLOOR = 1e-6  # |b - s| is clamped to at least this before dividing


def nearswap(inputs: TensorInputs, params: NearswapParams) -> torch.Tensor:
    """Interpolate each element from the base towards the secondary by ``min(1, t / |b - s|)``.

    Args:
        inputs: base and exactly one secondary, in any float dtype (reference unused).
        params: validated `nearswap` parameters.

    Returns:
        The fused tensor, base's shape, in ``inputs.out_dtype`` (float32 when None).
    """
    check_one_secondary(inputs, "nearswap")
    stream = Stream(inputs, None)
    for chunk, _, (base, secondary) in stream.chunks():
        distance = torch.abs(base - secondary).clamp_(min=_DIFFERENCE_FLOOR)
        weight = distance.reciprocal_().mul_(params.t).clamp_(min=0, max=1)
        merged = (weight * secondary).add_((1 - weight) * base)
        stream.write(chunk, None, merged)
    return stream.result(inputs.base.shape)
