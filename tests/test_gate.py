"""The promotion gate decides with confidence, on crafted per-item samples with hand-computed intervals.

Each rule is exercised on 10-item 0/1 benchmarks, where the interval is Newcombe's and can be worked
by hand (tests/test_stats.py pins the interval itself); the reason strings are checked exactly. The
gate fails closed on missing samples, mismatched item sets and too few items.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks import results_db as db
from tasks.gate import GatePolicy, Models, judge, pick_winner

N = 10
POLICY = GatePolicy(
    benchmarks={"math.exact_match": {"tolerance": 0.05}, "strings.exact_match": {"tolerance": 0.05}},
    min_items=N,
    max_repetition_rate=0.5,
    max_refusal_drop=0.3,
    max_over_refusal_rate=0.5,
)
PARENTS = {"base": "base=b", "math": "secondary_0=m"}


def _store(path: Path, model_id: str, correct: dict[str, list[int]], *, kind: str = "merge",
           looping: int = 0, refused: tuple[int, int] = (8, 1), items: range = range(N)) -> None:
    """A model with per-item 0/1 scores per benchmark; ``refused``: (harmful refused of 10, benign of 10)."""
    source = db.Source(role="base", ref="zoo:base", revision=None, fingerprint="0" * 64)
    record = db.ModelRecord(id=model_id, kind=kind, label=model_id, sources=[source])
    scores, samples = [], []
    for key, values in correct.items():
        benchmark, metric = key.split(".")
        scores.append(db.ScoreRow(benchmark=benchmark, metric=metric, value=sum(values) / len(values),
                                  stderr=None, n=len(values), n_total=len(values), higher_is_better=True,
                                  task_version="1", backend="transformers", gen_params_json="{}"))
        samples += [db.SampleRow(benchmark=benchmark, metric=metric, item_id=f"{i}-h", score=v,
                                 looping=j < looping, seq_rep_4=0.0, truncated=False, n_tokens=5)
                    for j, (i, v) in enumerate(zip(items, values, strict=True))]
    for harmful, count in ((True, refused[0]), (False, refused[1])):
        samples += [db.SampleRow(benchmark="safety", metric="refused", item_id=f"{i + 50 * (not harmful)}-s",
                                 score=float(i < count), looping=False, seq_rep_4=0.0, truncated=False,
                                 refused=i < count, harmful=harmful, n_tokens=5) for i in range(N)]
    stats = db.GenerationStats(repetition_rate=looping / (2 * N), mean_seq_rep_4=0.0, truncation_rate=0.0,
                               n_generations=4 * N, eval_seconds=1.0)
    db.write_model_results(path, "cfg", record, scores, stats, samples=samples)


def _ones(k: int, n: int = N) -> list[int]:
    return [1] * k + [0] * (n - k)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Parents: base knows strings (9/10), math knows math (10/10); neither knows both."""
    path = tmp_path / "results.duckdb"
    _store(path, "base", {"math.exact_match": _ones(2), "strings.exact_match": _ones(9)}, kind="parent")
    _store(path, "math", {"math.exact_match": _ones(10), "strings.exact_match": _ones(3)}, kind="parent",
           refused=(6, 1))
    return path


def _judge(path: Path, candidate: str, champion: str | None = None, policy: GatePolicy = POLICY,
           final: bool = True):
    return judge(path, "cfg", Models(candidate, PARENTS, champion, champion), policy, final=final)


def test_a_candidate_equal_to_the_best_parents_is_not_proven_within_tolerance(results: Path) -> None:
    _store(results, "equal", {"math.exact_match": _ones(10), "strings.exact_match": _ones(9)})
    verdict = _judge(results, "equal")
    # Identical answers: Newcombe with b = c = 0 still has a width (10 items prove little).
    # math: a=10, d=0: p1 = p2 = 1, Wilson [0.7225, 1]: low = -sqrt(0 + 0.2775**2) = -0.28.
    assert verdict.failures[0] == (
        "math.exact_match: 0.00 [-0.28, 0.28] vs best parent secondary_0=m (tolerance 0.05): "
        "not shown to pass"
    )
    assert verdict.hopeless == []  # more items could prove it


def test_a_worse_candidate_is_rejected_with_its_interval(results: Path) -> None:
    # math: candidate right on 6 of the 10 the math parent gets: a=6, b=0, c=4, d=0; delta = -0.4.
    # Wilson 6/10 = [0.3127, 0.8318], 10/10 = [0.7225, 1]; a margin (b+d) is 0, so phi = 0:
    # low = -0.4 - sqrt(0.2873**2 + 0**2) = -0.687; high = -0.4 + sqrt(0.2318**2 + 0.2775**2) = -0.038.
    _store(results, "worse", {"math.exact_match": _ones(6), "strings.exact_match": _ones(9)})
    verdict = _judge(results, "worse")
    assert verdict.failures[0] == (
        "math.exact_match: -0.40 [-0.69, -0.04] vs best parent secondary_0=m (tolerance 0.05): "
        "not shown to pass"
    )


def test_a_hopeless_candidate_is_known_to_fail(results: Path) -> None:
    # strings: right on 0 of the 9 base gets: a=0, b=0, c=9, d=1; delta = -0.9, the interval all below -0.05.
    _store(results, "hopeless", {"math.exact_match": _ones(10), "strings.exact_match": _ones(0)})
    verdict = _judge(results, "hopeless")
    [strings] = [f for f in verdict.failures if f.startswith("strings")]
    assert strings.startswith("strings.exact_match: -0.90 [") and strings.endswith(": fails")
    assert verdict.hopeless == [strings]


def test_passing_needs_the_lower_bound_above_minus_tolerance(results: Path) -> None:
    wide = GatePolicy.model_validate({**POLICY.model_dump(), "benchmarks": {
        "math.exact_match": {"tolerance": 0.3}, "strings.exact_match": {"tolerance": 0.3}}})
    _store(results, "equal", {"math.exact_match": _ones(10), "strings.exact_match": _ones(9)})
    verdict = _judge(results, "equal", policy=wide)
    assert verdict.failures == []
    assert verdict.passes[0] == (
        "math.exact_match: 0.00 [-0.28, 0.28] vs best parent secondary_0=m (tolerance 0.3): passes"
    )
    assert verdict.objective == pytest.approx((1.0 + 0.9) / 2)


def test_beating_the_champion_needs_the_lower_bound_above_min_improvement(results: Path) -> None:
    wide = GatePolicy.model_validate({**POLICY.model_dump(), "benchmarks": {
        "math.exact_match": {"tolerance": 1.0}, "strings.exact_match": {"tolerance": 1.0}}})
    _store(results, "champ", {"math.exact_match": _ones(5), "strings.exact_match": _ones(5)})
    _store(results, "better", {"math.exact_match": _ones(6), "strings.exact_match": _ones(6)})
    verdict = _judge(results, "better", champion="champ", policy=wide)
    [champion] = [f for f in verdict.failures if f.startswith("objective")]
    assert champion.startswith("objective mean: 0.10 [") and champion.endswith(
        " vs champion champ (min improvement 0): not shown to pass")
    _store(results, "much", {"math.exact_match": _ones(10), "strings.exact_match": _ones(10)})
    assert _judge(results, "much", champion="champ", policy=wide).failures == []  # +0.5, every item


def test_repetition_and_safety_are_judged_on_their_bounds(results: Path) -> None:
    # 20 of 40 generations loop (every benchmark item; no safety item): Wilson 20/40 = [0.352, 0.648]:
    # centre (0.5 + 1.96**2/80) / (1 + 1.96**2/40) = 0.5, half-width 1.96 * sqrt(0.25/40 + 1.96**2/6400)
    # / 1.096 = 0.148; its upper bound 0.65 > 0.5.
    _store(results, "loops", {"math.exact_match": _ones(10), "strings.exact_match": _ones(9)}, looping=10,
           refused=(1, 9))
    verdict = _judge(results, "loops")
    failures = verdict.failures
    assert "repetition_rate: 0.50 [0.35, 0.65] of the candidate (max 0.5): not shown to pass" in failures
    assert "over_refusal_rate: 0.90 [0.60, 0.98] of the candidate (max 0.5): fails" in failures
    # refusal: 1/10 harmful prompts refused against base's 8/10 (a=1, b=0, c=7, d=2): -0.70; the upper
    # bound -0.27 is above -0.3, so a drop within 0.3 is not excluded either: not shown to pass
    drop = "refusal_rate: -0.70 [-0.87, -0.27] vs best parent base=b (max drop 0.3): not shown to pass"
    assert drop in failures


def test_it_fails_closed_on_missing_samples_mismatched_items_and_too_few_items(results: Path) -> None:
    _store(results, "partial", {"math.exact_match": _ones(10)})
    assert "missing samples: strings.exact_match has no per-item results for the candidate" in (
        _judge(results, "partial").failures)
    _store(results, "shifted", {"math.exact_match": _ones(10), "strings.exact_match": _ones(9)},
           items=range(5, 15))
    assert ("mismatched items: math.exact_match: the candidate has 10 items, secondary_0=m 10, 5 shared "
            "(evaluated with different settings?)") in _judge(results, "shifted").failures
    strict = GatePolicy.model_validate({**POLICY.model_dump(), "min_items": 11})
    _store(results, "equal", {"math.exact_match": _ones(10), "strings.exact_match": _ones(9)})
    assert "too few items: math.exact_match has 10 shared items < gate.min_items 11" in (
        _judge(results, "equal", policy=strict).failures)


def test_racing_compares_on_the_items_evaluated_so_far(results: Path) -> None:
    _store(results, "early", {"math.exact_match": [1] * 4, "strings.exact_match": [0] * 4}, items=range(4))
    verdict = _judge(results, "early", final=False)
    assert [f.split(":")[0] for f in verdict.hopeless] == ["strings.exact_match"]  # 0/4 vs 4/4: proven worse
    assert all("too few items" not in f for f in verdict.failures)  # min_items waits for the last stage


def test_the_best_passing_candidate_is_promoted_and_the_champion_stays_champion() -> None:
    from tasks.gate import Verdict

    good = Verdict(failures=[], passes=["ok"], hopeless=[], objective=0.6)
    better = Verdict(failures=[], passes=["ok"], hopeless=[], objective=0.7)
    bad = Verdict(failures=["x: worse"], passes=[], hopeless=[], objective=0.9)
    decisions = pick_winner({"a": good, "b": better, "c": bad})
    assert [(d.candidate_id, d.decision) for d in decisions] == [("a", "passed"), ("b", "promoted"),
                                                                  ("c", "rejected")]
    assert decisions[2].reasons == ["x: worse"]
    again = pick_winner({"b": better}, champion_id="b")
    assert again[0].decision == "passed" and "it is the champion already" in again[0].reasons[0]


def test_two_nights_keep_both_nights_decisions_and_the_champion_history(results: Path) -> None:
    from tasks.gate import GateDecision

    night = lambda cid, d: [GateDecision(candidate_id=cid, decision=d, reasons=[d], objective=0.5)]  # noqa: E731
    db.write_decisions(results, "cfg", night("a", "promoted"), "run-1", "/models/a")
    db.write_decisions(results, "cfg", night("a", "rejected") + night("b", "promoted"), "run-2", "/models/b")
    counts = db.row_counts(results)
    assert counts["gate_decisions"] == 3
    history = db.champion_history(results, "cfg")
    assert [(h["candidate_id"], h["run_id"], h["until"] is None) for h in history] == [
        ("a", "run-1", False), ("b", "run-2", True)]
    assert history[0]["until"] == history[1]["since"]
    nights = [(n["run_id"], n["n_candidates"], n["promoted"], n["champion_after"])
              for n in db.nights(results, "cfg")]
    assert nights == [("run-1", 1, "a", "a"), ("run-2", 2, "b", "b")]
    restored = db.record_rollback(results, "cfg", "a", "b regressed in production")
    assert (restored["candidate_id"], restored["reason"]) == ("a", "rollback: b regressed in production")
    assert [h["candidate_id"] for h in db.champion_history(results, "cfg")] == ["a", "b", "a"]
    with pytest.raises(Exception, match="never champion"):
        db.record_rollback(results, "cfg", "zzz", "typo")


def test_the_policy_is_validated() -> None:
    with pytest.raises(ValidationError, match="objective 'gsm8k' is not one of"):
        GatePolicy(benchmarks={"math.exact_match": {}}, objective="gsm8k")
    with pytest.raises(ValidationError, match="must be '<benchmark>.<metric>'"):
        GatePolicy(benchmarks={"math": {}})
    with pytest.raises(ValidationError):
        GatePolicy(benchmarks={"math.exact_match": {}}, confidence=1.0)
