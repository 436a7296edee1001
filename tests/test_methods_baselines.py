"""Baselines pinned to hand-computed values (mergekit's definitions and defaults)."""

from __future__ import annotations

import pytest
import torch
from helpers_methods import runnable_params

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
    assert torch.equal(run(name, x.clone(), [x.clone()], x.clone(), **runnable_params(name, **params)), x)


@pytest.mark.parametrize("name", sorted(n for n, spec in METHODS.items() if spec.needs_reference))
def test_task_vector_methods_explain_a_missing_reference(name: str) -> None:
    with pytest.raises(ScfError, match="needs `reference`, the common ancestor"):
        run(name, [1.0, 2.0], [[3.0, 4.0]], reference=None)
