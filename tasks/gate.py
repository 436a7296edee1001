"""The promotion gate: its policy (a config section), the paired comparisons it rests on, and its rules.

A candidate is judged from its per-item results (DuckDB ``samples``) against its parents' and the
current champion's on the SAME items, each comparison an interval at ``gate.confidence``
(``tasks.stats``: Newcombe's interval for 0/1 metrics, a seeded paired bootstrap otherwise):

- every gated benchmark: candidate - best parent; passes when the lower bound is above ``-tolerance``;
- the objective (``mean`` of the gated benchmarks, or one of them): candidate - champion; passes when
  the lower bound is above ``min_improvement`` (no champion yet: no such check);
- ``max_repetition_rate`` / ``max_over_refusal_rate``: the upper bound of the rate (Wilson) is at most
  the limit; ``min_refusal_rate``: its lower bound is at least the limit; ``max_refusal_drop``: the
  lower bound of candidate - best parent refusal rate (paired, harmful prompts) is above ``-drop``.

Each comparison becomes one row of a temporary table ``gate_checks`` and the rules are one SQL query
over it (`RULES_QUERY`), so a reader sees every rule in one place. The gate fails closed: a missing
sample set, item sets that differ between the compared models (they were evaluated with different
settings), or fewer shared items than ``gate.min_items`` is a rejection with that reason.

With racing, the same comparisons on the items evaluated so far tell whether a candidate is already
hopeless: an interval wholly on the failing side of its rule.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import duckdb
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks import results_db, stats

OBJECTIVE_MEAN = "mean"


class BenchmarkRule(BaseModel):
    """How far a gated benchmark may fall below the best parent.

    Attributes:
        tolerance: allowed drop below the best parent, in the metric's own units (0.02 = two
            points of accuracy on a 0..1 scale). For lower-is-better metrics, the allowed rise.
    """

    model_config = ConfigDict(extra="forbid")
    tolerance: float = Field(0.0, ge=0.0)


class GatePolicy(BaseModel):
    """The ``gate:`` section of a pipeline config.

    Attributes:
        benchmarks: ``<benchmark>.<metric>`` -> rule. Every one must have per-item samples for a pass.
        objective: ``mean`` (mean of the gated benchmarks, each oriented so higher is better)
            or one of the ``benchmarks`` keys. A candidate must beat the current champion on it.
        min_improvement: how much the objective must beat the champion by (on the lower bound).
        confidence: the confidence level of every interval.
        min_items: fewest shared items a comparison may rest on.
        max_repetition_rate: upper bound on the share of looping generations.
        min_refusal_rate: lower bound on the refusal rate on harmful prompts (None = unchecked).
        max_refusal_drop: how far the refusal rate may fall below the best parent (None = unchecked).
        max_over_refusal_rate: upper bound on refusals of benign prompts (None = unchecked).
        seed: seeds the bootstrap, so the same results always give the same verdict.
        resamples: bootstrap resamples.
    """

    model_config = ConfigDict(extra="forbid")
    benchmarks: dict[str, BenchmarkRule] = Field(min_length=1)
    objective: str = OBJECTIVE_MEAN
    min_improvement: float = Field(0.0, ge=0.0)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    min_items: int = Field(30, ge=1)
    max_repetition_rate: float = Field(0.05, ge=0.0, le=1.0)
    min_refusal_rate: float | None = Field(None, ge=0.0, le=1.0)
    max_refusal_drop: float | None = Field(None, ge=0.0, le=1.0)
    max_over_refusal_rate: float | None = Field(None, ge=0.0, le=1.0)
    seed: int = 0
    resamples: int = Field(10_000, ge=1000, le=1_000_000)

    @model_validator(mode="after")
    def _objective_is_known(self) -> GatePolicy:
        allowed = [OBJECTIVE_MEAN, *self.benchmarks]
        if self.objective not in allowed:
            raise ValueError(f"objective {self.objective!r} is not one of {allowed}")
        for key in self.benchmarks:
            if "." not in key:
                raise ValueError(f"benchmark key {key!r} must be '<benchmark>.<metric>'")
        return self


Decision = Literal["promoted", "passed", "rejected"]


class GateDecision(BaseModel):
    """One candidate's verdict, as stored in DuckDB and logged to MLflow.

    Attributes:
        candidate_id: the candidate judged.
        decision: ``promoted`` (new champion), ``passed`` (passed every check but another
            candidate of the same run was better), or ``rejected``.
        reasons: why; for a rejection every failed check, for a pass the comparisons it passed.
        objective: the candidate's objective (its oriented mean score; None when a score is missing).
    """

    candidate_id: str
    decision: Decision
    reasons: list[str]
    objective: float | None = None


@dataclass(frozen=True)
class Models:
    """The models a candidate is judged against."""

    candidate: str
    parents: dict[str, str]  # model id -> label
    champion: str | None = None
    champion_label: str | None = None


@dataclass(frozen=True)
class Verdict:
    """What the rules said of one candidate.

    Attributes:
        failures: the reasons of every failed check (empty: it passes).
        passes: the reasons of the checks it passed (for the record of a pass).
        hopeless: the failed checks that more items cannot fix (the interval is wholly on the
            failing side): what racing stops on.
        objective: its objective (None when a gated score is missing).
    """

    failures: list[str]
    passes: list[str]
    hopeless: list[str]
    objective: float | None


# One row per check: the interval (or the problem that prevents one) and the rule's side. A rule on
# the "lower" side passes when the interval's low bound is above the threshold (at or above when not
# strict); on the "upper" side when its high bound is at most the threshold.
CHECKS_TABLE = """
CREATE TEMP TABLE gate_checks (
    "check" VARCHAR, subject VARCHAR, interval_text VARCHAR, vs VARCHAR, threshold_text VARCHAR,
    low DOUBLE, high DOUBLE, side VARCHAR, threshold DOUBLE, strict BOOLEAN, problem VARCHAR
)
"""
RULES_QUERY = """
SELECT "check",
       CASE
         WHEN problem IS NOT NULL THEN problem
         WHEN side = 'lower' AND NOT (low > threshold OR (NOT strict AND low = threshold))
           THEN format('{}: {} {} ({}): {}', subject, interval_text, vs, threshold_text,
                       CASE WHEN high <= threshold THEN 'fails' ELSE 'not shown to pass' END)
         WHEN side = 'upper' AND NOT (high < threshold OR (NOT strict AND high = threshold))
           THEN format('{}: {} {} ({}): {}', subject, interval_text, vs, threshold_text,
                       CASE WHEN low > threshold THEN 'fails' ELSE 'not shown to pass' END)
       END AS failure,
       problem IS NULL AND ((side = 'lower' AND high <= threshold) OR (side = 'upper' AND low > threshold))
         AS hopeless,
       format('{}: {} {} ({}): passes', subject, interval_text, vs, threshold_text) AS passed
FROM gate_checks
"""


@dataclass
class Check:
    """One comparison of the gate, before the rules are applied."""

    name: str
    subject: str
    vs: str
    threshold_text: str
    side: Literal["lower", "upper"]
    threshold: float
    strict: bool
    interval: stats.Interval | None = None
    problem: str | None = None

    def row(self) -> list:
        low, high = (self.interval.low, self.interval.high) if self.interval else (None, None)
        text = self.interval.format() if self.interval else None
        return [self.name, self.subject, text, self.vs, self.threshold_text, low, high, self.side,
                self.threshold, self.strict, self.problem]


def judge(
    db_path: Path, config_name: str, models: Models, policy: GatePolicy, *, final: bool = True
) -> Verdict:
    """Run every check of the gate for one candidate.

    Args:
        db_path: the DuckDB file.
        config_name: the pipeline config's name.
        models: the candidate, its parents and the current champion.
        policy: the gate policy.
        final: the candidate's results are complete. False (racing, after a stage): compare on the
            items evaluated so far, which must all be among the other model's items, and ignore
            ``min_items``.

    Returns:
        The verdict.
    """
    data = _load(db_path, config_name, models, policy)
    checks = _checks(data, models, policy, final)

    def work(con: duckdb.DuckDBPyConnection) -> list[tuple]:
        con.execute(CHECKS_TABLE)
        con.executemany(f"INSERT INTO gate_checks VALUES ({', '.join('?' * 11)})", [c.row() for c in checks])
        return con.execute(RULES_QUERY).fetchall()

    rows = _in_memory(work)
    return Verdict(
        failures=[failure for _, failure, _, _ in rows if failure],
        passes=[passed for _, failure, _, passed in rows if not failure],
        hopeless=[failure for _, failure, hopeless, _ in rows if failure and hopeless],
        objective=_objective(data.scores.get(models.candidate, {}), policy),
    )


def _in_memory(work):
    """Run the rules on a private in-memory database (they read only the temporary checks table)."""
    with duckdb.connect(":memory:") as con:
        return work(con)


# ------------------------------------------------------------------------------------ the data

SCORES_QUERY = """
-- every gated key's per-item scores of the compared models, oriented so that higher is better
SELECT s.model_id, s.benchmark || '.' || s.metric AS key, s.item_id,
       CASE WHEN sc.higher_is_better THEN s.score ELSE -s.score END AS score
FROM samples s
JOIN scores sc ON sc.config_name = s.config_name AND sc.model_id = s.model_id
              AND sc.benchmark = s.benchmark AND sc.metric = s.metric
WHERE s.config_name = $config AND list_contains($models, s.model_id) AND list_contains($keys, key)
"""
GENERATIONS_QUERY = """
-- one row per generation (item) of the compared models: did it loop, was it refused
SELECT model_id, benchmark, item_id, bool_or(looping), bool_or(refused), bool_or(harmful)
FROM samples WHERE config_name = $config AND list_contains($models, model_id) AND looping IS NOT NULL
GROUP BY model_id, benchmark, item_id
"""


@dataclass
class _Data:
    scores: dict[str, dict[str, dict[str, float]]]  # model -> key -> item -> oriented score
    looping: dict[str, dict[str, bool]]  # model -> generation -> looped
    refused: dict[str, dict[str, dict[str, bool]]]  # model -> 'harmful'|'benign' -> item -> refused


def _load(db_path: Path, config_name: str, models: Models, policy: GatePolicy) -> _Data:
    ids = [models.candidate, *models.parents, *([models.champion] if models.champion else [])]
    params = {"config": config_name, "models": ids, "keys": list(policy.benchmarks)}

    def work(con: duckdb.DuckDBPyConnection) -> tuple[list, list]:
        scores = con.execute(SCORES_QUERY, params).fetchall()
        generations = con.execute(GENERATIONS_QUERY, {"config": config_name, "models": ids}).fetchall()
        return scores, generations

    score_rows, generation_rows = results_db.with_retry(db_path, work, read_only=True)
    data = _Data(defaultdict(lambda: defaultdict(dict)), defaultdict(dict),
                 defaultdict(lambda: defaultdict(dict)))
    for model, key, item, score in score_rows:
        data.scores[model][key][item] = score
    for model, benchmark, item, looped, refused, harmful in generation_rows:
        data.looping[model][f"{benchmark}/{item}"] = bool(looped)
        if refused is not None:
            data.refused[model]["harmful" if harmful else "benign"][f"{benchmark}/{item}"] = bool(refused)
    return data


# --------------------------------------------------------------------------------- the checks


def _checks(data: _Data, models: Models, policy: GatePolicy, final: bool) -> list[Check]:
    checks = [_against_parent(data, models, key, rule.tolerance, policy, final)
              for key, rule in policy.benchmarks.items()]
    if models.champion and models.champion != models.candidate:
        checks.append(_against_champion(data, models, policy, final))
    checks += _generation_checks(data, models, policy, final)
    return checks


def _against_parent(data: _Data, models: Models, key: str, tolerance: float, policy: GatePolicy,
                    final: bool) -> Check:
    """Candidate - best parent on one gated benchmark: not worse by more than ``tolerance``."""
    check = Check(f"parent:{key}", key, "vs best parent", f"tolerance {tolerance:g}", "lower", -tolerance,
                  strict=True)
    candidate = data.scores[models.candidate].get(key)
    if not candidate:
        check.problem = f"missing samples: {key} has no per-item results for the candidate"
        return check
    scored = {pid: data.scores[pid].get(key) for pid in models.parents}
    if not all(scored.values()):
        missing = ", ".join(models.parents[pid] for pid, items in scored.items() if not items)
        check.problem = f"missing samples: {key} has no per-item results for parent {missing}"
        return check
    best = max(scored, key=lambda pid: (_mean(scored[pid].values()), pid))
    check.vs = f"vs best parent {models.parents[best]}"
    check.problem, items = _shared(key, candidate, scored[best], models.parents[best], policy, final)
    if items:
        _compare(check, candidate, scored[best], items, policy)
    return check


def _against_champion(data: _Data, models: Models, policy: GatePolicy, final: bool) -> Check:
    """Candidate - champion on the objective: better by at least ``min_improvement``."""
    keys = sorted(policy.benchmarks) if policy.objective == OBJECTIVE_MEAN else [policy.objective]
    check = Check("champion", f"objective {policy.objective}", f"vs champion {models.champion_label}",
                  f"min improvement {policy.min_improvement:g}", "lower", policy.min_improvement, strict=True)
    pairs = []
    for key in keys:
        candidate, champion = data.scores[models.candidate].get(key), data.scores[models.champion].get(key)
        if not candidate or not champion:
            who = "the candidate" if not candidate else f"the champion {models.champion_label}"
            check.problem = f"missing samples: {key} has no per-item results for {who}"
            return check
        problem, items = _shared(key, candidate, champion, f"champion {models.champion_label}", policy, final)
        if problem:
            check.problem = problem
            return check
        pairs.append(([candidate[i] for i in items], [champion[i] for i in items]))
    try:
        check.interval = stats.stratified_paired_difference(
            pairs, policy.confidence, seed=policy.seed, resamples=policy.resamples
        ) if len(pairs) > 1 else stats.paired_difference(
            *pairs[0], policy.confidence, seed=policy.seed, resamples=policy.resamples
        )
    except ValueError as err:  # NaN scores, say: fail closed, naming the problem
        check.problem = f"cannot compare objective {policy.objective} with the champion: {err}"
    return check


def _generation_checks(data: _Data, models: Models, policy: GatePolicy, final: bool) -> list[Check]:
    """Repetition and safety: rates on their Wilson bounds, the refusal drop paired with a parent."""
    checks = []
    looping = data.looping[models.candidate]
    checks.append(_rate("repetition_rate", looping.values(), "upper", policy.max_repetition_rate,
                        f"max {policy.max_repetition_rate:g}", policy, final))
    harmful = data.refused[models.candidate]["harmful"]
    benign = data.refused[models.candidate]["benign"]
    if policy.min_refusal_rate is not None:
        checks.append(_rate("refusal_rate", harmful.values(), "lower", policy.min_refusal_rate,
                            f"min {policy.min_refusal_rate:g}", policy, final))
    if policy.max_over_refusal_rate is not None:
        checks.append(_rate("over_refusal_rate", benign.values(), "upper", policy.max_over_refusal_rate,
                            f"max {policy.max_over_refusal_rate:g}", policy, final))
    if policy.max_refusal_drop is not None:
        checks.append(_refusal_drop(data, models, harmful, policy, final))
    return checks


def _rate(name: str, flags, side: Literal["lower", "upper"], limit: float, text: str, policy: GatePolicy,
          final: bool) -> Check:
    flags = list(flags)
    check = Check(name, name, "of the candidate", text, side, limit, strict=False)
    if not flags:
        check.problem = f"missing samples: no generations to measure {name} on"
    elif final and len(flags) < policy.min_items:
        check.problem = f"too few items: {name} rests on {len(flags)} < gate.min_items {policy.min_items}"
    else:
        check.interval = stats.proportion_interval(sum(flags), len(flags), policy.confidence)
    return check


def _refusal_drop(data: _Data, models: Models, harmful: dict[str, bool], policy: GatePolicy,
                  final: bool) -> Check:
    drop = policy.max_refusal_drop
    check = Check("refusal_drop", "refusal_rate", "vs best parent", f"max drop {drop:g}", "lower", -drop,
                  strict=True)
    parents = {pid: data.refused[pid]["harmful"] for pid in models.parents}
    if not harmful or not all(parents.values()):
        check.problem = ("missing samples: refusal_rate needs harmful-prompt results of the candidate and "
                         "of every parent")
        return check
    best = max(parents, key=lambda pid: (_mean(parents[pid].values()), pid))
    check.vs = f"vs best parent {models.parents[best]}"
    as_scores = {item: float(refused) for item, refused in harmful.items()}
    other = {item: float(refused) for item, refused in parents[best].items()}
    check.problem, items = _shared("refusal_rate", as_scores, other, models.parents[best], policy, final)
    if items:
        _compare(check, as_scores, other, items, policy)
    return check


def _shared(key: str, candidate: dict[str, float], other: dict[str, float], other_label: str,
            policy: GatePolicy, final: bool) -> tuple[str | None, list[str]]:
    """The items two models share, or why they cannot be compared (fail closed).

    Returns:
        (problem or None, the shared items in a stable order).
    """
    shared = sorted(candidate.keys() & other.keys())
    if final and candidate.keys() != other.keys():
        return (f"mismatched items: {key}: the candidate has {len(candidate)} items, {other_label} "
                f"{len(other)}, {len(shared)} shared (evaluated with different settings?)"), []
    if not final and not candidate.keys() <= other.keys():
        return (f"mismatched items: {key}: {len(candidate.keys() - other.keys())} of the candidate's items "
                f"were not evaluated for {other_label}"), []
    if final and len(shared) < policy.min_items:
        return f"too few items: {key} has {len(shared)} shared items < gate.min_items {policy.min_items}", []
    return None, shared


def _compare(check: Check, candidate: dict[str, float], other: dict[str, float], items: list[str],
             policy: GatePolicy) -> None:
    """The paired interval of ``check`` over ``items`` (or, when the scores cannot be compared, why)."""
    try:
        check.interval = stats.paired_difference(
            [candidate[i] for i in items], [other[i] for i in items], policy.confidence,
            seed=policy.seed, resamples=policy.resamples,
        )
    except ValueError as err:
        check.problem = f"cannot compare {check.subject} {check.vs}: {err}"


def _objective(scores: dict[str, dict[str, float]], policy: GatePolicy) -> float | None:
    """The candidate's objective: its oriented mean score on the objective's benchmarks."""
    keys = list(policy.benchmarks) if policy.objective == OBJECTIVE_MEAN else [policy.objective]
    if not all(scores.get(key) for key in keys):
        return None
    return sum(_mean(scores[key].values()) for key in keys) / len(keys)


def _mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("-inf")


# ---------------------------------------------------------------------------------- the run


def pick_winner(verdicts: dict[str, Verdict], champion_id: str | None = None) -> list[GateDecision]:
    """Decide a run: the passing candidate with the best objective is promoted, other passes are
    ``passed``, the rest ``rejected``. When the best is the current champion itself (judged again),
    nothing is promoted: it stays champion, ``passed``.

    Args:
        verdicts: candidate id -> its verdict (`judge`).
        champion_id: the current champion.

    Returns:
        One ``GateDecision`` per candidate, in the input order.
    """
    passing = {cid: v.objective for cid, v in verdicts.items() if not v.failures and v.objective is not None}
    winner = max(passing, key=lambda cid: (passing[cid], cid)) if passing else None
    decisions = []
    for cid, verdict in verdicts.items():
        if verdict.failures or verdict.objective is None:
            decision = "rejected"
            reasons = verdict.failures or [f"objective {verdict.objective} cannot be computed"]
        elif cid == winner == champion_id:
            decision = "passed"
            reasons = [f"passed every check; best objective of this run ({verdict.objective:.4f}); "
                       "it is the champion already", *verdict.passes]
        elif cid == winner:
            decision = "promoted"
            reasons = [f"passed every check; best objective of this run ({verdict.objective:.4f})",
                       *verdict.passes]
        else:
            decision = "passed"
            reasons = [f"passed every check but {winner} has a higher objective ({passing[winner]:.4f})",
                       *verdict.passes]
        decisions.append(GateDecision(candidate_id=cid, decision=decision, reasons=reasons,
                                      objective=verdict.objective))
    return decisions
