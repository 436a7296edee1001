"""The ``merge_and_evaluate`` flow (one candidate) and the steps it shares with ``nightly``.

One candidate: resolve sources -> evaluate the parents (cached across candidates and runs) -> merge
(cached) -> evaluate (cached) -> log to MLflow -> write DuckDB -> gate -> promote. Every cached step
is keyed by content, so a rerun after a crash picks up where the last one stopped.

Run it with no server (Prefect starts a temporary local one) or against a server
(``PREFECT_API_URL``): ``scf run --config configs/demo.yaml --candidate scf_rkl-alpha=1.5``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.futures import PrefectFuture
from prefect.states import State

from evals.spec import EvalReport
from scf.spec import MergeSpec
from tasks import plots, results_db, steps, tracking
from tasks.config import ZOO_PREFIX, Candidate, PipelineConfig, candidate_id, load_config, parent_id
from tasks.errors import PipelineError
from tasks.gate import GateDecision


@dataclass
class RunContext:
    """What every step of one flow run needs: the config, resolved sources and the stores."""

    config: PipelineConfig
    sources: dict[str, results_db.Source]
    exp_id: str
    mlflow_run_id: str
    flow_run_id: str | None
    storage: Any  # the saved Prefect result storage block of the workdir

    @property
    def db_path(self) -> str:
        return str(self.config.duckdb_path)

    @property
    def parent_ids(self) -> list[str]:
        return [parent_id(self.sources[role].fingerprint) for role in self.config.sources.parents()]


@dataclass
class CandidatePlan:
    """One candidate of this run: its content id, merge spec, output directory and cache keys."""

    candidate: Candidate
    id: str
    spec: MergeSpec
    out: Path
    merge_key: str
    eval_key: str
    record: results_db.ModelRecord

    @property
    def label(self) -> str:
        return self.candidate.label


@dataclass
class ModelResult:
    """An evaluated model (parent or candidate), what was cached, and where it was logged."""

    record: results_db.ModelRecord
    report: EvalReport
    merge_report: dict | None = None
    mlflow_run_id: str | None = None
    cached: dict[str, bool] = field(default_factory=dict)


def start(config_path: str, run_kind: str, **overrides: Any) -> RunContext:
    """Load the config, resolve the sources, open the MLflow experiment and this flow run's parent run.

    Args:
        config_path: the pipeline YAML.
        run_kind: ``nightly`` or ``merge-and-evaluate`` (the MLflow run name prefix).
        **overrides: top-level config keys to replace.

    Returns:
        The run context.
    """
    config = load_config(config_path, **overrides)
    refs = {**config.sources.parents()}
    if config.sources.reference is not None:
        refs["reference"] = config.sources.reference
    sources = steps.resolve_sources(refs, config.zoo)
    uri = config.mlflow_uri
    exp_id = tracking.experiment_id(uri, config.name, config.workdir / "mlartifacts")
    flow_run_id = runtime.flow_run.id
    params = {
        "config_path": str(config_path),
        "config_name": config.name,
        "prefect_flow_run": flow_run_id or "none",
    }
    mlflow_run_id = tracking.start_run(
        uri,
        exp_id,
        f"{run_kind}-{config.name}",
        params=params,
        tags={"prefect_flow_run_id": str(flow_run_id)},
    )
    resolved = steps.write_resolved_config(config, config.workdir / "artifacts" / "pipeline_config.yaml")
    tracking.log_artifacts(uri, mlflow_run_id, [resolved])
    storage = steps.result_storage(config.workdir)
    return RunContext(config, sources, exp_id, mlflow_run_id, flow_run_id, storage)


def plan_candidate(ctx: RunContext, candidate: Candidate) -> CandidatePlan:
    """Fix a candidate's id, merge spec, output directory and cache keys."""
    config = ctx.config
    fingerprints = {role: source.fingerprint for role, source in ctx.sources.items()}
    cid = candidate_id(fingerprints, candidate, config.merge)
    secondaries = [ctx.sources[role] for role in config.sources.parents() if role.startswith("secondary")]
    reference = ctx.sources.get("reference")
    spec = MergeSpec(
        base=ctx.sources["base"].path,
        secondary=[source.path for source in secondaries],
        reference=reference.path if reference else None,
        method=candidate.method,
        params=candidate.params,
        **config.merge.model_dump(),
    )
    out = config.workdir / "candidates" / cid
    record = results_db.ModelRecord(
        id=cid,
        kind="merge",
        label=candidate.label,
        method=candidate.method,
        params=candidate.params,
        sources=list(ctx.sources.values()),
        path=str(out),
    )
    return CandidatePlan(
        candidate, cid, spec, out, steps.merge_key(cid), steps.eval_key(cid, config.eval), record
    )


def select(ctx: RunContext, wanted: str | None) -> list[CandidatePlan]:
    """The candidates to run: all of them, or the one whose label or id (prefix) is ``wanted``."""
    plans = [plan_candidate(ctx, candidate) for candidate in ctx.config.expand()]
    if wanted is None:
        return plans
    chosen = [plan for plan in plans if wanted in (plan.label, plan.id) or plan.id.startswith(wanted)]
    if len(chosen) != 1:
        listing = ", ".join(f"{plan.label} ({plan.id})" for plan in plans)
        raise PipelineError(
            f"--candidate {wanted!r} matches {len(chosen)} candidates; choose one of: {listing}"
        )
    return chosen


def evaluate_parents(ctx: RunContext) -> list[ModelResult]:
    """Evaluate base and secondaries (``concurrency`` at once, cached across runs); log and store them."""
    config = ctx.config
    jobs = []
    for role in config.sources.parents():
        source = ctx.sources[role]
        record = results_db.ModelRecord(
            id=parent_id(source.fingerprint),
            kind="parent",
            label=_parent_label(source),
            sources=[source],
            path=source.path,
        )
        key = steps.eval_key(source.fingerprint, config.eval)
        cached = steps.is_cached(ctx.storage, key)
        if len(jobs) >= config.concurrency:  # at most `concurrency` evaluations in flight
            jobs[-config.concurrency][1].wait()
        evaluate = steps.bind(steps.evaluate_model, ctx.storage)
        future = evaluate.submit(source.path, config.eval, record.label, key)
        jobs.append((record, future, cached))
    return [
        record_result(ctx, ModelResult(record, future.result(), cached={"eval": cached}))
        for record, future, cached in jobs
    ]


def _parent_label(source: results_db.Source) -> str:
    """``base=math``: the role and the model's short name (no colons: log consoles read ``:x:`` as emoji)."""
    name = source.ref.removeprefix(ZOO_PREFIX).rstrip("/").split("/")[-1]
    return f"{source.role}={name}"


def merge(ctx: RunContext, plan: CandidatePlan) -> tuple[steps.MergeOutcome, bool, bool]:
    """Merge one candidate, unless a finished result can be reused.

    A cached merge whose directory was deleted (it lost an earlier gate) is only reused when its
    evaluation is cached too; otherwise it is merged again (``refresh_cache``) so that evaluation
    never looks for a model that is gone.

    Returns:
        (the outcome, whether the merge was skipped as cached, whether the evaluation is cached).
    """
    logger = get_run_logger()
    eval_cached = steps.is_cached(ctx.storage, plan.eval_key)
    refresh = not plan.out.exists() and not eval_cached
    task = steps.bind(steps.merge_candidate, ctx.storage).with_options(refresh_cache=refresh)
    state: State = task(plan.spec, str(plan.out), plan.label, plan.merge_key, return_state=True)
    outcome = state.result()
    merge_cached = state.name == "Cached"
    if merge_cached:
        logger.info("merge %s (%s): cached, not recomputed", plan.label, plan.id)
    return outcome, merge_cached, eval_cached


def submit_evaluation(ctx: RunContext, plan: CandidatePlan) -> PrefectFuture:
    """Start evaluating a merged candidate (cached by content)."""
    task = steps.bind(steps.evaluate_model, ctx.storage)
    return task.submit(str(plan.out), ctx.config.eval, plan.label, plan.eval_key)


def record_result(ctx: RunContext, result: ModelResult) -> ModelResult:
    """Log an evaluated model to MLflow (nested run) and store its rows in DuckDB."""
    config = ctx.config
    record = result.record
    artifact_dir = str(config.workdir / "artifacts" / record.id)
    result.mlflow_run_id = steps.log_model(
        config.mlflow_uri,
        ctx.exp_id,
        ctx.mlflow_run_id,
        record.label,
        record,
        result.report,
        result.merge_report,
        artifact_dir,
    )
    steps.store_results(
        ctx.db_path,
        config.name,
        record.label,
        record,
        result.report,
        result.merge_report,
        str(ctx.flow_run_id),
    )
    if result.cached.get("eval"):
        get_run_logger().info("evaluate %s: cached, not recomputed", record.label)
    return result


def decide(ctx: RunContext, results: list[ModelResult]) -> list[GateDecision]:
    """Gate this run's candidates, promote the winner, store the decisions, delete the losers' weights.

    Returns:
        One decision per candidate.
    """
    config = ctx.config
    logger = get_run_logger()
    by_id = {result.record.id: result for result in results}
    decisions = steps.gate(ctx.db_path, config.name, list(by_id), ctx.parent_ids, config.gate)
    promoted = next((d for d in decisions if d.decision == "promoted"), None)
    champion_path = None
    if promoted is not None:
        winner = by_id[promoted.candidate_id]
        champion_path = winner.record.path
        version = steps.promote(
            config.mlflow_uri, config.name, champion_path, winner.mlflow_run_id, winner.record.id
        )
        logger.info(
            "promoted %s (%s) -> %s version %s, alias %s",
            winner.record.label,
            winner.record.id,
            tracking.registered_model_name(config.name),
            version,
            tracking.CHAMPION_ALIAS,
        )
    steps.record_decisions(ctx.db_path, config.name, decisions, str(ctx.flow_run_id), champion_path)
    for verdict in decisions:
        result = by_id[verdict.candidate_id]
        tracking.set_tags(config.mlflow_uri, result.mlflow_run_id, {"gate.decision": verdict.decision})
        logger.info("gate %s: %s; %s", result.record.label, verdict.decision, "; ".join(verdict.reasons))
    _delete_losers(ctx, results)
    return decisions


def _delete_losers(ctx: RunContext, results: list[ModelResult]) -> None:
    if ctx.config.keep_candidates:
        return
    current = results_db.champion(Path(ctx.db_path), ctx.config.name)
    champion_id = current["candidate_id"] if current else None
    for result in results:
        if result.record.id != champion_id and steps.delete_model(result.record.path):
            get_run_logger().info("deleted %s (lost the gate; keep_candidates is false)", result.record.path)


def finish(ctx: RunContext, results: list[ModelResult], decisions: list[GateDecision]) -> dict[str, Any]:
    """Plot the sweep, close the MLflow run and summarise the run for the CLI and the UI.

    Returns:
        A JSON-able summary: stores, champion and one entry per candidate.
    """
    config = ctx.config
    entries = results_db.leaderboard(Path(ctx.db_path), config.name, str(ctx.flow_run_id))
    plot_dir = config.workdir / "plots"
    fractions = {r.record.label: r.merge_report["totals"]["fraction_from"] for r in results if r.merge_report}
    figures = [
        plots.score_deltas(entries, plot_dir / "score_delta_vs_parents.png"),
        plots.repetition_rates(entries, plot_dir / "repetition_rate.png"),
    ]
    if fractions:
        figures.append(plots.parameter_sources(fractions, plot_dir / "parameter_sources.png"))
    tracking.log_artifacts(config.mlflow_uri, ctx.mlflow_run_id, figures, artifact_path="plots")
    tracking.finish_run(config.mlflow_uri, ctx.mlflow_run_id)
    verdicts = {d.candidate_id: d for d in decisions}
    champion = results_db.champion(Path(ctx.db_path), config.name)
    return {
        "config": config.name,
        "workdir": str(config.workdir),
        "duckdb": ctx.db_path,
        "mlflow_uri": config.mlflow_uri,
        "mlflow_run_id": ctx.mlflow_run_id,
        "flow_run_id": str(ctx.flow_run_id),
        "champion": champion["candidate_id"] if champion else None,
        "promoted": next((d.candidate_id for d in decisions if d.decision == "promoted"), None),
        "candidates": [
            {
                "id": r.record.id,
                "label": r.record.label,
                "decision": verdicts[r.record.id].decision,
                "reasons": verdicts[r.record.id].reasons,
                "merge_cached": r.cached.get("merge", False),
                "eval_cached": r.cached.get("eval", False),
            }
            for r in results
            if r.record.id in verdicts
        ],
    }


def _run_name() -> str:
    parameters = runtime.flow_run.parameters
    candidate = parameters.get("candidate")
    return f"merge-and-evaluate-{Path(parameters['config_path']).stem}" + (
        f"-{candidate}" if candidate else ""
    )


@flow(name="merge-and-evaluate", flow_run_name=_run_name)
def merge_and_evaluate(
    config_path: str, candidate: str | None = None, keep_candidates: bool | None = None
) -> dict[str, Any]:
    """Merge and evaluate one candidate of a pipeline config, then gate it against the champion.

    Args:
        config_path: the pipeline YAML (e.g. ``configs/demo.yaml``).
        candidate: the candidate's label (``scf_rkl-alpha=1.5``) or id (prefix); may be left out when
            the config defines exactly one candidate.
        keep_candidates: override the config's ``keep_candidates``.

    Returns:
        The run summary (see ``finish``).
    """
    started = time.perf_counter()
    ctx = start(config_path, "merge-and-evaluate", keep_candidates=keep_candidates)
    try:
        [plan] = _one(select(ctx, candidate), candidate)
        parents = evaluate_parents(ctx)
        outcome, merge_cached, eval_cached = merge(ctx, plan)
        report = submit_evaluation(ctx, plan).result()
        cached = {"merge": merge_cached, "eval": eval_cached}
        result = record_result(ctx, ModelResult(plan.record, report, outcome.report, cached=cached))
        decisions = decide(ctx, [result])
        summary = finish(ctx, [*parents, result], decisions)
    except BaseException:
        tracking.finish_run(ctx.config.mlflow_uri, ctx.mlflow_run_id, failed=True)
        raise
    get_run_logger().info("merge-and-evaluate %s finished in %s", plan.label, steps.elapsed(started))
    return summary


def _one(plans: list[CandidatePlan], wanted: str | None) -> list[CandidatePlan]:
    if len(plans) != 1:
        labels = ", ".join(plan.label for plan in plans)
        raise PipelineError(
            f"the config defines {len(plans)} candidates; pick one with --candidate: {labels}"
        )
    return plans
