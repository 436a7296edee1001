"""Spherical interpolation: `slerp`, `nuslerp` and `multislerp`, as mergekit 0.1.5 computes them.

mergekit's configs map onto ours like this:

- `slerp`: mergekit's ``base_model`` is our ``base``, the other model of its ``models`` our one
  secondary; ``t = 0`` gives the base, ``t = 1`` the secondary. No reference.
- `nuslerp`: mergekit's two ``models`` are our base and secondary (in that order, with their
  ``weight``); its optional ``base_model`` is our ``reference``: with one, the two task vectors
  ``model - reference`` are interpolated and added back to the reference.
- `multislerp`: mergekit's ``models`` are our ``[base, *secondaries]`` (with their ``weight``),
  its optional ``base_model`` our ``reference``, as for nuslerp.

All three stream: the inputs stay in their stored dtype; whole-tensor (or per-vector) statistics
come first, then each chunk's result is computed in float32 with mergekit's operations in
mergekit's order and written in the output dtype. `slerp` sums its statistics over the same
2**20-element chunks as mergekit, so its output is bit-identical to mergekit's. `nuslerp` and
`multislerp` take dot products and norms over a whole tensor, which mergekit reduces in one float32
``torch`` call whose order depends on the kernel; here they are summed in float64 (more exact),
and rounded to float32 where mergekit has a float32 value. Per-row statistics (`nuslerp` with
``nuslerp_flatten: false``) are computed a block of rows at a time with mergekit's own float32
operations, so those outputs are bit-identical too.
"""

from __future__ import annotations

import torch

from scf.errors import ScfError
from scf.methods.base import CHUNK_ELEMENTS, Stream, TensorInputs, check_one_secondary
from scf.methods.params import MultislerpParams, NuslerpParams, SlerpParams, per_model_values

SLERP_CHUNK = 1 << 20
"""mergekit 0.1.5's slerp sums its norms and dot product over chunks of this many elements (its
``_CHUNK_ELEMENTS``, with one tensor per batch as ``run_merge`` executes it); the same chunks here
give the same float32 statistics, bit for bit."""

_DOT_THRESHOLD = 0.9995  # slerp: |cos| above this interpolates linearly (mergekit's default)
_SLERP_EPS = 1e-8  # slerp: norms at or below this are taken as 1 (the vector is left unscaled)
_NUSLERP_NORM_FLOOR = 1e-7  # nuslerp: norms are clamped to at least this before dividing
_NUSLERP_EPS = 1e-8  # nuslerp: colinear where 1 - cos**2 <= eps**2


# --- slerp ----------------------------------------------------------------------------------------


def slerp(inputs: TensorInputs, params: SlerpParams) -> torch.Tensor:
    """Spherical linear interpolation from the base (``t = 0``) to the secondary (``t = 1``).

    The tensors are flattened into one vector each. With ``cos`` the cosine between them and
    ``theta = acos(cos)``, the result is ``sin((1 - t) theta) / sin(theta) * b + sin(t theta) /
    sin(theta) * s``; where ``|cos| > 0.9995`` (nearly parallel or antiparallel) it is the linear
    ``(1 - t) b + t s``. Norms at or below 1e-8 count as 1 (a zero tensor has cosine 0 with anything).
    Everything is float32, as in mergekit; norms and the dot product are summed over 2**20-element
    chunks exactly as mergekit does.

    Args:
        inputs: base and exactly one secondary, in any float dtype (reference unused).
        params: validated `slerp` parameters.

    Returns:
        The fused tensor, base's shape, in ``inputs.out_dtype`` (float32 when None).
    """
    check_one_secondary(inputs, "slerp")
    stream = Stream(inputs, None)
    if stream.numel == 0:
        return stream.result(inputs.base.shape)
    # Pass 1: each model's norm, as the norm of its per-chunk norms (mergekit's order).
    norm_parts: list[list[torch.Tensor]] = [[], []]
    for _, _, pair in stream.chunks(step=SLERP_CHUNK):
        for parts, values in zip(norm_parts, pair, strict=True):
            parts.append(torch.linalg.vector_norm(values.view(1, -1), dim=1, keepdim=True))
    norms = []
    for parts in norm_parts:
        norm = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        norms.append(torch.where(norm > _SLERP_EPS, norm, 1))
    # Pass 2: the dot product of the normalized vectors, chunk by chunk.
    dot_parts = []
    for _, _, (x, y) in stream.chunks(step=SLERP_CHUNK):
        unit_x, unit_y = x.view(1, -1).div_(norms[0]), y.view(1, -1).div_(norms[1])
        dot_parts.append(unit_x.mul_(unit_y).sum(dim=1, keepdim=True))
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    coef_base, coef_secondary = _slerp_coefficients(dot, params.t)
    # Pass 3: the result, coef_base * b + coef_secondary * s.
    for chunk, _, (x, y) in stream.chunks(step=SLERP_CHUNK):
        merged = x.view(1, -1).mul_(coef_base).add_(y.view(1, -1).mul_(coef_secondary))
        stream.write(chunk, None, merged.view(-1))
    return stream.result(inputs.base.shape)


def _slerp_coefficients(dot: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """slerp's two float32 coefficients for a cosine ``dot`` (a [1, 1] tensor), mergekit's formulas."""
    t_tensor = torch.tensor([[t]], dtype=torch.float32, device=dot.device)
    linear = dot.abs() > _DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_base = torch.where(linear, 1 - t_tensor, torch.sin((1 - t_tensor) * theta) / sin_theta)
    coef_secondary = torch.where(linear, t_tensor, torch.sin(t_tensor * theta) / sin_theta)
    return coef_base, coef_secondary


# --- nuslerp --------------------------------------------------------------------------------------


def nuslerp(inputs: TensorInputs, params: NuslerpParams) -> torch.Tensor:
    """SLERP of two models (or of their task vectors, with a reference) with ``t`` from their weights.

    ``t = weight[1] / (weight[0] + weight[1])`` (0.5 when that sum is below 1e-6 in magnitude).
    The vectors interpolated are the whole flattened tensors (``nuslerp_flatten``, the default),
    else each vector along the last dimension (rows), or with ``nuslerp_row_wise`` along the first
    (columns). Per vector: unit vectors ``v / max(|v|, 1e-7)``, ``cos`` their clamped dot product,
    ``(sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta)``, and the linear ``(1 - t) v0 + t v1``
    where ``1 - cos**2 <= 1e-16`` (colinear).

    Args:
        inputs: base and exactly one secondary, and optionally the reference.
        params: validated `nuslerp` parameters.

    Returns:
        The fused tensor, base's shape, in ``inputs.out_dtype`` (float32 when None).
    """
    check_one_secondary(inputs, "nuslerp")
    weights = per_model_values(params.weight, 2)
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    stream = Stream(inputs, inputs.reference)
    shape = inputs.base.shape
    if stream.numel == 0:
        return stream.result(shape)
    if params.nuslerp_flatten or (params.nuslerp_row_wise and len(shape) < 2):
        _nuslerp_columns(stream, t, stream.numel, 1)  # one vector: a single column of every element
    elif params.nuslerp_row_wise:
        _nuslerp_columns(stream, t, shape[0], stream.numel // shape[0])
    else:
        _nuslerp_rows(stream, t, shape[-1] if len(shape) else 1)
    return stream.result(shape)


def _nuslerp_rows(stream: Stream, t: float, row_length: int) -> None:
    """nuslerp of each row (vector along the last dimension): mergekit's float32 operations per row block."""
    step = max(1, CHUNK_ELEMENTS // row_length) * row_length
    for chunk, reference_chunk, (v0, v1) in stream.chunks(step=step):
        rows0, rows1 = v0.view(-1, row_length), v1.view(-1, row_length)
        unit0 = rows0 / torch.norm(rows0, dim=-1, keepdim=True).clamp(min=_NUSLERP_NORM_FLOOR)
        unit1 = rows1 / torch.norm(rows1, dim=-1, keepdim=True).clamp(min=_NUSLERP_NORM_FLOOR)
        cos = torch.sum(unit0 * unit1, dim=-1, keepdim=True).clamp(-1, 1)
        stream.write(chunk, reference_chunk, _nuslerp_values(rows0, rows1, cos, t).view(-1))


def _nuslerp_columns(stream: Stream, t: float, n_rows: int, n_columns: int) -> None:
    """nuslerp of each column of the ``(n_rows, n_columns)`` view: float64 statistics, then the values.

    A column is a vector along the first dimension; the whole flattened tensor is one column.
    """
    step = max(1, CHUNK_ELEMENTS // n_columns) * n_columns
    squares = torch.zeros(2, n_columns, dtype=torch.float64, device=stream.device)
    for _, _, pair in stream.chunks(step=step):
        for i, values in enumerate(pair):
            squares[i] += values.view(-1, n_columns).double().square().sum(dim=0)
    norms = squares.sqrt().to(torch.float32).clamp(min=_NUSLERP_NORM_FLOOR)  # (2, n_columns)
    dot = torch.zeros(n_columns, dtype=torch.float64, device=stream.device)
    for _, _, (v0, v1) in stream.chunks(step=step):
        unit0 = v0.view(-1, n_columns) / norms[0]
        unit1 = v1.view(-1, n_columns) / norms[1]
        dot += unit0.mul_(unit1).double().sum(dim=0)
    cos = dot.to(torch.float32).clamp(-1, 1).view(1, n_columns)
    for chunk, reference_chunk, (v0, v1) in stream.chunks(step=step):
        merged = _nuslerp_values(v0.view(-1, n_columns), v1.view(-1, n_columns), cos, t)
        stream.write(chunk, reference_chunk, merged.view(-1))


def _nuslerp_values(v0: torch.Tensor, v1: torch.Tensor, cos: torch.Tensor, t: float) -> torch.Tensor:
    """The interpolated values for vectors ``v0``, ``v1`` with cosines ``cos`` (broadcast), in float32."""
    colinear = (1 - cos.square()) <= _NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


# --- multislerp -----------------------------------------------------------------------------------


def multislerp(inputs: TensorInputs, params: MultislerpParams) -> torch.Tensor:
    """Barycentric interpolation of any number of models on the hypersphere (mergekit `multislerp`).

    With each model's flattened vector ``v_i`` (its task vector, with a reference), weights ``w_i``
    (divided by their sum with ``normalize_weights``) and ``u_i = v_i / (|v_i| + eps)``: the mean
    direction ``m = sum w_i u_i / |sum w_i u_i|``, tangent vectors ``u_i - (u_i . m) m``, their
    weighted sum ``g``, and the result ``(m cos|g| + g sin|g| / |g|) * sum w_i |v_i|`` (``|g|`` plus
    eps), plus the reference. When the weighted mean of the unit vectors is zero (below eps), two
    models fall back to ``w_0 v_0 + w_1 v_1``; more are an error, as in mergekit.

    Args:
        inputs: base, one or more secondaries, optionally the reference.
        params: validated `multislerp` parameters.

    Returns:
        The fused tensor, base's shape, in ``inputs.out_dtype`` (float32 when None).

    Raises:
        ScfError: three or more models whose weighted unit vectors cancel out.
    """
    stream = Stream(inputs, inputs.reference)
    if stream.numel == 0:
        return stream.result(inputs.base.shape)
    device, eps = stream.device, params.eps
    weights = torch.tensor(per_model_values(params.weight, len(stream.models)), dtype=torch.float32,
                           device=device)
    if params.normalize_weights:
        weights = weights / weights.sum()
    weight_list = [weights[i] for i in range(len(stream.models))]
    # Pass 1: the models' norms; mergekit divides by |v_i| + eps.
    norms = _float32_norms(stream)
    denominators = [norm + eps for norm in norms]

    def unit_and_mean(values: list[torch.Tensor]) -> torch.Tensor:
        for v, denominator in zip(values, denominators, strict=True):
            v.div_(denominator)
        mean = torch.zeros_like(values[0])  # a sum over the stacked models, from +0 in model order
        for u, w in zip(values, weight_list, strict=True):
            mean += u * w
        return mean

    # Pass 2: |mean|. Pass 3: each u_i . (mean / |mean|), the float32 products summed in float64.
    mean_square = torch.zeros((), dtype=torch.float64, device=device)
    for _, _, values in stream.chunks():
        mean_square += unit_and_mean(values).double().square().sum()
    mean_norm = mean_square.sqrt().to(torch.float32)
    if mean_norm < eps:
        return _multislerp_fallback(inputs, stream, weight_list)
    unit_dots = torch.zeros(len(stream.models), dtype=torch.float64, device=device)
    for _, _, values in stream.chunks():
        mean = unit_and_mean(values).div_(mean_norm)
        for i, u in enumerate(values):
            unit_dots[i] += (u * mean).double().sum()
    dots = unit_dots.to(torch.float32)

    def tangent_sum(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mean = unit_and_mean(values).div_(mean_norm)
        tangent = torch.zeros_like(mean)
        for i, (u, w) in enumerate(zip(values, weight_list, strict=True)):
            tangent += (u - dots[i] * mean) * w
        return mean, tangent

    # Pass 4: |g| of the weighted tangent sum.
    tangent_square = torch.zeros((), dtype=torch.float64, device=device)
    for _, _, values in stream.chunks():
        tangent_square += tangent_sum(values)[1].double().square().sum()
    tangent_norm = tangent_square.sqrt().to(torch.float32) + eps
    cos_norm, sin_ratio = torch.cos(tangent_norm), torch.sin(tangent_norm) / tangent_norm
    average_norm = torch.zeros((), dtype=torch.float32, device=device)
    for norm, w in zip(norms, weight_list, strict=True):
        average_norm += norm * w
    # Pass 5: the result.
    for chunk, reference_chunk, values in stream.chunks():
        mean, tangent = tangent_sum(values)
        merged = (mean * cos_norm + tangent * sin_ratio) * average_norm
        stream.write(chunk, reference_chunk, merged)
    return stream.result(inputs.base.shape)


def _multislerp_fallback(inputs: TensorInputs, stream: Stream, weights: list[torch.Tensor]) -> torch.Tensor:
    """mergekit's way out when the weighted unit vectors cancel: linear for two models, else an error."""
    if len(stream.models) != 2:
        raise ScfError(
            f"tensor {inputs.name!r}: multislerp: the weighted sum of the models' unit vectors is zero "
            "(antipodal models with weights that balance out); choose other weights"
        )
    for chunk, reference_chunk, (v0, v1) in stream.chunks():
        stream.write(chunk, reference_chunk, v0 * weights[0] + v1 * weights[1])
    return stream.result(inputs.base.shape)


# --- shared ---------------------------------------------------------------------------------------


def _float32_norms(stream: Stream) -> list[torch.Tensor]:
    """Each model's (or task vector's) Euclidean norm, summed in float64, as a float32 scalar tensor."""
    squares = torch.zeros(len(stream.models), dtype=torch.float64, device=stream.device)
    for _, _, values in stream.chunks():
        for i, v in enumerate(values):
            squares[i] += v.double().square().sum()
    norms = squares.sqrt().to(torch.float32)
    return [norms[i] for i in range(len(stream.models))]
