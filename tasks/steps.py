"""Prefect tasks: thin wrappers over scf/, evals/ and the two stores. Paths and pydantic models go in
and out, never tensors.

Caching is by content. The flow computes each cached step's key (``merge_key`` / ``eval_key``: sha256
of canonical JSON of the step, the inputs' fingerprints, method, params, eval spec and library
versions) and passes it as the ``cache_key`` argument; ``cache_key_fn`` returns it. Results are
persisted under ``<workdir>/prefect-results`` (see ``result_storage``), so a second run with nothing new
skips finished merges and evaluations, across flow runs and after a crash.

Retries go on the IO steps only (resolving/downloading sources, MLflow, DuckDB), and never retry
bad input (``ScfError``, ``EvalError``, ``PipelineError``): those fail at once with their message.

GPU steps hold the Prefect global concurrency limit ``gpu`` (one slot) when the device is CUDA, so
flow runs sharing a GPU box take turns: create it once with ``prefect gcl create gpu --limit 1``
(without it, Prefect logs a warning and does not limit).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.concurrency.sync import concurrency
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from pydantic import BaseModel

from evals.errors import EvalError
from evals.spec import EvalReport, EvalSpec
from scf.errors import ScfError
from scf.spec import MergeSpec
from tasks import results_db, tracking
from tasks.config import ZOO_PREFIX, ZooSettings, content_hash
from tasks.errors import PipelineError
from tasks.gate import GateDecision, GatePolicy, pick_winner

BAD_INPUT = (ScfError, EvalError, PipelineError)
IO_RETRY_DELAYS = [2, 10, 30]


class MergeOutcome(BaseModel):
    """A finished merge: where the model is and its report (kept even after the weights are deleted)."""

    path: str
    report: dict[str, Any]


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry IO failures, never bad input."""
    try:
        state.result()
    except BAD_INPUT:
        return False
    except Exception:
        return True
    return False


def _key_from_argument(context: Any, parameters: dict[str, Any]) -> str:
    """``cache_key_fn``: the content key the flow computed for this call."""
    return parameters["cache_key"]


def versions() -> dict[str, str]:
    """Library versions that change merge or evaluation results (part of every cache key)."""
    import scf

    names = ("scf-pipeline", "torch", "transformers", "lm_eval", "safetensors")
    return {"scf": scf.__version__, **{name: _version(name) for name in names}}


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def merge_key(candidate_id: str) -> str:
    """Cache key of a merge: the candidate id already hashes sources, method, params and settings."""
    return content_hash({"step": "merge", "candidate": candidate_id, "versions": versions()})


def eval_key(model_identity: str, spec: EvalSpec) -> str:
    """Cache key of an evaluation: the model's content identity and the full eval spec."""
    spec_json = spec.model_dump(mode="json")
    return content_hash(
        {"step": "evaluate", "model": model_identity, "eval": spec_json, "versions": versions()}
    )


def result_storage(workdir: Path) -> LocalFileSystem:
    """Where cached task results are persisted for a workdir: ``<workdir>/prefect-results``.

    Prefect needs the storage block saved server-side (so a later run, or another worker, can read
    the results); it is saved under a name derived from the workdir.
    """
    block = LocalFileSystem(basepath=str(Path(workdir) / "prefect-results"))
    block.save(f"scf-results-{content_hash(str(Path(workdir).resolve()))[:16]}", overwrite=True)
    return block


def bind(step: Any, storage: LocalFileSystem) -> Any:
    """A cached task with its results persisted in ``storage`` (from ``result_storage``)."""
    return step.with_options(result_storage=storage)


def is_cached(storage: LocalFileSystem, key: str) -> bool:
    """Whether a cached step's result is already persisted (the step would be skipped)."""
    return ResultStore(result_storage=storage).exists(key)


@contextlib.contextmanager
def gpu_slot(device: str) -> Iterator[None]:
    """Hold the ``gpu`` concurrency slot when the work runs on CUDA; no-op on CPU."""
    if device == "cuda" or (device == "auto" and _cuda_available()):
        with concurrency("gpu", occupy=1):
            yield
    else:
        yield


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@task(
    name="resolve-sources",
    retries=3,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_unless_bad_input,
)
def resolve_sources(refs: dict[str, str], zoo: ZooSettings) -> dict[str, results_db.Source]:
    """Resolve (and download) every source, pinning hub revisions; ``zoo:<model>`` builds the toy zoo.

    Args:
        refs: role (``base``, ``secondary_0``, ``reference``) -> ref as written in the config.
        zoo: which toy zoo ``zoo:`` refs mean.

    Returns:
        role -> resolved source (local path in ``ref`` for zoo models, revision, fingerprint).
    """
    from scf.sources import resolve_source

    resolved = {}
    for role, ref in refs.items():
        source = resolve_source(str(_zoo_path(ref, zoo)) if ref.startswith(ZOO_PREFIX) else ref)
        resolved[role] = results_db.Source(
            role=role,
            ref=ref,
            revision=source.revision,
            fingerprint=source.fingerprint,
            path=str(source.path),
        )
    return resolved


def _zoo_path(ref: str, zoo: ZooSettings) -> Path:
    from evals.zoo import ZOO_MODELS, build_zoo, default_zoo_dir

    name = ref.removeprefix(ZOO_PREFIX)
    if name not in ZOO_MODELS:
        raise PipelineError(f"source {ref!r}: unknown zoo model; allowed: {', '.join(ZOO_MODELS)}")
    zoo_dir = build_zoo(default_zoo_dir(zoo.size, zoo.seed), size=zoo.size, seed=zoo.seed, progress=False)
    return Path(zoo_dir) / name


@task(
    name="merge",
    task_run_name="merge-{label}",
    cache_key_fn=_key_from_argument,
    persist_result=True,
)
def merge_candidate(spec: MergeSpec, out: str, label: str, cache_key: str) -> MergeOutcome:
    """Merge one candidate into ``out`` (content-addressed by candidate id), atomically.

    A complete ``out`` left by an earlier run that died before its result was recorded is reused.

    Returns:
        Where the model is and its merge report.
    """
    from scf.merge import REPORT_NAME, merge

    report_file = Path(out) / REPORT_NAME
    if report_file.exists():  # the directory appears complete or not at all (atomic rename)
        return MergeOutcome(path=out, report=json.loads(report_file.read_text()))
    with gpu_slot(spec.device):
        report = merge(spec, Path(out), progress=True)
    return MergeOutcome(path=out, report=report)


@task(
    name="evaluate",
    task_run_name="evaluate-{label}",
    cache_key_fn=_key_from_argument,
    persist_result=True,
)
def evaluate_model(model_dir: str, spec: EvalSpec, label: str, cache_key: str) -> EvalReport:
    """Evaluate one model (a parent or a merged candidate) with the config's suite.

    Returns:
        The evaluation report (scores, repetition, safety, samples).
    """
    from evals.suites import evaluate

    if not Path(model_dir).exists():
        raise PipelineError(f"model directory {model_dir} is missing; cannot evaluate {label}")
    with gpu_slot(spec.device):
        return evaluate(model_dir, spec, progress=True)


@task(
    name="log-mlflow",
    task_run_name="log-{label}",
    retries=3,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_unless_bad_input,
)
def log_model(
    uri: str,
    exp_id: str,
    parent_run_id: str,
    label: str,
    model: results_db.ModelRecord,
    report: EvalReport,
    merge_report: dict | None,
    artifact_dir: str,
) -> str:
    """Log one evaluated model as a nested MLflow run with its artifacts.

    Returns:
        The MLflow run id.
    """
    files = write_artifacts(Path(artifact_dir), report, merge_report, model.path)
    metrics = tracking.model_metrics(report.metrics(), merge_report, report.seconds)
    params = model_params(model, report.spec)
    tags = {"candidate_id": model.id, "kind": model.kind}
    return tracking.log_model_run(uri, exp_id, parent_run_id, label, params, metrics, files, tags)


def model_params(model: results_db.ModelRecord, spec: EvalSpec) -> dict[str, Any]:
    """MLflow params of a model: method, params, each source's ref/revision/fingerprint, eval settings."""
    params: dict[str, Any] = {"kind": model.kind, "method": model.method or "none", "params": model.params}
    for source in model.sources:
        params[f"source.{source.role}"] = source.ref
        params[f"source.{source.role}.revision"] = source.revision or "local"
        params[f"source.{source.role}.fingerprint"] = source.fingerprint
    params.update(
        {
            "eval.suite": spec.suite,
            "eval.backend": spec.backend,
            "eval.limit": spec.limit or "all",
            "eval.gen": spec.gen.model_dump(mode="json"),
        }
    )
    return params


def write_artifacts(
    out: Path, report: EvalReport, merge_report: dict | None, model_path: str | None
) -> list[Path]:
    """The files attached to a model's MLflow run: merge report and config, samples, eval report."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "samples.jsonl", out / "eval_report.json"]
    files[0].write_text("".join(sample.model_dump_json() + "\n" for sample in report.samples))
    files[1].write_text(report.model_copy(update={"samples": []}).model_dump_json(indent=2))
    if merge_report is not None:
        files.append(out / "merge_report.json")
        files[-1].write_text(json.dumps(merge_report, indent=2))
        config_file = Path(model_path or "") / "merge_config.yaml"
        if config_file.is_file():
            files.append(Path(shutil.copy(config_file, out / "merge_config.yaml")))
    return files


@task(
    name="store-duckdb",
    task_run_name="store-{label}",
    retries=3,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_unless_bad_input,
)
def store_results(
    db_path: str,
    config_name: str,
    label: str,
    model: results_db.ModelRecord,
    report: EvalReport,
    merge_report: dict | None,
    run_id: str | None,
) -> int:
    """Write one model's candidates row, scores and generation stats (replacing earlier rows).

    Returns:
        The number of score rows written.
    """
    scores, stats = results_db.scores_from_report(report)
    if merge_report is not None:
        stats.sparsity = merge_report["totals"]["sparsity"]
        stats.merge_seconds = merge_report["timings"]["total_seconds"]
    return results_db.write_model_results(Path(db_path), config_name, model, scores, stats, run_id)


@task(
    name="gate",
    task_run_name="gate-{config_name}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
)
def gate(
    db_path: str, config_name: str, candidate_ids: list[str], parent_ids: list[str], policy: GatePolicy
) -> list[GateDecision]:
    """Judge this run's candidates with the gate query against the current champion and pick the winner.

    Returns:
        One decision per candidate; at most one is ``promoted``.
    """
    current = results_db.champion(Path(db_path), config_name)
    champion_id = current["candidate_id"] if current else None
    verdicts = {
        cid: results_db.gate_checks(Path(db_path), config_name, cid, parent_ids, policy, champion_id)
        for cid in candidate_ids
    }
    return pick_winner(verdicts)


@task(
    name="promote",
    task_run_name="promote-{candidate_id}",
    retries=3,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_unless_bad_input,
)
def promote(uri: str, config_name: str, model_path: str, run_id: str, candidate_id: str) -> str:
    """Register the promoted model by reference and move the ``champion`` alias.

    Returns:
        The registered model version.
    """
    return tracking.promote(uri, config_name, Path(model_path), run_id, candidate_id)


@task(
    name="record-decisions",
    task_run_name="record-decisions-{config_name}",
    retries=3,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_unless_bad_input,
)
def record_decisions(
    db_path: str,
    config_name: str,
    decisions: list[GateDecision],
    run_id: str | None,
    champion_path: str | None,
) -> None:
    """Store the gate decisions and the new champion in DuckDB."""
    results_db.write_decisions(Path(db_path), config_name, decisions, run_id, champion_path)


def delete_model(path: str) -> bool:
    """Delete a merged model directory that lost the gate (disk is the scarce resource).

    Returns:
        True when something was deleted.
    """
    target = Path(path)
    if not target.is_dir():
        return False
    shutil.rmtree(target)
    return True


def write_resolved_config(config: Any, out: Path) -> Path:
    """The resolved pipeline config (defaults filled) as YAML, for MLflow and next to the results."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return out


def elapsed(started: float) -> str:
    """Seconds since ``started`` as text for logs."""
    return f"{time.perf_counter() - started:.1f}s"
