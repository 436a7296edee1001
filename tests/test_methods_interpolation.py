"""slerp, nuslerp, multislerp, nearswap and model_stock, pinned to hand-computed values and to
independent whole-tensor forms of mergekit 0.1.5's definitions (float64 where mergekit's own order
is unspecified, mergekit's float32 operations where it is not)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_methods import n_secondaries, runnable_params, takes_reference

import scf.methods.base as methods_base
from scf.errors import ScfError
from scf.methods.base import TensorInputs, Workspace
from scf.methods.registry import METHODS, validate_params
from scf.methods.slerp import SLERP_CHUNK

PORTED = ("slerp", "nuslerp", "multislerp", "nearswap", "model_stock")


def t32(values) -> torch.Tensor:
    return values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float32)


def run(name: str, base, secondaries, reference=None, **params) -> torch.Tensor:
    """Validate params like the engine does and call the method."""
    secondaries = [t32(s) for s in secondaries]
    validated = validate_params(name, params, n_models=1 + len(secondaries))
    inputs = TensorInputs("w", t32(base), secondaries, None if reference is None else t32(reference))
    return METHODS[name].fn(inputs, validated)


def family(n_models: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0):
    """A reference and fine-tune-like models, stored in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    reference = torch.randn(shape, generator=g) * 0.02
    models = [reference + torch.randn(shape, generator=g) * torch.randn(shape, generator=g) * 1e-3
              for _ in range(n_models)]
    return reference.to(dtype), [m.to(dtype) for m in models]


def bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    differing = int((actual.view(torch.int32) != expected.view(torch.int32)).sum())
    assert differing == 0, f"{differing} of {actual.numel()} elements differ in their bits"


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(methods_base, "CHUNK_ELEMENTS", 1000)


# --- slerp ----------------------------------------------------------------------------------------


def slerp_like_mergekit(t: float, a: torch.Tensor, b: torch.Tensor, chunk: int = SLERP_CHUNK) -> torch.Tensor:
    """mergekit 0.1.5's slerp formulas on whole float32 tensors, statistics summed over ``chunk``s."""
    x, y = a.float().reshape(1, -1), b.float().reshape(1, -1)
    starts = range(0, x.shape[1], chunk)
    norm_x = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(x[:, s : s + chunk], dim=1, keepdim=True) for s in starts]), dim=0)
    norm_y = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(y[:, s : s + chunk], dim=1, keepdim=True) for s in starts]), dim=0)
    norm_x, norm_y = torch.where(norm_x > 1e-8, norm_x, 1), torch.where(norm_y > 1e-8, norm_y, 1)
    dots = [(x[:, s : s + chunk] / norm_x * (y[:, s : s + chunk] / norm_y)).sum(dim=1, keepdim=True)
            for s in starts]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    tt = torch.tensor([[t]])
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    coef_x = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / torch.sin(theta))
    coef_y = torch.where(linear, tt, torch.sin(tt * theta) / torch.sin(theta))
    return (coef_x * x + coef_y * y).view(a.shape)


def test_slerp_of_orthogonal_vectors_follows_the_arc() -> None:
    # theta = pi/2: coefficients sin((1-t) pi/2) and sin(t pi/2)
    out = run("slerp", [2.0, 0.0], [[0.0, 3.0]], t=1 / 3)
    assert out.tolist() == pytest.approx([2 * math.sin(math.pi / 3), 3 * math.sin(math.pi / 6)], rel=1e-6)
    out = run("slerp", [1.0, 0.0], [[0.0, 1.0]], t=0.5)
    assert out.tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(0.5)], rel=1e-6)


def test_slerp_at_an_angle_against_float64() -> None:
    base, secondary = torch.tensor([3.0, 1.0, -2.0]), torch.tensor([1.0, 2.0, 2.0])
    cos = float(base @ secondary) / (float(base.norm()) * float(secondary.norm()))
    theta, t = math.acos(cos), 0.3
    expected = (math.sin((1 - t) * theta) * base.double() + math.sin(t * theta) * secondary.double())
    expected /= math.sin(theta)
    out = run("slerp", base, [secondary], t=t)
    assert out.double().tolist() == pytest.approx(expected.tolist(), rel=1e-6)


@pytest.mark.parametrize(("scale", "t"), [(2.0, 0.25), (-1.0, 0.25), (0.5, 0.8)])
def test_slerp_of_parallel_or_antiparallel_tensors_is_linear(scale: float, t: float) -> None:
    base = torch.tensor([1.0, -2.0, 0.5])
    out = run("slerp", base, [scale * base], t=t)
    bits_equal(out, (1 - torch.tensor(t)) * base + torch.tensor(t) * (scale * base))


def test_slerp_switches_to_linear_above_cosine_0_9995() -> None:
    base, t = torch.tensor([1.0, 0.0]), 0.5
    for cos, linear in ((0.9996, True), (0.999, False)):
        secondary = torch.tensor([cos, math.sqrt(1 - cos**2)])
        out = run("slerp", base, [secondary], t=t)
        lerp = (1 - t) * base + t * secondary
        assert torch.equal(out, lerp) == linear
        assert torch.allclose(out, slerp_like_mergekit(t, base, secondary))


def test_slerp_at_t_0_and_1_returns_each_model_bit_for_bit() -> None:
    _, (base, secondary) = family(2, (17, 9))
    bits_equal(run("slerp", base, [secondary], t=0.0), base)
    bits_equal(run("slerp", base, [secondary], t=1.0), secondary)


def test_slerp_of_a_zero_tensor_scales_the_other_by_sin_t_pi_over_2() -> None:
    # a norm of 0 counts as 1: the cosine with a zero vector is 0, so theta = pi/2
    secondary = torch.tensor([1.0, -3.0])
    out = run("slerp", [0.0, 0.0], [secondary], t=0.4)
    assert out.tolist() == pytest.approx((math.sin(0.4 * math.pi / 2) * secondary).tolist(), rel=1e-6)


def test_slerp_extrapolates_outside_0_1_like_mergekit() -> None:
    base, secondary = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    bits_equal(run("slerp", base, [secondary], t=1.5), slerp_like_mergekit(1.5, base, secondary))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slerp_sums_its_statistics_over_mergekits_chunks(dtype: torch.dtype) -> None:
    # 2**20 + 4099 elements: two chunks of mergekit's, so its norm is the norm of two chunk norms
    _, (base, secondary) = family(2, (SLERP_CHUNK + 4099,), dtype, seed=4)
    bits_equal(run("slerp", base, [secondary], t=0.35), slerp_like_mergekit(0.35, base, secondary))


# --- nuslerp --------------------------------------------------------------------------------------


def nuslerp_float64(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """nuslerp of two vectors along the last dimension, in float64."""
    v0, v1 = v0.double(), v1.double()
    cos = ((v0 / v0.norm(dim=-1, keepdim=True)) * (v1 / v1.norm(dim=-1, keepdim=True))).sum(-1, keepdim=True)
    theta = torch.acos(cos.clamp(-1, 1))
    return (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)


def test_nuslerp_t_comes_from_the_weights() -> None:
    base, secondary = torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])
    # t = 0.5: the bisector, scaled by 1 / (2 cos(theta/2)) with cos theta = 24/25
    expected = 7 / (2 * math.sqrt(0.98))
    assert run("nuslerp", base, [secondary]).tolist() == pytest.approx([expected, expected], rel=1e-6)
    for weight, t in (([1.0, 3.0], 0.75), ([2.0, 0.0], 0.0), ([1.0, -1.0], 0.5)):  # sum ~0 -> 0.5
        out = run("nuslerp", base, [secondary], weight=weight)
        assert out.double().tolist() == pytest.approx(nuslerp_float64(t, base, secondary).tolist(), rel=1e-6)


def test_nuslerp_whole_tensor_rows_and_columns() -> None:
    base = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    secondary = torch.tensor([[0.0, 1.0], [4.0, 3.0]])
    rows = run("nuslerp", base, [secondary], nuslerp_flatten=False)
    assert torch.allclose(rows.double(), nuslerp_float64(0.5, base, secondary), rtol=1e-6)
    assert rows[0].tolist() == pytest.approx([math.sqrt(0.5)] * 2, rel=1e-6)  # orthogonal unit rows
    columns = run("nuslerp", base, [secondary], nuslerp_flatten=False, nuslerp_row_wise=True)
    assert torch.allclose(columns.double(), nuslerp_float64(0.5, base.T, secondary.T).T, rtol=1e-6)
    whole = run("nuslerp", base, [secondary])
    expected = nuslerp_float64(0.5, base.reshape(-1), secondary.reshape(-1)).view(2, 2)
    assert torch.allclose(whole.double(), expected, rtol=1e-6)
    assert not torch.allclose(whole, rows) and not torch.allclose(rows, columns)


def test_nuslerp_with_a_reference_interpolates_task_vectors() -> None:
    reference = torch.tensor([1.0, 1.0, 1.0])
    base, secondary = reference + torch.tensor([2.0, 0.0, 0.0]), reference + torch.tensor([0.0, 2.0, 0.0])
    out = run("nuslerp", base, [secondary], reference)
    assert out.tolist() == pytest.approx([1 + math.sqrt(2), 1 + math.sqrt(2), 1.0], rel=1e-6)


def test_nuslerp_of_colinear_vectors_is_linear() -> None:
    # colinear means 1 - cos**2 <= 1e-16: in float32, unit vectors whose cosine rounds to exactly 1
    base = torch.tensor([0.0, -2.0, 0.0])
    out = run("nuslerp", base, [3 * base], weight=[1.0, 3.0])  # t = 0.75
    bits_equal(out, 0.25 * base + 0.75 * (3 * base))


def test_nuslerp_rows_use_mergekits_float32_operations(small_chunks) -> None:
    _, (base, secondary) = family(2, (37, 53), torch.bfloat16, seed=3)  # 27 rows per 1000-element chunk
    v0, v1 = base.float(), secondary.float()
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    t = 0.6 / (0.4 + 0.6)
    theta = torch.acos(cos)
    expected = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    bits_equal(run("nuslerp", base, [secondary], weight=[0.4, 0.6], nuslerp_flatten=False), expected)


# --- multislerp -----------------------------------------------------------------------------------


def multislerp_float64(models, weights, reference=None, normalize=True, eps=1e-8) -> torch.Tensor:
    """mergekit's multislerp formulas in float64."""
    vectors = torch.stack([m.double().reshape(-1) for m in models])
    if reference is not None:
        vectors -= reference.double().reshape(-1)
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    norms = vectors.norm(dim=1, keepdim=True)
    units = vectors / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
    size = tangent.norm() + eps
    result = (mean * torch.cos(size) + tangent * torch.sin(size) / size) * (norms[:, 0] * w).sum()
    result = result.view(models[0].shape)
    return result if reference is None else result + reference.double()


def test_multislerp_of_two_orthogonal_vectors_is_their_slerp_midpoint() -> None:
    out = run("multislerp", [2.0, 0.0], [[0.0, 4.0]])  # weights 1, 1 -> 0.5, 0.5; mean norm 3
    assert out.tolist() == pytest.approx([3 * math.sqrt(0.5)] * 2, rel=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_of_three_models_against_float64(normalize: bool) -> None:
    reference, models = family(3, (11, 7), seed=5)
    weights = [0.5, 0.2, 0.3]
    out = run("multislerp", models[0], models[1:], reference, weight=weights, normalize_weights=normalize)
    expected = multislerp_float64(models, weights, reference, normalize)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-7)
    expected = multislerp_float64(models, weights, None, normalize)  # no reference: the models themselves
    out = run("multislerp", models[0], models[1:], weight=weights, normalize_weights=normalize)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-7)


def test_multislerp_of_antipodal_models_falls_back_or_refuses() -> None:
    base = torch.tensor([1.0, -2.0])
    assert run("multislerp", base, [-base]).tolist() == [0.0, 0.0]  # two: 0.5 v - 0.5 v
    with pytest.raises(ScfError, match=r"tensor 'w': multislerp: the weighted sum of the models' unit "
                                       r"vectors is zero .*choose other weights"):
        run("multislerp", base, [-base, 2 * base], weight=[1.0, 2.0, 1.0])


# --- nearswap -------------------------------------------------------------------------------------


def test_nearswap_moves_close_elements_to_the_secondary() -> None:
    base = torch.zeros(4)
    secondary = torch.tensor([1e-4, 0.01, 1.0, 0.0])
    # |b - s| = [1e-4, 0.01, 1, 0]: weights min(1, 0.001 / d) = [1, 0.1, 0.001, 1 (d clamped to 1e-6)]
    out = run("nearswap", base, [secondary], t=0.001)
    assert out.tolist() == pytest.approx([1e-4, 0.001, 0.001, 0.0], rel=1e-6)


def test_nearswap_uses_mergekits_float32_operations() -> None:
    _, (base, secondary) = family(2, (23, 31), torch.bfloat16, seed=6)
    a, b = base.float(), secondary.float()
    weight = (0.0004 / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)  # torch: reciprocal * t
    bits_equal(run("nearswap", base, [secondary], t=0.0004), weight * b + (1 - weight) * a)
    bits_equal(run("nearswap", base, [secondary], t=0.0), a)  # t = 0 keeps the base


# --- model_stock ----------------------------------------------------------------------------------


def test_model_stock_ratio_from_the_angle_between_task_vectors() -> None:
    reference = torch.tensor([1.0, 1.0])
    d1, d2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])  # 60 degrees: cos 0.5
    out = run("model_stock", reference + d1, [reference + d2], reference)
    t = 2 * 0.5 / (1 + 0.5)
    expected = t * (reference + (d1 + d2) / 2) + (1 - t) * reference
    assert out.tolist() == pytest.approx(expected.tolist(), rel=1e-6)


def test_model_stock_keeps_the_reference_for_orthogonal_or_opposite_task_vectors() -> None:
    reference = torch.tensor([0.5, -1.0, 2.0])
    x, y = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    orthogonal = run("model_stock", reference + x, [reference + y], reference)
    bits_equal(orthogonal, reference)  # cos 0 -> t = 0
    delta = torch.tensor([1.0, 2.0, -1.0])
    opposite = run("model_stock", reference + delta, [reference - delta], reference)
    bits_equal(opposite, reference)  # cos -1: 1 + (N - 1) cos = 0, no finite ratio -> t = 0
    same = run("model_stock", reference + delta, [reference + delta], reference)
    assert torch.allclose(same, reference + delta)  # cos 1 -> t = 1: the average


def test_model_stock_of_three_models_averages_the_pairwise_cosines() -> None:
    reference, models = family(3, (9, 8), seed=7)
    offsets = [m.double().reshape(-1) - reference.double().reshape(-1) for m in models]
    cosines = [float(a @ b / (a.norm() * b.norm())) for i, a in enumerate(offsets) for b in offsets[i + 1 :]]
    cos = sum(cosines) / 3
    t = 3 * cos / (1 + 2 * cos)
    expected = t * sum(m.double() for m in models) / 3 + (1 - t) * reference.double()
    out = run("model_stock", models[0], models[1:], reference)
    assert torch.allclose(out.double(), expected, rtol=1e-6, atol=1e-8)


def test_model_stock_filter_wise_has_one_ratio_per_row(small_chunks) -> None:
    reference, models = family(2, (61, 47), torch.bfloat16, seed=8)  # 21 rows per 1000-element chunk
    w0, ws = reference.float(), [m.float() for m in models]
    a, b = ws[0] - w0, ws[1] - w0
    cos = ((a * b).sum(dim=-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
    cos = torch.stack([cos]).mean(dim=0).unsqueeze(-1)
    t = (2 * cos) / (1 + cos)
    expected = t * ((torch.zeros_like(w0) + ws[0] + ws[1]) / 2) + (1 - t) * w0
    bits_equal(run("model_stock", models[0], models[1:], reference, filter_wise=True), expected)
    # a vector is one row: its filter-wise ratio is the whole-tensor one
    vector_ref, vector_models = family(2, (300,), seed=9)
    by_row = run("model_stock", vector_models[0], vector_models[1:], vector_ref, filter_wise=True)
    whole = run("model_stock", vector_models[0], vector_models[1:], vector_ref)
    assert torch.allclose(by_row, whole, rtol=1e-6)


# --- all of them: streaming, dtypes, inputs, bytes ------------------------------------------------


@pytest.mark.parametrize("name", PORTED)
@pytest.mark.parametrize("shape", [(41, 123), (301,), (5, 6, 7), ()])
def test_chunks_out_dtype_and_workspace_change_no_bit(monkeypatch: pytest.MonkeyPatch, name: str,
                                                      shape: tuple[int, ...]) -> None:
    n_models = 1 + n_secondaries(name, 2)
    reference, models = family(n_models, shape, torch.bfloat16, seed=len(shape))
    reference = reference if takes_reference(name) else None
    before = [m.clone() for m in models]
    for option in ({}, {"filter_wise": True}, {"nuslerp_flatten": False}, {"nuslerp_row_wise": True,
                                                                         "nuslerp_flatten": False}):
        if not set(option) <= set(METHODS[name].params.model_fields):
            continue
        params = validate_params(name, runnable_params(name, **option), n_models)
        outputs = []
        for chunk in (1 << 20, 1000, 7):
            monkeypatch.setattr(methods_base, "CHUNK_ELEMENTS", chunk)
            outputs.append(METHODS[name].fn(TensorInputs("w", models[0], models[1:], reference), params))
        for output in outputs[1:]:  # whole-tensor statistics are float64 sums: rounded, they agree
            bits_equal(output, outputs[0])
        workspace = Workspace()
        for _ in range(2):  # a reused workspace, and the output dtype the engine writes
            inputs = TensorInputs("w", models[0], models[1:], reference, None, workspace, torch.bfloat16)
            rounded = METHODS[name].fn(inputs, params)
            assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, outputs[0].to(torch.bfloat16))
    for original, model in zip(before, models, strict=True):
        assert torch.equal(original.view(torch.int16), model.view(torch.int16))  # inputs untouched


@pytest.mark.parametrize("name", PORTED)
def test_an_empty_tensor_merges_to_an_empty_tensor(name: str) -> None:
    empty = torch.zeros(0, 4)
    out = run(name, empty, [empty] * n_secondaries(name, 2), empty, **runnable_params(name))
    assert out.shape == (0, 4)
