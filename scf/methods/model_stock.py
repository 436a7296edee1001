"""Model Stock (mergekit `model_stock`): move from the reference towards the models' average.

mergekit's ``base_model`` (the pretrained anchor ``w_0``) is our ``reference``; its ``models`` are our
``[base, *secondaries]`` (at least two). With the task vectors ``d_i = w_i - w_0``, ``cos`` the mean
over all pairs of ``d_i . d_j / max(|d_i| |d_j|, 1e-6)`` (each clamped to [-1, 1]) and ``N`` models:
``t = N cos / (1 + (N - 1) cos)``, and the result is ``t * mean(w_i) + (1 - t) * w_0``. Where the
denominator is below 1e-6 in magnitude there is no finite ratio and the reference is kept
(``t = 0``). One ratio per tensor, or with ``filter_wise`` one per row (each vector along the last
dimension; a tensor of rank 1 is one row).

Streaming: per tensor, the norms and the pairwise dot products (of the float32 products, as mergekit
forms them) are summed in float64 in one pass (mergekit reduces them in float32 over the whole
tensor) and rounded to float32, then the result is computed chunk by chunk with mergekit's float32
operations. Per row, a block of rows at a time
goes through mergekit's own float32 operations, so that output is bit-identical to mergekit's.
"""

from __future__ import annotations

import torch

from scf.methods.base import CHUNK_ELEMENTS, Stream, TensorInputs, require_reference
from scf.methods.params import ModelStockParams

_NORM_PRODUCT_FLOOR = 1e-6  # |d_i| |d_j| is clamped to at least this before dividing
_SINGULAR = 1e-6  # |1 + (N - 1) cos| below this keeps the reference


def model_stock(inputs: TensorInputs, params: ModelStockParams) -> torch.Tensor:
    """Model Stock's interpolation between the reference and the models' average.

    Args:
        inputs: base, one or more secondaries, and the reference (mergekit's base_model).
        params: validated `model_stock` parameters.

    Returns:
        The fused tensor, base's shape, in ``inputs.out_dtype`` (float32 when None).
    """
    reference = require_reference(inputs, "model_stock").reshape(-1)
    stream = Stream(inputs, None)  # the models themselves: the average is of weights, not deltas
    if stream.numel == 0:
        return stream.result(inputs.base.shape)
    shape = inputs.base.shape
    if params.filter_wise:
        _per_row(stream, reference, shape[-1] if len(shape) else 1)
    else:
        _per_tensor(stream, reference)
    return stream.result(shape)


def _per_tensor(stream: Stream, reference: torch.Tensor) -> None:
    """One ratio for the whole tensor: float64 statistics of the task vectors, then the values."""
    n_models = len(stream.models)
    squares = torch.zeros(n_models, dtype=torch.float64, device=stream.device)
    dots = torch.zeros(n_models, n_models, dtype=torch.float64, device=stream.device)
    (reference_buffer,) = stream.chunk_buffers("model_stock.reference", 1)
    for chunk, _, values in stream.chunks():
        reference_chunk = reference_buffer[: chunk.stop - chunk.start].copy_(reference[chunk])
        offsets = [v.sub_(reference_chunk) for v in values]
        for i in range(n_models):
            squares[i] += offsets[i].double().square().sum()
            for j in range(i + 1, n_models):  # the products rounded to float32, as mergekit's are
                dots[i, j] += (offsets[i] * offsets[j]).double().sum()
    norms = squares.sqrt().to(torch.float32)
    dots = dots.to(torch.float32)
    cosines = []
    for i in range(n_models):
        for j in range(i + 1, n_models):
            norm_product = norms[i] * norms[j]
            cosines.append((dots[i, j] / norm_product.clamp(min=_NORM_PRODUCT_FLOOR)).clamp(-1, 1))
    t = _ratio(torch.stack(cosines).mean(dim=0).unsqueeze(-1), n_models)
    for chunk, _, values in stream.chunks():
        reference_chunk = reference_buffer[: chunk.stop - chunk.start].copy_(reference[chunk])
        stream.write(chunk, None, _interpolate(values, reference_chunk, t))


def _per_row(stream: Stream, reference: torch.Tensor, row_length: int) -> None:
    """One ratio per row: mergekit's float32 operations on blocks of whole rows."""
    n_models = len(stream.models)
    step = max(1, CHUNK_ELEMENTS // row_length) * row_length
    (reference_buffer,) = stream.chunk_buffers("model_stock.reference", 1, step=step)
    for chunk, _, values in stream.chunks(step=step):
        reference_chunk = reference_buffer[: chunk.stop - chunk.start].copy_(reference[chunk])
        rows = [v.view(-1, row_length) for v in values]
        reference_rows = reference_chunk.view(-1, row_length)
        offsets = [r - reference_rows for r in rows]
        cosines = []
        for i in range(n_models):
            for j in range(i + 1, n_models):
                norm_product = torch.norm(offsets[i], dim=-1) * torch.norm(offsets[j], dim=-1)
                dot = (offsets[i] * offsets[j]).sum(dim=-1)
                cosines.append((dot / norm_product.clamp(min=_NORM_PRODUCT_FLOOR)).clamp(-1, 1))
        t = _ratio(torch.stack(cosines).mean(dim=0).unsqueeze(-1), n_models)  # (rows, 1)
        stream.write(chunk, None, _interpolate(rows, reference_rows, t).view(-1))


def _ratio(cos: torch.Tensor, n_models: int) -> torch.Tensor:
    """``t = N cos / (1 + (N - 1) cos)``, 0 where the denominator is below 1e-6 (mergekit's rule)."""
    denominator = 1 + (n_models - 1) * cos
    singular = denominator.abs() < _SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), (n_models * cos) / safe)


def _interpolate(models: list[torch.Tensor], reference: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t * mean(models) + (1 - t) * reference`` in float32, the mean summed from +0 in model order."""
    average = torch.zeros_like(models[0])
    for model in models:
        average += model
    average /= len(models)
    return t * average + (1 - t) * reference
