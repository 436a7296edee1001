"""MLflow tracking: the one place that names MLflow metrics, params and the registry alias.

Layout: one experiment per pipeline config (its ``name``), one parent run per flow run, one nested
run per evaluated model (merged candidates and their parents). Promotion registers the merged model
by reference to its directory (no upload of the weights) and moves the registered model's
``champion`` alias to it.

Every call goes through an explicit ``MlflowClient`` (no global active run), so concurrent Prefect
task threads never share state.
"""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from evals.spec import COMPARE_DECISION, COMPARE_PREFIX, REFUSAL_RATE, REPETITION_RATE
from tasks.errors import PipelineError

CHAMPION_ALIAS = "champion"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag for nesting runs
# Metric names: the generation figures are named once, in evals.spec (GENERATION_METRICS); the merge
# and timing figures here. They are also the generation_stats columns of DuckDB.
SPARSITY, MERGE_SECONDS, EVAL_SECONDS = "sparsity", "merge_seconds", "eval_seconds"
MERGE_METRICS = (SPARSITY, MERGE_SECONDS)
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
# The experiment's kind, as MLflow 3's UI stores it (the experiment page's "type" selector writes this tag):
# "custom_model_development" (shown as "Machine learning") is the kind whose home is the runs view, not
# the GenAI overview of traces. MLflow 3.17's UI also follows a per-browser workflow type, which the
# links below set with ``?workflowType=machine_learning``.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RUNS_VIEW_QUERY = "workflowType=machine_learning"
DECISION_CODES = {"rejected": 0, "passed": 1, "promoted": 2}  # compare.decision (a metric is a number)
LEADERBOARD_TABLE = "leaderboard.json"  # the parent run's table artifact (mlflow.log_table)


def client(uri: str) -> MlflowClient:
    """An MLflow client for a tracking URI.

    A local sqlite store is opened under a file lock beside the database: opening a new (or older)
    database runs MLflow's schema migrations, and two nights starting at once on one file would both
    run them, the second failing with alembic's "expected to match one row".
    """
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return MlflowClient(tracking_uri=uri)


def registered_model_name(config_name: str) -> str:
    """The registry entry for a config's champions."""
    return f"scf-{config_name}"


def experiment_id(uri: str, config_name: str, artifact_root: Path) -> str:
    """Get or create the config's experiment.

    Args:
        uri: tracking URI.
        config_name: the experiment name.
        artifact_root: where a new local experiment keeps artifacts (ignored for an existing one, and
            left to the server when the URI is a server).

    Returns:
        The experiment id.
    """
    mlflow = client(uri)
    found = mlflow.get_experiment_by_name(config_name)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # one made before the tag existed
            mlflow.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    location = None if uri.startswith(("http://", "https://", "databricks")) else Path(artifact_root).as_uri()
    try:
        return mlflow.create_experiment(
            config_name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except MlflowException:  # created meanwhile by a concurrent run
        return mlflow.get_experiment_by_name(config_name).experiment_id


def start_run(
    uri: str,
    exp_id: str,
    name: str,
    *,
    parent_run_id: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Start a run (nested under ``parent_run_id`` when given) and log its params.

    Args:
        uri: tracking URI.
        exp_id: experiment id.
        name: the run name shown in the UI.
        parent_run_id: the flow run's MLflow run, for nested runs.
        params: flat params; values that are not strings are stored as canonical JSON.
        tags: extra tags.

    Returns:
        The run id.
    """
    mlflow = client(uri)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    run = mlflow.create_run(exp_id, run_name=name, tags=all_tags)
    if params:
        mlflow.log_batch(run.info.run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])
    return run.info.run_id


def model_metrics(
    eval_metrics: dict[str, float],
    merge_report: dict | None,
    eval_seconds: float,
    gated: tuple[str, ...] | list[str] = (),
) -> dict[str, float]:
    """All metrics of one evaluated model under their stable names.

    Args:
        eval_metrics: ``EvalReport.metrics()`` (``<benchmark>.<metric>`` and generation figures).
        merge_report: the candidate's ``merge_report.json`` (None for parents).
        eval_seconds: evaluation wall time.
        gated: the gate's benchmark keys; they, the repetition and refusal rates and the sparsity are
            logged once more as ``compare.<name>`` (see ``evals.spec.COMPARE_PREFIX``).

    Returns:
        name -> value.
    """
    metrics = dict(eval_metrics)
    metrics[EVAL_SECONDS] = eval_seconds
    if merge_report is not None:
        metrics[SPARSITY] = merge_report["totals"]["sparsity"]
        metrics[MERGE_SECONDS] = merge_report["timings"]["total_seconds"]
    if gated:
        compared = [*gated, REPETITION_RATE, REFUSAL_RATE, SPARSITY]
        metrics.update({compare_name(key): metrics[key] for key in compared if key in metrics})
    return metrics


def compare_name(key: str) -> str:
    """The name a compared figure is logged under a second time: ``compare.<key>``."""
    return f"{COMPARE_PREFIX}{key}"


def log_decision(uri: str, run_id: str, decision: str) -> None:
    """The gate's verdict on a model's run: the ``gate.decision`` tag and the ``compare.decision`` metric."""
    mlflow = client(uri)
    mlflow.set_tag(run_id, "gate.decision", decision)
    mlflow.log_metric(run_id, compare_name(COMPARE_DECISION), DECISION_CODES[decision])


def log_leaderboard(uri: str, run_id: str, entries: list[dict]) -> None:
    """The night's leaderboard as a table artifact of its parent run (``mlflow.log_table``).

    Args:
        uri: tracking URI.
        run_id: the flow run's MLflow run.
        entries: ``results_db.leaderboard`` of the night: one row per model, a column per score
            (and its delta vs the parents' mean), the rates, the decision and the failure.
    """
    keys = sorted({key for entry in entries for key in entry["scores"]})
    rows = []
    for entry in entries:
        row = {"model": entry["label"], "id": entry["id"], "kind": entry["kind"]}
        for key in keys:
            row[key] = entry["scores"].get(key)
            row[f"{key} delta"] = entry["deltas"].get(key) if entry["kind"] == "merge" else None
        row.update({key: entry[key] for key in ("repetition_rate", "refusal_rate", "over_refusal_rate")})
        row["decision"] = "failed" if entry["status"] == "failed" else entry["decision"] or entry["kind"]
        row["reasons"] = "; ".join(entry["reasons"]) or entry["failure"] or ""
        rows.append(row)
    columns = {name: [row[name] for row in rows] for name in (rows[0] if rows else {"model": None})}
    client(uri).log_table(run_id, data=columns, artifact_file=LEADERBOARD_TABLE)


def runs_view_url(ui_url: str, exp_id: str) -> str:
    """The MLflow UI address of an experiment's runs view (not the GenAI overview)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{exp_id}/runs?{RUNS_VIEW_QUERY}"


def log_model_run(
    uri: str,
    exp_id: str,
    parent_run_id: str,
    name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    artifacts: list[Path],
    tags: dict[str, str],
    status: str = "FINISHED",
) -> str:
    """Log one evaluated model as a finished run nested under the flow's run.

    Args:
        uri: tracking URI.
        exp_id: experiment id.
        parent_run_id: the flow run's MLflow run.
        name: run name (the candidate label, or ``parent:<role>``).
        params: method, params, sources, eval settings.
        metrics: from ``model_metrics``.
        artifacts: files to attach (merge report, merge config, samples, eval report).
        tags: e.g. ``candidate_id``, ``kind``, ``decision``.
        status: the run's final status (``FAILED`` for a model whose merge or evaluation failed).

    Returns:
        The nested run id.
    """
    mlflow = client(uri)
    run_id = start_run(uri, exp_id, name, parent_run_id=parent_run_id, params=params, tags=tags)
    stamp = int(time.time() * 1000)
    mlflow.log_batch(run_id, metrics=[Metric(key, float(value), stamp, 0) for key, value in metrics.items()])
    for path in artifacts:
        if Path(path).exists():
            mlflow.log_artifact(run_id, str(path))
    mlflow.set_terminated(run_id, status)
    return run_id


def log_artifacts(uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    """Attach files to a run (plots, the resolved config)."""
    mlflow = client(uri)
    for path in paths:
        mlflow.log_artifact(run_id, str(path), artifact_path=artifact_path)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Set tags on a run (e.g. the gate decision once it is known)."""
    mlflow = client(uri)
    for key, value in tags.items():
        mlflow.set_tag(run_id, key, value)


def finish_run(uri: str, run_id: str, *, failed: bool = False) -> None:
    """Mark a run finished (or failed)."""
    status = RunStatus.FAILED if failed else RunStatus.FINISHED
    client(uri).set_terminated(run_id, RunStatus.to_string(status))


def promote(uri: str, config_name: str, model_path: Path, run_id: str, candidate_id: str) -> str:
    """Register a merged model by reference to its directory and move the ``champion`` alias to it.

    A model already registered from the same directory is reused, so promoting twice adds no version.

    Args:
        uri: tracking URI.
        config_name: the pipeline config's name (the registered model is ``scf-<name>``).
        model_path: the merged model's directory (kept on disk; not uploaded).
        run_id: the candidate's MLflow run.
        candidate_id: stored as a version tag.

    Returns:
        The registered model version now holding the alias.
    """
    mlflow = client(uri)
    name = registered_model_name(config_name)
    source = str(Path(model_path).resolve())
    try:
        mlflow.get_registered_model(name)
    except MlflowException:
        mlflow.create_registered_model(name, description="Champions of the scf-pipeline gate")
    existing = [v for v in mlflow.search_model_versions(f"name = '{name}'") if v.source == source]
    if existing:
        version = existing[0].version
    else:
        created = mlflow.create_model_version(
            name, source=source, run_id=run_id, tags={"candidate_id": candidate_id}
        )
        version = created.version
    mlflow.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    return str(version)


def move_champion_alias(uri: str, config_name: str, candidate_id: str) -> str:
    """Point the ``champion`` alias at the registered version of ``candidate_id`` (a rollback).

    Returns:
        The version now holding the alias.

    Raises:
        PipelineError: the candidate has no registered version (it was never promoted).
    """
    mlflow = client(uri)
    name = registered_model_name(config_name)
    try:
        versions = mlflow.search_model_versions(f"name = '{name}'")
    except MlflowException as err:
        raise PipelineError(f"MLflow has no registered model {name!r}: {err}") from None
    mine = [v for v in versions if v.tags.get("candidate_id") == candidate_id]
    if not mine:
        raise PipelineError(f"{candidate_id} has no registered version of {name!r} in MLflow ({uri})")
    version = max(mine, key=lambda v: int(v.version)).version
    mlflow.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    return str(version)


def champion_source(uri: str, config_name: str) -> str | None:
    """Where the registered champion's weights are, or None when there is no champion."""
    try:
        return (
            client(uri).get_model_version_by_alias(registered_model_name(config_name), CHAMPION_ALIAS).source
        )
    except MlflowException:
        return None


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this tracking store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if len(text) > MAX_PARAM_LENGTH:
        raise PipelineError(f"MLflow param value too long ({len(text)} > {MAX_PARAM_LENGTH}): {text[:80]}...")
    return text
