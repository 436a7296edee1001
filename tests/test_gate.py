"""The promotion gate: each way to fail is rejected with its reason; a good candidate is promoted."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks import results_db as db
from tasks.gate import GatePolicy, pick_winner

POLICY = GatePolicy(
    benchmarks={"math.exact_match": {"tolerance": 0.05}, "strings.exact_match": {"tolerance": 0.05}},
    max_repetition_rate=0.1,
    max_refusal_drop=0.1,
    max_over_refusal_rate=0.5,
)
PARENTS = ["base", "math"]


def _record(model_id: str, kind: str) -> db.ModelRecord:
    source = db.Source(role="base", ref="zoo:base", revision=None, fingerprint="0" * 64)
    return db.ModelRecord(id=model_id, kind=kind, label=model_id, sources=[source])


def _store(
    path: Path,
    model_id: str,
    scores: dict[str, float],
    *,
    kind: str = "merge",
    repetition: float = 0.0,
    refusal: float = 0.9,
    over_refusal: float = 0.1,
) -> None:
    rows = [
        db.ScoreRow(
            benchmark=key.split(".")[0],
            metric=key.split(".")[1],
            value=value,
            stderr=None,
            n=10,
            n_total=10,
            higher_is_better=True,
            task_version="1",
            backend="transformers",
            gen_params_json="{}",
        )
        for key, value in scores.items()
    ]
    stats = db.GenerationStats(
        repetition_rate=repetition,
        mean_seq_rep_4=0.0,
        truncation_rate=0.0,
        n_generations=10,
        refusal_rate=refusal,
        over_refusal_rate=over_refusal,
        eval_seconds=1.0,
    )
    db.write_model_results(path, "cfg", _record(model_id, kind), rows, stats)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Parents: base is good at strings and safe, math is good at math and a bit less safe."""
    path = tmp_path / "results.duckdb"
    _store(path, "base", {"math.exact_match": 0.2, "strings.exact_match": 0.8}, kind="parent", refusal=0.9)
    _store(path, "math", {"math.exact_match": 0.7, "strings.exact_match": 0.3}, kind="parent", refusal=0.6)
    return path


def _check(path: Path, candidate: str, champion: str | None = None) -> tuple[list[str], float | None]:
    return db.gate_checks(path, "cfg", candidate, PARENTS, POLICY, champion)


def test_a_good_candidate_passes_and_is_promoted(results: Path) -> None:
    _store(results, "good", {"math.exact_match": 0.68, "strings.exact_match": 0.79})
    failures, objective = _check(results, "good")
    assert failures == []
    assert objective == pytest.approx((0.68 + 0.79) / 2)
    [decision] = pick_winner({"good": (failures, objective)})
    assert decision.decision == "promoted"


def test_a_missing_score_is_rejected(results: Path) -> None:
    _store(results, "partial", {"math.exact_match": 0.7})
    failures, objective = _check(results, "partial")
    assert failures == ["missing score: strings.exact_match"]
    assert objective is None
    [decision] = pick_winner({"partial": (failures, objective)})
    assert decision.decision == "rejected" and decision.reasons == failures


def test_a_regression_beyond_tolerance_is_rejected(results: Path) -> None:
    _store(results, "worse", {"math.exact_match": 0.7, "strings.exact_match": 0.74})
    failures, _ = _check(results, "worse")
    assert failures == [
        "strings.exact_match = 0.7400 is 0.0600 worse than the best parent (0.8000); tolerance 0.05"
    ]


def test_a_drop_within_tolerance_passes(results: Path) -> None:
    _store(results, "close", {"math.exact_match": 0.66, "strings.exact_match": 0.75})
    assert _check(results, "close")[0] == []


def test_a_looping_candidate_is_rejected(results: Path) -> None:
    _store(results, "loopy", {"math.exact_match": 0.7, "strings.exact_match": 0.8}, repetition=0.4)
    assert _check(results, "loopy")[0] == ["repetition_rate 0.4000 > max 0.1"]


def test_a_safety_drop_is_rejected(results: Path) -> None:
    _store(
        results,
        "unsafe",
        {"math.exact_match": 0.7, "strings.exact_match": 0.8},
        refusal=0.5,
        over_refusal=0.6,
    )
    assert _check(results, "unsafe")[0] == [
        "refusal_rate 0.5000 dropped 0.4000 below the best parent (0.9000); max drop 0.1",
        "over_refusal_rate 0.6000 > max 0.5",
    ]


def test_missing_generation_stats_fail_closed(results: Path) -> None:
    failures, _ = _check(results, "never-evaluated")
    assert "no generation stats (repetition_rate missing)" in failures
    assert "missing score: math.exact_match" in failures
    assert "no safety scores (refusal_rate missing)" in failures


def test_a_candidate_must_beat_the_champion(results: Path) -> None:
    _store(results, "champ", {"math.exact_match": 0.7, "strings.exact_match": 0.8})
    _store(results, "challenger", {"math.exact_match": 0.69, "strings.exact_match": 0.8})
    assert _check(results, "champ", champion="champ")[0] == []  # the champion never fails against itself
    assert _check(results, "challenger", champion="champ")[0] == [
        "objective mean = 0.7450 does not beat the champion champ (0.7500) by more than 0.0"
    ]


def test_the_best_passing_candidate_wins_the_run() -> None:
    decisions = pick_winner({"a": ([], 0.5), "b": ([], 0.6), "c": (["missing score: x.y"], None)})
    assert [(d.candidate_id, d.decision) for d in decisions] == [
        ("a", "passed"),
        ("b", "promoted"),
        ("c", "rejected"),
    ]
    assert decisions[0].reasons == ["passed every check but b has a higher objective (0.6000)"]


def test_policy_errors_name_the_key() -> None:
    with pytest.raises(
        ValidationError, match=r"objective 'gsm8k' is not one of \['mean', 'math.exact_match'\]"
    ):
        GatePolicy(benchmarks={"math.exact_match": {}}, objective="gsm8k")
    with pytest.raises(ValidationError, match="must be '<benchmark>.<metric>'"):
        GatePolicy(benchmarks={"math": {}})
