"""Baselines pinned to hand-computed values (mergekit's definitions and defaults)."""

from __future__ import annotations

import pytest
import torch
from helpers_methods import n_secondaries, runnable_params

from scf.errors import ScfError
from scf.methods.base import TensorInputs
from scf.methods.registry import METHODS, validate_params


def t(values) -> torch.Tensor:
    """A float32 tensor from a list (tensors pass through)."""
    return values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float32)


def run(name: str, base, secondaries, reference=None, seed: int | None = 0, **params) -> torch.Tensor:
    """Validate params like the engine does and call the method."""
    secondaries = [t(s) for s in secondaries]
    validated = validate_params(name, params, n_models=1 + len(secondaries))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    inputs = TensorInputs(
        name="w",
        base=t(base),
        secondaries=secondaries,
        reference=None if reference is None else t(reference),
        generator=generator,
    )
    return METHODS[name].fn(inputs, validated)


# --- linear -----------------------------------------------------------------------------------


def test_linear_weighted_mean_and_plain_sum() -> None:
    assert run("linear", [1.0, 2.0], [[3.0, 6.0]], weight=[1, 3]).tolist() == [2.5, 5.0]
    assert run("linear", [1.0, 2.0], [[3.0, 6.0]], weight=[1, 3], normalize=False).tolist() == [10.0, 20.0]
    assert run("linear", [0.0], [[3.0], [6.0]]).tolist() == [3.0]  # default weight 1: the mean


# --- task arithmetic --------------------------------------------------------------------------

REF3 = [1.0, 2.0, -1.0]


def test_task_arithmetic_weights_and_lambda() -> None:
    base = [2.0, 1.0, 1.0]  # task vector [1, -1, 2]
    secondary = [4.0, 3.0, -3.0]  # task vector [3, 1, -2]
    # lambda * (1 * [1, -1, 2] + 0.5 * [3, 1, -2]) = 2 * [2.5, -0.5, 1] = [5, -1, 2]
    out = run("task_arithmetic", base, [secondary], REF3, weight=[1.0, 0.5], **{"lambda": 2.0})
    assert out.tolist() == [6.0, 1.0, 1.0]
    # normalize divides by the weight sum 1.5
    out = run("task_arithmetic", base, [secondary], REF3, weight=[1.0, 0.5], normalize=True)
    assert torch.allclose(out, torch.tensor(REF3) + torch.tensor([2.5, -0.5, 1.0]) / 1.5)


# --- TIES -------------------------------------------------------------------------------------

REF8 = torch.tensor([1.0, 2.0, -1.0, 0.5, 4.0, -2.0, 0.0, 8.0])
TV_BASE = torch.tensor([3.0, -1.0, 0.5, -4.0, 2.0, 0.25, 5.0, 0.125])
TV_SECONDARY = torch.tensor([-1.0, 0.875, 1.5, -0.5, 0.75, -3.0, 1.25, 0.375])


def test_ties_trim_elect_disjoint_mean() -> None:
    # density 0.5 keeps 4 of 8 by magnitude:
    #   base      [3, 0, 0, -4, 2, 0, 5, 0]      secondary x2 [-2, 0, 3, 0, 0, -6, 2.5, 0]
    # elected sign of the weighted sum [1, 0, 3, -4, 2, -6, 7.5, 0]: + + + - + - + + (0 counts +)
    # agreeing weights (divisor; 0 -> 1): [1, 1, 2, 1, 1, 2, 3, 1]
    # disjoint mean: [3, 0, 3/2, -4, 2, -6/2, 7.5/3, 0]
    out = run("ties", REF8 + TV_BASE, [REF8 + TV_SECONDARY], REF8, weight=[1.0, 2.0], density=0.5)
    assert torch.equal(out, REF8 + torch.tensor([3.0, 0.0, 1.5, -4.0, 2.0, -3.0, 2.5, 0.0]))


def test_ties_without_normalize_and_with_lambda() -> None:
    out = run(
        "ties", REF8 + TV_BASE, [REF8 + TV_SECONDARY], REF8,
        weight=[1.0, 2.0], density=0.5, normalize=False, **{"lambda": 0.5},
    )  # fmt: skip
    assert torch.equal(out, REF8 + 0.5 * torch.tensor([3.0, 0.0, 3.0, -4.0, 2.0, -6.0, 7.5, 0.0]))


def test_ties_a_zero_weighted_sum_elects_plus() -> None:
    # weighted task vectors [2, -2] sum to 0, which elects + (mergekit): only the base's agrees
    out = run("ties", [2.0, -2.0], [[-1.0, 1.0]], [0.0, 0.0], weight=[1.0, 2.0])
    assert out.tolist() == [2.0, 1.0]


def test_ties_trims_exactly_density_times_numel_even_with_ties() -> None:
    reference = torch.zeros(10)
    base = torch.tensor([1.0] * 10)  # every magnitude tied
    out = run("ties", base, [reference.clone()], reference, density=0.3)
    assert int(torch.count_nonzero(out)) == 3


# --- DARE -------------------------------------------------------------------------------------


def _dare_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    reference = torch.randn(200, 500, generator=g)
    base = reference + torch.randn(200, 500, generator=g)
    return reference, base, reference + torch.randn(200, 500, generator=g)


def test_dare_drops_with_the_given_generator_and_rescales_survivors() -> None:
    reference, base, secondary = _dare_inputs()
    out = run("dare_linear", base, [secondary], reference, seed=7, weight=[1.0, 0.0], density=0.3)
    # the base's task vector is sparsified first, from the generator's first draws
    expected_keep = torch.empty(200, 500).bernoulli_(0.3, generator=torch.Generator().manual_seed(7)).bool()
    kept = out != reference
    assert torch.equal(kept, expected_keep)
    assert torch.equal(out[kept], reference[kept] + (base - reference)[kept] / 0.3)
    assert abs(kept.double().mean().item() - 0.3) < 5 * (0.3 * 0.7 / kept.numel()) ** 0.5


def test_dare_without_rescale_keeps_survivors_as_they_are() -> None:
    reference, base, secondary = _dare_inputs()
    out = run("dare_linear", base, [secondary], reference, weight=[1.0, 0.0], density=0.5, rescale=False)
    kept = out != reference
    assert torch.equal(out[kept], base[kept])


def test_dare_same_seed_is_bitwise_equal_and_another_seed_differs() -> None:
    reference, base, secondary = _dare_inputs()
    for name in ("dare_linear", "dare_ties"):
        first = run(name, base, [secondary], reference, seed=1, density=0.5)
        assert torch.equal(first, run(name, base, [secondary], reference, seed=1, density=0.5))
        assert not torch.equal(first, run(name, base, [secondary], reference, seed=2, density=0.5))


def test_dare_at_density_1_is_task_arithmetic_and_ties() -> None:
    reference, base, secondary = _dare_inputs()
    assert torch.equal(
        run("dare_linear", base, [secondary], reference, density=1.0),
        run("task_arithmetic", base, [secondary], reference),
    )
    assert torch.equal(
        run("dare_ties", base, [secondary], reference, density=1.0, normalize=True),
        run("ties", base, [secondary], reference, density=1.0),
    )


def test_dare_needs_a_generator() -> None:
    reference, base, secondary = _dare_inputs()
    with pytest.raises(ScfError, match="tensor 'w'.*seeded generator"):
        run("dare_ties", base, [secondary], reference, seed=None, density=0.5)


# --- breadcrumbs ------------------------------------------------------------------------------

TV10 = torch.tensor([0.125, -5.0, 0.375, 2.0, -0.25, 1.0, 0.0625, 4.0, -3.0, 0.5])
REF10 = torch.tensor([0.5, -1.0, 0.25, 2.0, -0.5, 1.0, 0.0, 4.0, -2.0, 0.75])  # REF10 + TV10 - REF10 == TV10


def test_breadcrumbs_cuts_the_outliers_and_the_smallest() -> None:
    # 10 entries, density 0.5 keeps 5, gamma 0.2 cuts the 2 largest: ascending |tv|
    # .0625 .125 .25 .375 .5 1 2 3 4 5 -> ranks [10 - 5 - 2, 10 - 2) = [3, 8): .375 .5 1 2 3
    out = run("breadcrumbs", REF10 + TV10, [REF10.clone()], REF10, density=0.5, gamma=0.2)
    expected = torch.tensor([0.0, 0.0, 0.375, 2.0, 0.0, 1.0, 0.0, 0.0, -3.0, 0.5])
    assert torch.equal(out, REF10 + expected)  # the secondary's task vector is zero; weights 1, summed


def test_breadcrumbs_shrinks_the_outlier_cut_to_keep_the_density() -> None:
    # density 0.9 keeps 9 and gamma 0.2 would cut 2: n_bottom = max(0, 10 - 9 - 2) = 0, so the band is
    # the 9 smallest: only the largest (-5) goes
    out = run("breadcrumbs", REF10 + TV10, [REF10.clone()], REF10, density=0.9, gamma=0.2)
    assert torch.equal(out, REF10 + torch.where(TV10.abs() == 5, 0.0, TV10))
    # gamma 0 is a plain top-density cut; a density under 1/numel keeps nothing (no floor of 1)
    out = run("breadcrumbs", REF10 + TV10, [REF10.clone()], REF10, density=0.3, gamma=0.0)
    assert torch.equal(out, REF10 + torch.where(TV10.abs() >= 3, TV10, 0.0))
    out = run("breadcrumbs", REF10 + TV10, [REF10.clone()], REF10, density=0.05)
    assert torch.equal(out, REF10)


def test_breadcrumbs_keeps_ties_at_the_band_edges_as_a_stable_sort() -> None:
    # |tv| = 1 1 1 2 2 2 3 3 (ascending ranks of a stable sort: by index among equals); density 0.5,
    # gamma 0.25 -> ranks [8 - 4 - 2, 8 - 2) = [2, 6): the last 1, all three 2s
    tv = torch.tensor([2.0, -1.0, 3.0, 1.0, -2.0, 3.0, -1.0, 2.0])
    reference = torch.zeros(8)
    out = run("breadcrumbs", tv, [reference.clone()], reference, density=0.5, gamma=0.25)
    assert torch.equal(out, torch.tensor([2.0, 0.0, 0.0, 0.0, -2.0, 0.0, -1.0, 2.0]))


def test_breadcrumbs_rescale_restores_the_l1_norm_and_ties_elects_signs() -> None:
    out = run("breadcrumbs", REF10 + TV10, [REF10.clone()], REF10, density=0.5, gamma=0.2, rescale=True)
    kept = torch.tensor([0.0, 0.0, 0.375, 2.0, 0.0, 1.0, 0.0, 0.0, -3.0, 0.5])
    sums = [torch.tensor(float(v.double().abs().sum()), dtype=torch.float32) for v in (TV10, kept)]
    factor = sums[0] / sums[1]  # 16.3125 / 6.875
    assert torch.equal(out, REF10 + kept * factor)
    # with sign election: the secondary's task vector -TV10 / 2 keeps the same band; weighted 3 it
    # outvotes the base everywhere, so only its entries survive (no normalize: summed as they are)
    out = run("breadcrumbs_ties", REF10 + TV10, [REF10 - TV10 / 2], REF10, weight=[1.0, 3.0],
              density=0.5, gamma=0.2)
    assert torch.equal(out, REF10 - 1.5 * kept)


# --- DELLA ------------------------------------------------------------------------------------


def test_della_keep_probabilities_rise_with_the_magnitude_rank() -> None:
    # one row of 5 distinct magnitudes, ranks 1..5: p = (0.5 - 0.2) + (rank - 1) / 4 * 0.4
    tv = torch.tensor([[0.3, -0.1, 0.5, -0.2, 0.4]])
    reference = torch.zeros(1, 5)
    probabilities = torch.tensor([[0.5, 0.3, 0.7, 0.4, 0.6]])
    for seed in range(5):
        out = run("della_linear", tv, [reference.clone()], reference, seed=seed, density=0.5, epsilon=0.2,
                  rescale=False)
        expected_keep = torch.bernoulli(probabilities, generator=torch.Generator().manual_seed(seed)).bool()
        assert torch.equal(out, torch.where(expected_keep, tv, 0.0))


def test_della_keeps_the_density_on_average_and_the_large_more_often() -> None:
    reference, base, secondary = _dare_inputs()
    out = run("della_linear", base, [secondary], reference, seed=3, weight=[1.0, 0.0], density=0.4,
              epsilon=0.3, rescale=False)
    kept = out != reference
    assert abs(kept.double().mean().item() - 0.4) < 5 * (0.4 * 0.6 / kept.numel()) ** 0.5
    magnitude = (base - reference).abs()
    small, large = magnitude < magnitude.quantile(0.1), magnitude > magnitude.quantile(0.9)
    # ranks 0-10% are kept with probability 0.1-0.16, ranks 90-100% with 0.64-0.7
    assert kept[small].double().mean() < 0.2 and kept[large].double().mean() > 0.6


def test_della_rescales_to_the_l1_norm_and_elects_signs() -> None:
    reference, base, secondary = _dare_inputs()
    out = run("della_linear", base, [secondary], reference, seed=5, weight=[1.0, 0.0], density=0.5)
    delta, merged = base - reference, out - reference
    assert merged.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    kept = merged != 0
    factor = delta.abs().sum() / delta[kept].abs().sum()
    assert torch.allclose(merged[kept], delta[kept] * factor, rtol=1e-6, atol=1e-6)  # (r + x) - r rounds


def test_della_same_seed_is_bitwise_equal_and_density_1_is_ties() -> None:
    reference, base, secondary = _dare_inputs()
    for name in ("della", "della_linear"):
        first = run(name, base, [secondary], reference, seed=1, density=0.5)
        assert torch.equal(first, run(name, base, [secondary], reference, seed=1, density=0.5))
        assert not torch.equal(first, run(name, base, [secondary], reference, seed=2, density=0.5))
    # nothing is dropped at density 1: della is ties' sign election, della_linear a plain sum
    assert torch.equal(run("della", base, [secondary], reference), run("ties", base, [secondary], reference))
    assert torch.equal(run("della_linear", base, [secondary], reference),
                       run("task_arithmetic", base, [secondary], reference))


def test_della_needs_a_generator() -> None:
    reference, base, secondary = _dare_inputs()
    message = "^tensor 'w': method 'della' drops at random and needs a seeded generator$"
    with pytest.raises(ScfError, match=message):
        run("della", base, [secondary], reference, seed=None, density=0.5)


# --- SCE --------------------------------------------------------------------------------------

REF4 = torch.tensor([1.0, -1.0, 0.5, 2.0])
SCE_BASE = REF4 + torch.tensor([1.0, 2.0, -3.0, 0.0])
SCE_SECONDARY = REF4 + torch.tensor([3.0, -2.0, -1.0, 0.0])


def test_sce_calculate_and_erase() -> None:
    # mean squares 3.5 and 3.5 -> weights 0.5, 0.5; elected signs of the raw sum [4, 0, -4, 0]: + + - +
    # [ (0.5*1 + 0.5*3)/1, 0.5*2/0.5, (0.5*-3 + 0.5*-1)/1, 0/1e-6 ]
    out = run("sce", SCE_BASE, [SCE_SECONDARY], REF4)
    assert torch.equal(out, REF4 + torch.tensor([2.0, 2.0, -2.0, 0.0]))


def test_sce_select_topk_keeps_the_highest_variance_share() -> None:
    # variances [1, 4, 1, 0]; 3 nonzero, select_topk 0.5 keeps int(1.5) = 1: only element 1 survives
    out = run("sce", SCE_BASE, [SCE_SECONDARY], REF4, select_topk=0.5)
    assert torch.equal(out, REF4 + torch.tensor([0.0, 2.0, 0.0, 0.0]))


def test_sce_weights_by_mean_squared_magnitude() -> None:
    reference = torch.zeros(2)
    # mean squares 2 and 0.5 -> weights 0.8, 0.2: (0.8 * 2 + 0.2 * 1) / (0.8 + 0.2) = 1.8
    out = run("sce", torch.tensor([2.0, 0.0]), [torch.tensor([1.0, 0.0])], reference)
    assert torch.allclose(out, torch.tensor([1.8, 0.0]), rtol=0, atol=1e-6)


# --- all methods ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_identical_inputs_return_the_input(name: str) -> None:
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    params = {"density": 0.5} if "density" in METHODS[name].params.model_fields else {}
    secondaries = [x.clone()][: n_secondaries(name, 1)]  # passthrough copies the base alone
    assert torch.equal(run(name, x.clone(), secondaries, x.clone(), **runnable_params(name, **params)), x)


@pytest.mark.parametrize("name", sorted(n for n, spec in METHODS.items() if spec.needs_reference))
def test_task_vector_methods_explain_a_missing_reference(name: str) -> None:
    with pytest.raises(ScfError, match="needs `reference`, the common ancestor"):
        run(name, [1.0, 2.0], [[3.0, 4.0]], reference=None)
