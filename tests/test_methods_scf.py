"""scf_rkl / scf_kl against an independent float64 re-implementation of the paper's Algorithm 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scf.errors import ScfError
from scf.methods.base import TensorInputs
from scf.methods.params import ScfParams
from scf.methods.scf import scf_kl, scf_rkl

DEFAULTS = ScfParams()


def reference_mask(
    base: torch.Tensor, secondary: torch.Tensor, params: ScfParams = DEFAULTS, *, reverse: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 in numpy float64, written from the paper: returns (mask, importance)."""
    b = base.double().numpy()
    s = secondary.double().numpy()
    rows_b = b.reshape(b.shape[0], -1) if b.ndim >= 2 else b.reshape(1, -1)
    rows_s = s.reshape(rows_b.shape)

    def softmax(rows: np.ndarray) -> np.ndarray:
        e = np.exp(rows - rows.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    q = softmax(rows_b) + params.eps
    p = softmax(rows_s) + params.eps
    kl = (q * np.log(q / p)).sum(axis=1) if reverse else (p * np.log(p / q)).sum(axis=1)
    importance = np.abs(rows_s - rows_b) * kl[:, None]
    q1, med, q3 = np.quantile(importance.ravel(), [params.q_low, params.q_center, params.q_high])
    tau = med + params.alpha * (q3 - q1)
    return (importance >= tau).reshape(b.shape), importance.reshape(b.shape)


def fuse(base: torch.Tensor, secondaries: list[torch.Tensor], fn=scf_rkl, params=DEFAULTS) -> torch.Tensor:
    return fn(TensorInputs(name="t", base=base, secondaries=secondaries), params)


def assert_matches_reference(base, secondary, fused, *, reverse=True, min_agreement=0.9999) -> None:
    """Every value is base's or secondary's bit for bit, and the mask agrees with the reference."""
    assert fused.dtype == torch.float32 and fused.shape == base.shape
    assert bool(((fused == base) | (fused == secondary)).all()), "a fused value is from neither parent"
    mask, _ = reference_mask(base, secondary, reverse=reverse)
    expected = torch.where(torch.from_numpy(mask), secondary, base)
    agreement = (fused == expected).double().mean().item()
    assert agreement >= min_agreement, f"mask agreement {agreement:.6f}"


def _pair(shape, seed, scale=0.02, delta=1e-3, heavy=False) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    base = (rng.standard_t(3, size=shape) if heavy else rng.standard_normal(shape)) * scale
    noise = rng.standard_t(2, size=shape) if heavy else rng.standard_normal(shape)
    secondary = base + delta * scale * noise
    return torch.from_numpy(base).float(), torch.from_numpy(secondary).float()


@pytest.mark.parametrize("shape", [(3000,), (256, 96), (16, 24, 20)])
@pytest.mark.parametrize("heavy", [False, True])
def test_scf_rkl_matches_algorithm_1(shape, heavy) -> None:
    base, secondary = _pair(shape, seed=len(shape), heavy=heavy, delta=1.0)
    fused = fuse(base, [secondary])
    assert_matches_reference(base, secondary, fused, min_agreement=1.0)


def test_fine_tuning_sized_deltas_need_float64_divergence() -> None:
    # q ~= p: a plain float32 sum(q * log(q / p)) flips a visible share of this mask.
    base, secondary = _pair((512, 384), seed=7, delta=1e-3)
    fused = fuse(base, [secondary])
    assert_matches_reference(base, secondary, fused)


def test_scf_kl_matches_forward_kl_reference() -> None:
    base, secondary = _pair((128, 64), seed=11, delta=0.5)
    fused = fuse(base, [secondary], fn=scf_kl)
    assert_matches_reference(base, secondary, fused, reverse=False, min_agreement=1.0)
    assert not torch.equal(fused, fuse(base, [secondary], fn=scf_rkl)), "forward and reverse KL agree"


def test_takes_about_the_paper_share_from_the_secondary() -> None:
    base, secondary = _pair((256, 256), seed=3, delta=0.1)
    share = (fuse(base, [secondary]) == secondary).double().mean().item()
    assert 0.03 < share < 0.3


def test_exact_ties_in_importance() -> None:
    # Identical rows and deltas from {0, +-1/64}: importance takes a handful of exactly tied values.
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 32, generator=g).repeat(64, 1)
    secondary = base + torch.randint(-1, 2, (64, 32), generator=g).float() / 64
    fused = fuse(base, [secondary])
    assert_matches_reference(base, secondary, fused, min_agreement=1.0)


def test_identical_inputs_mask_everything_and_return_the_base() -> None:
    # I == 0 everywhere, so Q1 = med = Q3 = 0, tau = 0 and I >= tau holds for every element: the
    # mask is all true (as the reference says); the values taken equal the base's bit for bit.
    base, _ = _pair((64, 48), seed=1)
    mask, _ = reference_mask(base, base.clone())
    assert mask.all()
    assert torch.equal(fuse(base, [base.clone()]), base)


def test_scalar_is_never_masked() -> None:
    fused = fuse(torch.tensor(1.5), [torch.tensor(-7.0)])
    assert fused.shape == () and fused.item() == 1.5
    assert fuse(torch.zeros(0, 4), [torch.ones(0, 4)]).shape == (0, 4)  # empty: nothing to mask


def test_inputs_are_not_modified() -> None:
    base, secondary = _pair((32, 16), seed=2, delta=1.0)
    before = (base.clone(), secondary.clone())
    fuse(base, [secondary])
    assert torch.equal(base, before[0]) and torch.equal(secondary, before[1])


def test_more_than_2_to_the_24_elements() -> None:
    # torch.quantile refuses this size; the exact selection must not subsample.
    base, secondary = _pair((4100, 4100), seed=13, delta=1e-2)
    assert base.numel() > 2**24
    fused = fuse(base, [secondary])
    assert_matches_reference(base, secondary, fused)


def test_several_secondaries_larger_importance_wins_where_masks_overlap() -> None:
    base, first = _pair((96, 40), seed=21, delta=1.0)
    _, second = _pair((96, 40), seed=22, delta=1.0)
    second = base + (second - base) * 1.3
    mask_1, imp_1 = reference_mask(base, first)
    mask_2, imp_2 = reference_mask(base, second)
    assert (mask_1 & mask_2).any(), "test data should have overlapping masks"
    take_2 = mask_2 & ~(mask_1 & (imp_1 >= imp_2))
    take_1 = mask_1 & ~take_2
    expected = torch.where(torch.from_numpy(take_1), first, base)
    expected = torch.where(torch.from_numpy(take_2), second, expected)
    fused = fuse(base, [first, second])
    assert torch.equal(fused, expected)


def test_non_finite_weights_name_the_tensor() -> None:
    base = torch.zeros(4, 4)
    secondary = base.clone()
    secondary[1, 2] = float("inf")
    with pytest.raises(ScfError, match="tensor 't'.*inf or NaN"):
        fuse(base, [secondary])


def test_needs_a_secondary() -> None:
    with pytest.raises(ScfError, match="at least one secondary"):
        fuse(torch.zeros(3), [])


def test_alpha_zero_and_custom_quantiles_follow_the_formula() -> None:
    base, secondary = _pair((200, 30), seed=9, delta=1.0)
    params = ScfParams(alpha=0.0, q_low=0.1, q_center=0.6, q_high=0.9)
    fused = fuse(base, [secondary], params=params)
    mask, _ = reference_mask(base, secondary, params)
    assert torch.equal(fused, torch.where(torch.from_numpy(mask), secondary, base))
    assert abs((fused == secondary).double().mean().item() - 0.4) < 0.01  # I >= Q(0.6) keeps ~40%
