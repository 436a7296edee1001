"""The ``nightly`` flow: every candidate of a config, then compare and promote.

Merges run one at a time (memory and disk are the limits; on CUDA they also take the ``gpu``
concurrency slot) while evaluations of finished merges run concurrently, up to the config's
``concurrency``. Then the gate judges every candidate against the current champion, the best
passing one is promoted, and merged models that lost are deleted unless ``keep_candidates``.

Run it with no server: ``scf nightly --config configs/demo.yaml``; on a schedule through the
``nightly`` deployment in ``prefect.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.futures import PrefectFuture

from flows.merge_eval import (
    CandidatePlan,
    ModelResult,
    RunContext,
    decide,
    evaluate_parents,
    finish,
    merge,
    record_result,
    select,
    start,
    submit_evaluation,
)
from tasks import steps, tracking


def _run_name() -> str:
    return f"nightly-{Path(runtime.flow_run.parameters['config_path']).stem}"


@flow(name="nightly", flow_run_name=_run_name)
def nightly(
    config_path: str, keep_candidates: bool | None = None, concurrency: int | None = None
) -> dict[str, Any]:
    """Merge and evaluate every candidate of a pipeline config, gate them, promote the best.

    Args:
        config_path: the pipeline YAML (e.g. ``configs/demo.yaml``).
        keep_candidates: override the config's ``keep_candidates``.
        concurrency: override the config's ``concurrency`` (evaluations at once).

    Returns:
        The run summary: stores, champion, and per candidate its decision, reasons and what was cached.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    ctx = start(config_path, "nightly", keep_candidates=keep_candidates, concurrency=concurrency)
    try:
        plans = select(ctx, None)
        logger.info("%d candidates: %s", len(plans), ", ".join(plan.label for plan in plans))
        parents = evaluate_parents(ctx)
        results = [record_result(ctx, result) for result in _merge_and_evaluate_all(ctx, plans)]
        decisions = decide(ctx, results)
        summary = finish(ctx, [*parents, *results], decisions)
    except BaseException:
        tracking.finish_run(ctx.config.mlflow_uri, ctx.mlflow_run_id, failed=True)
        raise
    logger.info("nightly %s finished in %s", ctx.config.name, steps.elapsed(started))
    return summary


def _merge_and_evaluate_all(ctx: RunContext, plans: list[CandidatePlan]) -> list[ModelResult]:
    """Merge one candidate at a time; evaluate finished merges concurrently (bounded)."""
    running: list[tuple[CandidatePlan, Any, dict[str, bool], PrefectFuture]] = []
    done: list[ModelResult] = []
    for plan in plans:
        outcome, merge_cached, eval_cached = merge(ctx, plan)
        cached = {"merge": merge_cached, "eval": eval_cached}
        while len(running) >= ctx.config.concurrency:  # bound the evaluations in flight
            done.append(_collect(running.pop(0)))
        running.append((plan, outcome, cached, submit_evaluation(ctx, plan)))
    done.extend(_collect(job) for job in running)
    return done


def _collect(job: tuple[CandidatePlan, Any, dict[str, bool], PrefectFuture]) -> ModelResult:
    plan, outcome, cached, future = job
    return ModelResult(plan.record, future.result(), outcome.report, cached=cached)
