"""The ``nightly`` flow: every candidate of a config, then compare and promote.

``execution.mode: local`` (the default): on this machine. Merges run one at a time, each in a child
process (memory and disk are the limits; on a GPU they hold the machine's GPU lock), while
evaluations of finished merges run in child processes of their own, up to ``concurrency`` at once.

``execution.mode: pool``: every parent evaluation and every candidate is a run of the
``merge-and-evaluate`` deployment (``tasks.pool``), at most ``execution.max_parallel`` at once, on
whichever worker of ``execution.work_pool`` is free. Workers leave their results in the shared result
storage; this flow alone writes DuckDB, gates and moves the champion. A run that crashed, or whose
worker died, is submitted again (``execution.retries``).

Either way, a candidate that fails is recorded ``failed`` and rejected with its reason while the
others are judged; a parent that cannot be evaluated fails the run.

Run it with no server: ``scf nightly --config configs/demo.yaml``; on a schedule through the
``nightly`` deployment in ``prefect.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, runtime
from prefect.futures import PrefectFuture

from flows.merge_eval import (
    CandidatePlan,
    ModelResult,
    ParentPlan,
    RunContext,
    evaluate_parents,
    judge,
    parent_failed,
    plan_parents,
    run_candidates_here,
    select,
    start,
)
from tasks import steps, tracking
from tasks.config import request_config
from tasks.errors import NightFailed, StepFailed
from tasks.pool import PoolRun, run_on_pool

POOL_POLL_S = 1.0


def _run_name() -> str:
    return f"nightly-{Path(runtime.flow_run.parameters['config_path']).stem}"


@flow(name="nightly", flow_run_name=_run_name)
def nightly(
    config_path: str,
    keep_candidates: bool | None = None,
    concurrency: int | None = None,
    mode: Literal["local", "pool"] | None = None,
    racing: bool | None = None,
) -> dict[str, Any]:
    """Merge and evaluate every candidate of a pipeline config, gate them, promote the best.

    Every field but ``config_path`` overrides the config for this night only (empty: the config's).

    Args:
        config_path: the pipeline YAML on the worker (e.g. ``configs/demo.yaml``).
        keep_candidates: keep every merged model, not only the champion.
        concurrency: local mode: evaluations at once.
        mode: ``local`` (this machine) or ``pool`` (each candidate a run on the config's work pool).
        racing: evaluate in stages and stop candidates already proven to fail (``eval.racing``; on:
            the config's stages, or 25%, 50%, 100%).

    Returns:
        The run summary: stores, champion, and per candidate its status, decision, reasons and what
        was cached.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    config = request_config(
        config_path, keep_candidates=keep_candidates, concurrency=concurrency, mode=mode, racing=racing
    )
    ctx = start(config, "nightly", config_path)
    try:
        plans = select(ctx, None)
        logger.info("%d candidates: %s", len(plans), ", ".join(plan.label for plan in plans))
        if ctx.config.execution.mode == "pool":
            parents, candidates = _run_on_pool(ctx, plans)
        else:
            parents = evaluate_parents(ctx)
            candidates = run_candidates_here(ctx, plans)
        summary = judge(ctx, parents, candidates)
    except BaseException as err:
        tracking.finish_run(ctx.config.mlflow_uri, ctx.mlflow_run_id, failed=True)
        if isinstance(err, NightFailed) and not err.notified:
            steps.notify(ctx.config, None, str(err))
        raise
    failed = [c["label"] for c in summary["candidates"] if c["status"] == "failed"]
    logger.info(
        "nightly %s finished in %s%s", ctx.config.name, steps.elapsed(started),
        f"; failed: {', '.join(failed)}" if failed else "",
    )
    return summary


# ----------------------------------------------------------------------------------------- pool


def _run_on_pool(ctx: RunContext, plans: list[CandidatePlan]) -> tuple[list[ModelResult], list[ModelResult]]:
    """Every parent evaluation and candidate as a pool run (``max_parallel`` at once); their results.

    A model whose results are already in the result storage is not submitted again.

    Raises:
        NightFailed: a parent could not be evaluated.
    """
    jobs: list[tuple[Any, dict[str, Any]]] = [
        (plan, {"parent": plan.role}) for plan in plan_parents(ctx)
    ] + [(plan, {"candidate": plan.label}) for plan in plans]
    futures: dict[str, PrefectFuture | None] = {}
    running: list[PrefectFuture] = []
    for plan, which in jobs:
        if _finished_before(ctx, plan):
            futures[plan.record.id] = None
            continue
        while len(running) >= ctx.config.execution.max_parallel:  # wait for a free slot
            running = [future for future in running if not future.state.is_final()]
            if len(running) >= ctx.config.execution.max_parallel:
                time.sleep(POOL_POLL_S)
        future = _submit(ctx, plan, which)
        futures[plan.record.id] = future
        running.append(future)
    parents, candidates = [], []
    for plan, _ in jobs:
        result = _pool_result(ctx, plan, futures[plan.record.id])
        if isinstance(plan, ParentPlan):
            if result.failed:
                raise parent_failed(plan, result.failure)
            parents.append(result)
        else:
            candidates.append(result)
    return parents, candidates


def _finished_before(ctx: RunContext, plan: CandidatePlan | ParentPlan) -> bool:
    keys = [plan.eval_key] + ([plan.merge_key] if isinstance(plan, CandidatePlan) else [])
    return all(steps.is_cached(ctx.storage, key) for key in keys)


def _submit(ctx: RunContext, plan: CandidatePlan | ParentPlan, which: dict[str, Any]) -> PrefectFuture:
    """Submit one model's pool run (pinned sources, so the worker computes the same ids and keys)."""
    execution = ctx.config.execution
    parameters = {
        "config_path": runtime.flow_run.parameters["config_path"],  # as given: a worker's checkout
        "store": False,
        "sources": _pinned_sources(ctx),
        **which,
    }
    return run_on_pool.submit(
        execution.deployment, parameters, plan.label, execution.work_queue, execution.retries,
        execution.heartbeat_timeout_s,
    )


def _pinned_sources(ctx: RunContext) -> dict[str, Any]:
    """The config's ``sources`` with every hub ref pinned to the revision this night resolved."""

    def pinned(role: str) -> str:
        source = ctx.sources[role]
        return f"{source.ref.split('@')[0]}@{source.revision}" if source.revision else source.ref

    roles = ctx.config.sources.parents()
    return {
        "base": pinned("base"),
        "secondary": [pinned(role) for role in roles if role.startswith("secondary")],
        "reference": pinned("reference") if "reference" in ctx.sources else None,
    }


def _pool_result(
    ctx: RunContext, plan: CandidatePlan | ParentPlan, future: PrefectFuture | None
) -> ModelResult:
    """A model's results, read from the result storage by their cache keys, or its failure."""
    cached = future is None
    step = "evaluate"
    if future is not None:
        run: PoolRun = future.result()
        if not run.ok:
            log = steps.latest_log(ctx.step_settings(step), plan.record.id)
            failure = _as_failure(run.message, plan.label, log)
            return ModelResult(plan.record, failure=failure, cached={"merge": False, "eval": False})
    report = steps.read_result(ctx.storage, plan.eval_key)
    merge_report = None
    if isinstance(plan, CandidatePlan):
        merged = steps.read_result(ctx.storage, plan.merge_key)
        merge_report = merged.report if merged is not None else None
        step = "merge" if merged is None else step
    if report is None or (isinstance(plan, CandidatePlan) and merge_report is None):
        reason = (f"the pool run completed but its {step} result {plan.eval_key[:12]}... is not in the "
                  "result storage: storage.result_storage must be shared by every worker")
        return ModelResult(plan.record, failure=StepFailed(step, plan.label, reason))
    return ModelResult(plan.record, report, merge_report, cached={"merge": cached, "eval": cached})


def _as_failure(message: str, label: str, log: Path | None) -> StepFailed:
    """A pool run's failure message as a StepFailed (``<step> of <label>: <reason>`` when it is one),
    with the last lines of the model's newest step log (in the shared workdir) as its tail."""
    tail = log.read_text(errors="replace").splitlines()[-200:] if log else []
    step, sep, rest = message.partition(" of ")
    if sep and rest.startswith(f"{label}: "):
        return StepFailed(step, label, rest.removeprefix(f"{label}: "), tail, log)
    return StepFailed("pool run", label, message, tail, log)
