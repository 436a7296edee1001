"""Exact quantiles: bit-identical to torch.quantile up to 2**24 elements, to numpy beyond."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scf.errors import ScfError
from scf.quantile import order_statistics, quantiles

LEVELS = [0.0, 0.25, 0.3, 0.5, 0.75, 0.999, 1.0]


def _sample(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "positive":
        return x.abs_() * 1e-6
    if kind == "ties":
        return torch.randint(-3, 4, shape, generator=g).float()
    if kind == "zeros":  # mostly exact zeros, like importance where weights did not change
        return torch.where(x.abs() < 1.0, 0.0, x.abs())
    if kind == "wide":  # many orders of magnitude, both signs, subnormals
        return x * torch.exp2(torch.randint(-140, 120, shape, generator=g).float())
    return x


@pytest.mark.parametrize("kind", ["normal", "positive", "ties", "zeros", "wide"])
@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (7, 5), (4, 3, 17), (65537,), (600, 500)])
def test_bit_identical_to_torch_quantile(kind: str, shape: tuple[int, ...]) -> None:
    # Levels like 0.3 make torch's float32 positions differ from float64 ones at these sizes,
    # so this also pins torch's position arithmetic, not just the selection.
    x = _sample(kind, shape, seed=sum(shape))
    expected = torch.quantile(x.flatten(), torch.tensor(LEVELS)).tolist()
    assert quantiles(x, LEVELS) == expected


def test_beyond_torch_limit_matches_numpy_exactly() -> None:
    n = 2**24 + 1001  # torch.quantile refuses this
    x = _sample("zeros", (n,), seed=3)
    x[: n // 3] = _sample("positive", (n // 3,), seed=4)
    expected = np.quantile(x.numpy(), [0.25, 0.5, 0.75, 0.9]).tolist()
    assert quantiles(x, [0.25, 0.5, 0.75, 0.9]) == expected


def test_order_statistics_equal_sorted_values() -> None:
    x = _sample("wide", (50_000,), seed=5)
    ranks = [0, 1, 17, 24_999, 25_000, 49_999]
    assert order_statistics(x, ranks) == torch.sort(x).values[ranks].tolist()


def test_negative_zero_and_positive_zero_are_equal_values() -> None:
    x = torch.tensor([-0.0, 0.0, -1.0, 1.0])
    assert quantiles(x, [0.5]) == [0.0]


@pytest.mark.parametrize(
    ("values", "levels", "message"),
    [
        (torch.tensor([1.0, float("nan")]), [0.5], "inf or NaN"),
        (torch.tensor([1.0, float("-inf")]), [0.5], "inf or NaN"),
        (torch.tensor([1.0, 2.0]), [1.5], "outside [0, 1]"),
        (torch.tensor([1.0, 2.0], dtype=torch.float64), [0.5], "float32"),
        (torch.tensor([]), [0.5], "empty"),
    ],
)
def test_bad_input_raises_scf_error(values: torch.Tensor, levels: list[float], message: str) -> None:
    with pytest.raises(ScfError, match=message.replace("[", r"\[")):
        quantiles(values, levels)


def test_order_statistic_rank_out_of_range() -> None:
    with pytest.raises(ScfError, match="rank 3 is out of range for 3 elements"):
        order_statistics(torch.ones(3), [3])
