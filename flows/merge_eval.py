"""The ``merge_and_evaluate`` flow (one candidate) and the steps it shares with ``nightly``.

One candidate: resolve sources -> evaluate the parents (cached across candidates and runs) -> merge
(cached) -> evaluate (cached) -> log to MLflow -> write DuckDB -> gate -> promote. Every merge and
evaluation runs in a child process (``tasks.child``) with a timeout, under the machine's GPU lock;
every cached step is keyed by content, so a rerun picks up where the last one stopped. A candidate
whose merge or evaluation fails is recorded ``failed`` and rejected with the reason; a parent that
cannot be evaluated fails the run (nothing can be gated without it).

The same flow is what ``nightly`` runs on each worker in pool mode (``store=False``): it then merges
and evaluates one candidate (or evaluates one ``parent``) and leaves the results in the shared result
storage, writing neither DuckDB nor the gate.

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
from prefect.states import Failed, State

from evals.spec import EvalReport
from scf.spec import MergeSpec
from tasks import plots, results_db, steps, tracking
from tasks.config import (
    REQUEST_NAME,
    ZOO_PREFIX,
    Candidate,
    EvalChoice,
    MethodName,
    PipelineConfig,
    Sources,
    Storage,
    candidate_id,
    parent_id,
    request_config,
)
from tasks.errors import NightFailed, PipelineError, StepFailed
from tasks.gate import GateDecision, GatePolicy


@dataclass
class RunContext:
    """What every step of one flow run needs: the config, resolved sources and the stores."""

    config: PipelineConfig
    sources: dict[str, results_db.Source]
    exp_id: str | None
    mlflow_run_id: str | None
    flow_run_id: str | None
    storage: Any  # the Prefect result storage block (the cache; shared by a pool)

    @property
    def db_path(self) -> str:
        return str(self.config.duckdb_path)

    def step_settings(self, step: str) -> steps.StepSettings:
        """Timeout, GPU lock and log directory of this run's merges or evaluations."""
        section = self.config.merge if step == "merge" else self.config.eval
        return steps.StepSettings(
            timeout_s=section.timeout_s,
            gpu_lock=self.config.execution.gpu_lock,
            log_dir=str(self.config.workdir / "logs"),
        )


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


@dataclass(frozen=True)
class ParentPlan:
    """One parent model to evaluate: its role, record, content identity and evaluation cache key."""

    role: str
    record: results_db.ModelRecord
    eval_key: str
    identity: str  # what its evaluations' cache keys hash: the source fingerprint

    @property
    def label(self) -> str:
        return self.record.label


@dataclass
class ModelResult:
    """A model (parent or candidate) of this run: evaluated, or failed with a reason."""

    record: results_db.ModelRecord
    report: EvalReport | None = None
    merge_report: dict | None = None
    failure: StepFailed | None = None
    mlflow_run_id: str | None = None
    cached: dict[str, bool] = field(default_factory=dict)
    stopped: list[str] | None = None  # racing: why it was stopped early ("stopped at 25%: ...")

    @property
    def failed(self) -> bool:
        return self.failure is not None


def start(config: PipelineConfig, run_kind: str, origin: str, *, tracked: bool = True) -> RunContext:
    """Resolve the sources of a validated config and (when ``tracked``) open this flow run's MLflow run.

    Args:
        config: the run's config (``tasks.config.request_config``: validated before any work).
        run_kind: ``nightly`` or ``merge-and-evaluate`` (the MLflow run name prefix).
        origin: where the config came from (its path, or ``run parameters``), an MLflow param.
        tracked: open the MLflow experiment and run (pool runs leave tracking to the night).

    Returns:
        The run context.
    """
    steps.load_secrets(config.secrets)  # before anything reaches the hub or MLflow
    refs = {**config.sources.parents()}
    if config.sources.reference is not None:
        refs["reference"] = config.sources.reference
    resolved = steps.resolve_sources(refs, config.zoo)
    flow_run_id = runtime.flow_run.id
    storage = steps.result_storage(config)
    if not tracked:
        return RunContext(config, resolved, None, None, flow_run_id, storage)
    uri = config.mlflow_uri
    exp_id = tracking.experiment_id(uri, config.name, config.workdir / "mlartifacts")
    params = {"config_path": origin, "config_name": config.name, "prefect_flow_run": flow_run_id}
    mlflow_run_id = tracking.start_run(
        uri,
        exp_id,
        f"{run_kind}-{config.name}",
        params=params,
        tags={"prefect_flow_run_id": str(flow_run_id)},
    )
    resolved_file = steps.write_resolved_config(config, config.workdir / "artifacts" / "pipeline_config.yaml")
    tracking.log_artifacts(uri, mlflow_run_id, [resolved_file])
    return RunContext(config, resolved, exp_id, mlflow_run_id, flow_run_id, storage)


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
        tokenizer_source=_tokenizer_source(config, ctx.sources),
        **{**config.merge.engine_settings(), **({} if candidate.seed is None else {"seed": candidate.seed})},
    )
    out = config.models_dir / cid
    record = results_db.ModelRecord(
        id=cid,
        kind="merge",
        label=candidate.label,
        method=candidate.method,
        params=candidate.params,
        sources=list(ctx.sources.values()),
        path=str(out),
    )
    merge_key = steps.merge_key(cid, config.merge.report_settings())
    return CandidatePlan(candidate, cid, spec, out, merge_key, steps.eval_key(cid, config.eval), record)


def _tokenizer_source(config: PipelineConfig, sources: dict[str, results_db.Source]) -> str | None:
    """``merge.tokenizer_source`` as ``MergeSpec`` takes it: ``base``, ``union``, or the resolved path
    of the source the config names."""
    choice, role = config.merge.tokenizer_source, config.tokenizer_role()
    if role is None or role == "base":  # unset, "union", or the base (as its role or its source)
        return "base" if role == "base" else choice
    return sources[role].path


def plan_parents(ctx: RunContext) -> list[ParentPlan]:
    """The parents (base and secondaries) to evaluate, in config order."""
    plans = []
    for role in ctx.config.sources.parents():
        source = ctx.sources[role]
        record = results_db.ModelRecord(
            id=parent_id(source.fingerprint),
            kind="parent",
            label=_parent_label(source),
            sources=[source],
            path=source.path,
        )
        key = steps.eval_key(source.fingerprint, ctx.config.eval)
        plans.append(ParentPlan(role, record, key, source.fingerprint))
    return plans


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


def _parent_label(source: results_db.Source) -> str:
    """``base=math``: the role and the model's short name (no colons: log consoles read ``:x:`` as emoji)."""
    name = source.ref.removeprefix(ZOO_PREFIX).split("@")[0].rstrip("/").split("/")[-1]
    return f"{source.role}={name}"


# ------------------------------------------------------------------------------ running the steps


def submit_parent_evaluation(ctx: RunContext, plan: ParentPlan) -> PrefectFuture:
    """Start evaluating a parent (cached by its fingerprint and the eval spec)."""
    task = steps.bind(steps.evaluate_model, ctx.storage)
    settings = ctx.step_settings("evaluate")
    return task.submit(plan.record.path, ctx.config.eval.spec(), plan.label, plan.eval_key, settings,
                       plan.record.id)


def evaluate_parents(ctx: RunContext) -> list[ModelResult]:
    """Evaluate base and secondaries (``concurrency`` at once, cached across runs).

    Raises:
        NightFailed: a parent could not be evaluated (nothing can be gated without it).
    """
    if ctx.config.eval.racing is not None:  # in the candidates' stages: identical conditions per item
        plans = plan_parents(ctx)
        entries = [Staged(ModelResult(p.record), p.record.path, p.identity, p.label) for p in plans]
        for plan, entry in zip(plans, evaluate_in_stages(ctx, entries, judged=False), strict=True):
            if entry.result.failed:
                raise parent_failed(plan, entry.result.failure)
            # stored now: the candidates' stages are judged against the parents' samples
            steps.store_results(ctx.db_path, ctx.config.name, plan.label, plan.record, entry.result.report,
                                None, str(ctx.flow_run_id))
        return [entry.result for entry in entries]
    jobs: list[tuple[ParentPlan, PrefectFuture, bool]] = []
    for plan in plan_parents(ctx):
        if len(jobs) >= ctx.config.concurrency:  # at most `concurrency` evaluations in flight
            jobs[-ctx.config.concurrency][1].wait()
        cached = steps.is_cached(ctx.storage, plan.eval_key)
        jobs.append((plan, submit_parent_evaluation(ctx, plan), cached))
    results = []
    for plan, future, cached in jobs:
        report, failure = outcome(future, "evaluate", plan.label)
        if failure is not None:
            raise parent_failed(plan, failure)
        results.append(ModelResult(plan.record, report, cached={"eval": cached}))
    return results


def parent_failed(plan: ParentPlan, failure: StepFailed) -> NightFailed:
    """The error that ends a run whose parent could not be evaluated."""
    return NightFailed(f"parent {plan.label} could not be evaluated, so nothing can be gated: {failure}")


def outcome(future_or_state: Any, step: str, label: str) -> tuple[Any, StepFailed | None]:
    """A finished task's value, or why it failed (any failure: a raised error, a crash, a timeout).

    Returns:
        ``(value, None)`` or ``(None, failure)``.
    """
    state: State = future_or_state if isinstance(future_or_state, State) else _final(future_or_state)
    if state.is_completed():
        return state.result(), None
    error = state.result(raise_on_failure=False)
    if isinstance(error, StepFailed):
        return None, error
    if isinstance(error, BaseException):
        first = (str(error).strip().splitlines() or [""])[0]
        return None, StepFailed(step, label, f"{type(error).__name__}: {first}".rstrip(": "))
    return None, StepFailed(step, label, f"ended {state.name}: {state.message or 'no message'}")


def _final(future: PrefectFuture) -> State:
    future.wait()
    return future.state


def merge(ctx: RunContext, plan: CandidatePlan) -> tuple[State, bool, bool]:
    """Merge one candidate (in a child process), unless a finished result can be reused.

    A cached merge whose directory was deleted (it lost an earlier gate) is only reused when its
    evaluation is cached too; otherwise it is merged again (``refresh_cache``) so that evaluation
    never looks for a model that is gone.

    Returns:
        (the merge task's final state, whether it was skipped as cached, whether the evaluation is
        cached).
    """
    eval_cached = steps.is_cached(ctx.storage, plan.eval_key)
    refresh = not plan.out.exists() and not eval_cached
    task = steps.bind(steps.merge_candidate, ctx.storage).with_options(refresh_cache=refresh)
    state: State = task(
        plan.spec, str(plan.out), plan.label, plan.merge_key, ctx.step_settings("merge"), plan.id,
        return_state=True,
    )
    merge_cached = state.name == "Cached"
    if merge_cached:
        get_run_logger().info("merge %s (%s): cached, not recomputed", plan.label, plan.id)
    return state, merge_cached, eval_cached


def submit_evaluation(ctx: RunContext, plan: CandidatePlan) -> PrefectFuture:
    """Start evaluating a merged candidate (cached by content)."""
    task = steps.bind(steps.evaluate_model, ctx.storage)
    settings = ctx.step_settings("evaluate")
    return task.submit(str(plan.out), ctx.config.eval.spec(), plan.label, plan.eval_key, settings, plan.id)


def run_candidates_here(ctx: RunContext, plans: list[CandidatePlan]) -> list[ModelResult]:
    """Merge one candidate at a time; evaluate finished merges concurrently (``concurrency``).

    A candidate whose merge or evaluation fails comes back with its failure; the others go on.
    With ``eval.racing``, every merge comes first, then the stages (`evaluate_in_stages`).
    """
    if ctx.config.eval.racing is not None:
        return _race(ctx, plans)
    running: list[tuple[CandidatePlan, dict, dict[str, bool], PrefectFuture]] = []
    done: list[ModelResult] = []
    for plan in plans:
        state, merge_cached, eval_cached = merge(ctx, plan)
        cached = {"merge": merge_cached, "eval": eval_cached}
        merged, failure = outcome(state, "merge", plan.label)
        if failure is not None:
            done.append(ModelResult(plan.record, failure=failure, cached=cached))
            continue
        while len(running) >= ctx.config.concurrency:  # bound the evaluations in flight
            done.append(_collect(running.pop(0)))
        running.append((plan, merged.report, cached, submit_evaluation(ctx, plan)))
    done.extend(_collect(job) for job in running)
    order = {plan.id: i for i, plan in enumerate(plans)}
    return sorted(done, key=lambda result: order[result.record.id])


def _race(ctx: RunContext, plans: list[CandidatePlan]) -> list[ModelResult]:
    """Merge every candidate, then evaluate them stage by stage, stopping the hopeless ones."""
    entries = []
    for plan in plans:
        state, merge_cached, _ = merge(ctx, plan)
        merged, failure = outcome(state, "merge", plan.label)
        result = ModelResult(plan.record, merge_report=merged.report if merged else None, failure=failure,
                             cached={"merge": merge_cached})
        entries.append(Staged(result, str(plan.out), plan.id, plan.label))
    return [entry.result for entry in evaluate_in_stages(ctx, entries, judged=True)]


@dataclass
class Staged:
    """A model being evaluated in stages: its result so far, where it is, what its keys hash."""

    result: ModelResult
    path: str
    identity: str
    label: str
    reports: list[EvalReport] = field(default_factory=list)


def stage_specs(ctx: RunContext) -> list[tuple[float, Any]]:
    """(share reached, eval spec) of each racing stage."""
    from evals.stages import stage_slices

    spec = ctx.config.eval.spec()
    stages = ctx.config.eval.racing.stages
    return [(share, spec.model_copy(update={"items": items}))
            for share, items in zip(stages, stage_slices(stages), strict=True)]


def evaluate_in_stages(ctx: RunContext, entries: list[Staged], *, judged: bool) -> list[Staged]:
    """Evaluate models stage by stage (``concurrency`` at once, each stage cached by its own key).

    After every stage but the last, each candidate (``judged``) is stored with its results so far and
    judged on them; one the gate already proves fails (an interval wholly on the failing side of
    a rule) is stopped there, its reasons prefixed with ``stopped at <share>``.

    Returns:
        ``entries``, their results filled in (the stages' reports combined) or failed or stopped.
    """
    from evals.stages import combine_reports

    stages = stage_specs(ctx)
    settings = ctx.step_settings("evaluate")
    task = steps.bind(steps.evaluate_model, ctx.storage)
    for number, (share, spec) in enumerate(stages, start=1):
        active = [e for e in entries if not e.result.failed and e.result.stopped is None]
        futures: list[tuple[Staged, PrefectFuture, bool]] = []
        for entry in active:
            if len(futures) >= ctx.config.concurrency:
                futures[-ctx.config.concurrency][1].wait()
            key = steps.eval_key(entry.identity, spec)
            cached = steps.is_cached(ctx.storage, key)
            futures.append((entry, task.submit(entry.path, spec, entry.label, key, settings,
                                               entry.result.record.id), cached))
        for entry, future, cached in futures:
            report, failure = outcome(future, "evaluate", f"{entry.label} (stage {number})")
            entry.result.cached["eval"] = entry.result.cached.get("eval", True) and cached
            if failure is not None:
                entry.result.failure = failure
                continue
            entry.reports.append(report)
            entry.result.report = combine_reports(entry.reports)
        if judged and number < len(stages):
            _stop_hopeless(ctx, [e for e, _, _ in futures if not e.result.failed], share)
    return entries


def _stop_hopeless(ctx: RunContext, entries: list[Staged], share: float) -> None:
    """Store each candidate's results so far and stop those the gate already proves fail."""
    config = ctx.config
    parents = {plan.record.id: plan.label for plan in plan_parents(ctx)}
    for entry in entries:
        result = entry.result
        steps.store_results(ctx.db_path, config.name, result.record.label, result.record, result.report,
                            result.merge_report, str(ctx.flow_run_id))
        hopeless = steps.hopeless(ctx.db_path, config.name, result.record.id, parents, config.gate)
        if hopeless:
            result.stopped = [f"stopped at {share:.0%}: {reason}" for reason in hopeless]
            get_run_logger().info("racing: %s stopped at %.0f%% (%s)", entry.label, 100 * share,
                                  "; ".join(hopeless))


def _collect(job: tuple[CandidatePlan, dict, dict[str, bool], PrefectFuture]) -> ModelResult:
    plan, merge_report, cached, future = job
    report, failure = outcome(future, "evaluate", plan.label)
    return ModelResult(plan.record, report, merge_report, failure=failure, cached=cached)


# ------------------------------------------------------------------------------ recording, gating


def record_result(ctx: RunContext, result: ModelResult) -> ModelResult:
    """Log a model to MLflow (a nested run) and store it in DuckDB: its scores, or its failure."""
    config = ctx.config
    record = result.record
    run_id = str(ctx.flow_run_id)
    if result.failed:
        get_run_logger().warning("%s failed: %s", record.label, result.failure)
        result.mlflow_run_id = steps.log_failure(
            config.mlflow_uri, ctx.exp_id, ctx.mlflow_run_id, record.label, record, str(result.failure),
            result.failure.tail, str(config.workdir / "artifacts" / record.id),
        )
        steps.store_failure(ctx.db_path, config.name, record.label, record, str(result.failure), run_id)
        return result
    result.mlflow_run_id = steps.log_model(
        config.mlflow_uri,
        ctx.exp_id,
        ctx.mlflow_run_id,
        record.label,
        record,
        result.report,
        result.merge_report,
        str(config.workdir / "artifacts" / record.id),
        tuple(config.gate.benchmarks),
    )
    steps.store_results(
        ctx.db_path, config.name, record.label, record, result.report, result.merge_report, run_id
    )
    if result.cached.get("eval"):
        get_run_logger().info("evaluate %s: cached, not recomputed", record.label)
    return result


def decide(ctx: RunContext, results: list[ModelResult]) -> list[GateDecision]:
    """Gate this run's candidates, promote the winner, store the decisions, delete the losers' weights.

    A failed candidate is rejected with ``failed: <step> of <label>: <reason>``; the others are judged
    by the gate as usual.

    Returns:
        One decision per candidate, in the order of ``results``.
    """
    config = ctx.config
    logger = get_run_logger()
    by_id = {result.record.id: result for result in results}
    judged = [result.record.id for result in results if not result.failed and result.stopped is None]
    parents = {plan.record.id: plan.label for plan in plan_parents(ctx)}
    verdicts = steps.gate(ctx.db_path, config.name, judged, parents, config.gate) if judged else []
    settled = [  # failed, or stopped early by racing: rejected without a final gate
        GateDecision(candidate_id=r.record.id, decision="rejected",
                     reasons=[f"failed: {r.failure}"] if r.failed else r.stopped)
        for r in results
        if r.failed or r.stopped is not None
    ]
    decisions = sorted([*verdicts, *settled], key=lambda d: list(by_id).index(d.candidate_id))
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
        tracking.log_decision(config.mlflow_uri, result.mlflow_run_id, verdict.decision)
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
    """Plot the sweep, close the MLflow run, publish the verdict as a Prefect artifact, summarise.

    Returns:
        A JSON-able summary: stores, champion and one entry per candidate (failures included).
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
    tracking.log_leaderboard(config.mlflow_uri, ctx.mlflow_run_id, entries)
    tracking.finish_run(config.mlflow_uri, ctx.mlflow_run_id)
    verdicts = {d.candidate_id: d for d in decisions}
    champion = results_db.champion(Path(ctx.db_path), config.name)
    summary = {
        "config": config.name,
        "workdir": str(config.workdir),
        "duckdb": ctx.db_path,
        "mlflow_uri": config.mlflow_uri,
        "mlflow_run_id": ctx.mlflow_run_id,
        "mlflow_experiment_id": ctx.exp_id,
        "flow_run_id": str(ctx.flow_run_id),
        "champion": champion["candidate_id"] if champion else None,
        "promoted": next((d.candidate_id for d in decisions if d.decision == "promoted"), None),
        "candidates": [
            {
                "id": r.record.id,
                "label": r.record.label,
                "status": "failed" if r.failed else "ok",
                "failure": str(r.failure) if r.failed else None,
                "decision": verdicts[r.record.id].decision,
                "reasons": verdicts[r.record.id].reasons,
                "merge_cached": r.cached.get("merge", False),
                "eval_cached": r.cached.get("eval", False),
            }
            for r in results
            if r.record.id in verdicts
        ],
    }
    steps.publish_verdict(summary)
    return summary


def judge(ctx: RunContext, parents: list[ModelResult], candidates: list[ModelResult]) -> dict[str, Any]:
    """Record every model, gate the candidates, promote, and summarise the run.

    Raises:
        NightFailed: every candidate failed, so none could be judged (after everything is recorded).
    """
    recorded = [record_result(ctx, result) for result in [*parents, *candidates]]
    candidates = recorded[len(parents) :]
    decisions = decide(ctx, candidates)
    summary = finish(ctx, recorded, decisions)
    steps.notify(ctx.config, summary)
    if candidates and all(result.failed for result in candidates):
        listing = "; ".join(str(result.failure) for result in candidates)
        raise NightFailed(f"no candidate could be judged: all {len(candidates)} failed ({listing})",
                          notified=True)
    return summary


# ------------------------------------------------------------------------------------------ flow


def _run_name() -> str:
    """``merge-and-evaluate-<config or method>[-<candidate>]``."""
    parameters = runtime.flow_run.parameters
    base = parameters.get("config_path")
    what = Path(base).stem if base else (parameters.get("name") or REQUEST_NAME)
    candidate = parameters.get("candidate") or parameters.get("parent") or parameters.get("method")
    return f"merge-and-evaluate-{what}" + (f"-{candidate}" if candidate else "")


@flow(name="merge-and-evaluate", flow_run_name=_run_name)
def merge_and_evaluate(
    config_path: str | None = None,
    sources: Sources | None = None,
    method: MethodName | None = None,
    params: dict[str, Any] | None = None,
    evaluation: EvalChoice | None = None,
    gate: GatePolicy | None = None,
    gate_config: str | None = None,
    name: str | None = None,
    storage: Storage | None = None,
    candidate: str | None = None,
    keep_candidates: bool | None = None,
    store: bool = True,
    parent: str | None = None,
) -> Any:
    """Merge and evaluate one candidate, then gate it against the champion.

    The candidate is one of a config's (``config_path`` and ``candidate``), or the one this run's
    parameters describe (``sources``, ``method``, ``params``, ``evaluation``, ``gate`` or
    ``gate_config``), on top of ``config_path`` when one is given. The whole request is validated
    (``tasks.config.request_config``) before any work.

    Args:
        config_path: a pipeline YAML on the worker (e.g. ``configs/demo.yaml``): the config, or the
            base the other fields override. Leave it empty to describe the whole run here.
        sources: the models: base, one or more secondaries, and the reference (common ancestor) that
            task-vector methods need. Each is a hub id (``org/model@revision``), a local path or
            ``zoo:<model>``.
        method: the merge method (one of the registry's).
        params: the method's parameters, e.g. ``{"alpha": 1.2}``; unset ones take its defaults.
        evaluation: the suite, and at most how many items per benchmark and tokens per answer.
        gate: the promotion gate's policy (benchmarks and tolerances, confidence, limits).
        gate_config: or a config whose gate to use: a path, or a name in ``configs/`` (``demo``).
        name: the run's config name: its MLflow experiment and DuckDB rows (default: the config's,
            or ``on-demand``).
        storage: where results go (workdir, MLflow URI, DuckDB file); default the config's.
        candidate: the config's candidate by label (``scf_rkl-alpha=1.5``) or id (prefix); may be left
            out when there is exactly one candidate (or ``method`` is given).
        keep_candidates: keep the merged model even when it loses the gate (default: the config's).
        store: log, store and gate (the default). ``False`` (what ``nightly`` asks of pool workers):
            only merge and evaluate, leaving the results in the shared result storage.
        parent: with ``store=False``, evaluate this parent (``base``, ``secondary_0``, ...) instead of
            a candidate.

    Returns:
        The run summary (see ``finish``); with ``store=False``, the model's id and cache keys, or a
        Failed state whose message says which step failed and how.
    """
    request = {"sources": sources, "method": method, "params": params, "evaluation": evaluation,
               "gate": gate, "gate_config": gate_config, "name": name, "storage": storage}
    if method is not None and candidate is not None:
        raise PipelineError("give candidate (one of the config's) or method (a new one), not both")
    if not store:
        return _merge_and_evaluate_for_pool(config_path, candidate, parent, sources)
    started = time.perf_counter()
    config = request_config(config_path, keep_candidates=keep_candidates, **request)
    ctx = start(config, "merge-and-evaluate", str(config_path or "run parameters"))
    try:
        [plan] = _one(select(ctx, candidate), candidate)
        parents = evaluate_parents(ctx)
        [result] = run_candidates_here(ctx, [plan])
        summary = judge(ctx, parents, [result])
    except BaseException:
        tracking.finish_run(ctx.config.mlflow_uri, ctx.mlflow_run_id, failed=True)
        raise
    get_run_logger().info("merge-and-evaluate %s finished in %s", plan.label, steps.elapsed(started))
    return summary


def _merge_and_evaluate_for_pool(
    config_path: str | None, candidate: str | None, parent: str | None, sources: Sources | None
) -> dict[str, str] | State:
    """A pool worker's part of a night: one model merged and evaluated, results left in storage."""
    if config_path is None:
        raise PipelineError("store=False (a pool run of a night) needs the night's config_path")
    ctx = start(request_config(config_path, sources=sources), "pool", config_path, tracked=False)
    if parent is not None:
        plans = {plan.role: plan for plan in plan_parents(ctx)}
        if parent not in plans:
            raise PipelineError(f"parent {parent!r} is not one of {', '.join(plans)}")
        _, failure = outcome(submit_parent_evaluation(ctx, plans[parent]), "evaluate", plans[parent].label)
        if failure is not None:
            return Failed(message=str(failure))
        return {"model": plans[parent].record.id, "eval_key": plans[parent].eval_key}
    [plan] = _one(select(ctx, candidate), candidate)
    [result] = run_candidates_here(ctx, [plan])
    if result.failed:
        return Failed(message=str(result.failure))
    return {"model": plan.id, "merge_key": plan.merge_key, "eval_key": plan.eval_key}


def _one(plans: list[CandidatePlan], wanted: str | None) -> list[CandidatePlan]:
    if len(plans) != 1:
        labels = ", ".join(plan.label for plan in plans)
        raise PipelineError(
            f"the config defines {len(plans)} candidates; pick one with --candidate: {labels}"
        )
    return plans
