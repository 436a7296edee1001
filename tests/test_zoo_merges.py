"""The toy zoo is fit for merging: merges of its models behave like merges of real fine-tunes.

The specialists are small fine-tuning deltas on a well-trained common ancestor (``base``), the regime
in which weight-space merging works, so merges of them are far from zero and the methods disagree.
On the session's `tiny` zoo (seed 0), merging ``math`` (base) with ``strings`` (secondary), reference
``base``, 40 samples per benchmark:

- SCF-RKL at alpha 0.5 keeps a good part of the math parent's skill and picks up strings skill the
  math parent lacks (seeds 0, 1, 2: strings +0.60, +0.55, +0.62 over the math parent);
- dense task-vector merges (task arithmetic, TIES) pick up far less strings skill (at most 0.28);
- every merge keeps some skill and no two methods score the same.

The math-kept figure depends on how much math the base already knows: base 0.67 / 0.51 / 0.19 on
seeds 0 / 1 / 2 gave SCF-RKL (alpha 0.5) math 0.62 / 0.30 / 0.05; the session zoo is seed 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evals.spec import EvalSpec
from evals.suites import evaluate
from scf.merge import merge
from scf.spec import MergeSpec

LIMIT = 40  # samples per benchmark: enough to tell 0.1 from 0.6, about a second per model
MATH, STRINGS = "toy_math.exact_match", "toy_strings.exact_match"
METHODS = {
    "scf_rkl": {"alpha": 0.5},
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.5},
}


def _scores(model_dir: Path) -> dict[str, float]:
    spec = EvalSpec(suite="toy", device="cpu", limit=LIMIT, keep_samples=False)
    return evaluate(model_dir, spec, progress=False).metrics()


@pytest.fixture(scope="module")
def scores(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, float]]:
    """Toy-suite metrics of the math parent and of math + strings merged by each method."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only competes for a shared CPU
    try:
        root = tmp_path_factory.mktemp("zoo-merges")
        result = {"math": _scores(tiny_zoo / "math")}
        for method, params in METHODS.items():
            spec = MergeSpec(base=str(tiny_zoo / "math"), secondary=[str(tiny_zoo / "strings")],
                             reference=str(tiny_zoo / "base"), method=method, params=params, device="cpu")
            merge(spec, root / method, progress=False)
            result[method] = _scores(root / method)
        return result
    finally:
        torch.set_num_threads(previous)


def test_scf_rkl_keeps_the_base_parent_and_gains_the_secondary_skill(scores):
    parent, fused = scores["math"], scores["scf_rkl"]
    assert parent[STRINGS] <= 0.1, scores  # the math specialist has lost strings: the merge must bring it
    assert fused[STRINGS] >= parent[STRINGS] + 0.35, scores
    assert fused[MATH] >= 0.4 * parent[MATH], scores
    assert fused["repetition_rate"] <= 0.1, scores


def test_dense_task_vector_merges_gain_less_of_the_secondary_skill(scores):
    for method in ("task_arithmetic", "ties"):
        assert scores[method][STRINGS] <= scores["scf_rkl"][STRINGS] - 0.2, (method, scores)


def test_merges_keep_skill_and_methods_differ(scores):
    for method in METHODS:
        assert scores[method][MATH] + scores[method][STRINGS] >= 0.4, (method, scores)
    outcomes = {(scores[method][MATH], scores[method][STRINGS]) for method in METHODS}
    assert len(outcomes) == len(METHODS), scores
