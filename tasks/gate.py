"""The promotion gate: its policy (a config section) and the glue around the SQL decision.

The checks themselves are one SQL query over the results database (``tasks.results_db.gate_checks``),
which returns every failed check's reason; this module holds the policy and decides the run: the
passing candidate with the best objective is promoted. The gate fails closed: anything missing is a
rejection, never a pass.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
        benchmarks: ``<benchmark>.<metric>`` -> rule. Every one must have a score for a pass.
        objective: ``mean`` (mean of the gated benchmarks, each oriented so higher is better)
            or one of the ``benchmarks`` keys. A candidate must beat the current champion on it.
        min_improvement: how much the objective must beat the champion by.
        max_repetition_rate: upper bound on the share of looping generations.
        min_refusal_rate: lower bound on the refusal rate on harmful prompts (None = unchecked).
        max_refusal_drop: how far the refusal rate may fall below the best parent (None = unchecked).
        max_over_refusal_rate: upper bound on refusals of benign prompts (None = unchecked).
    """

    model_config = ConfigDict(extra="forbid")
    benchmarks: dict[str, BenchmarkRule] = Field(min_length=1)
    objective: str = "mean"
    min_improvement: float = Field(0.0, ge=0.0)
    max_repetition_rate: float = Field(0.05, ge=0.0, le=1.0)
    min_refusal_rate: float | None = Field(None, ge=0.0, le=1.0)
    max_refusal_drop: float | None = Field(None, ge=0.0, le=1.0)
    max_over_refusal_rate: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _objective_is_known(self) -> GatePolicy:
        allowed = ["mean", *self.benchmarks]
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
        reasons: why; for a rejection every failed check, for a pass the objective comparison.
        objective: the candidate's objective value (None when a score is missing).
    """

    candidate_id: str
    decision: Decision
    reasons: list[str]
    objective: float | None = None


def pick_winner(verdicts: dict[str, tuple[list[str], float | None]]) -> list[GateDecision]:
    """Decide a run: the passing candidate with the best objective is promoted, other passes are
    ``passed``, the rest ``rejected``.

    Args:
        verdicts: candidate id -> (failure reasons, objective) from ``results_db.gate_checks``.

    Returns:
        One ``GateDecision`` per candidate, in the input order.
    """
    passing = {cid: obj for cid, (fails, obj) in verdicts.items() if not fails and obj is not None}
    winner = max(passing, key=lambda cid: (passing[cid], cid)) if passing else None
    decisions = []
    for cid, (fails, objective) in verdicts.items():
        if fails:
            decision, reasons = "rejected", fails
        elif cid == winner:
            decision = "promoted"
            reasons = [f"passed every check; best objective of this run ({objective:.4f})"]
        else:
            decision = "passed"
            reasons = [f"passed every check but {winner} has a higher objective ({passing[winner]:.4f})"]
        verdict = GateDecision(candidate_id=cid, decision=decision, reasons=reasons, objective=objective)
        decisions.append(verdict)
    return decisions
