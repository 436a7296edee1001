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

import importlib.metadata
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from pydantic import BaseModel

from evals.errors import EvalError
from evals.spec import EvalReport, EvalSpec
from scf.errors import ScfError
from scf.outdir import REPORT_NAME
from scf.spec import MergeSpec
from tasks import results_db, tracking
from tasks.child import ChildStep, run_child, scf_cache_dir, scf_command
from tasks.config import ZOO_PREFIX, EvalSettings, ZooSettings, content_hash
from tasks.errors import PipelineError, StepFailed
from tasks.gate import GateDecision, GatePolicy, Models, judge, pick_winner
from tasks.gpu import gpu_slot

BAD_INPUT = (ScfError, EvalError, PipelineError)
NOT_RETRIED = (*BAD_INPUT, StepFailed)  # a failed step reran the same way would fail the same way
IO_RETRY_DELAYS = [2, 10, 30]


class MergeOutcome(BaseModel):
    """A finished merge: where the model is and its report (kept even after the weights are deleted)."""

    path: str
    report: dict[str, Any]


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry IO failures, never bad input or a failed child step."""
    try:
        state.result()
    except NOT_RETRIED:
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


def merge_key(candidate_id: str, report_settings: dict[str, Any] | None = None) -> str:
    """Cache key of a merge: the candidate id already hashes sources, method, params and settings;
    ``report_settings`` (``MergeSettings.report_settings()``: diagnostics on) change only its report."""
    key = {"step": "merge", "candidate": candidate_id, "versions": versions()}
    if report_settings is not None:
        key["report"] = report_settings
    return content_hash(key)


def eval_key(model_identity: str, spec: EvalSpec) -> str:
    """Cache key of an evaluation: the model's content identity and the full eval spec (without the
    pipeline's own settings such as ``eval.timeout_s``, which change no result)."""
    spec_json = (spec.spec() if isinstance(spec, EvalSettings) else spec).model_dump(mode="json")
    return content_hash(
        {"step": "evaluate", "model": model_identity, "eval": spec_json, "versions": versions()}
    )


def result_storage(config: Any) -> Any:
    """Where cached task results are persisted: the config's ``storage.result_storage`` block, else
    ``<workdir>/prefect-results``.

    A local directory is saved as a block server-side (so a later run, or another worker on the same
    filesystem, can read the results), under a name derived from the directory. A named block (an
    S3 bucket, a remote file system) is loaded as it is: in pool mode every worker and the night must
    reach the same storage, since that is how a worker's results come back.

    Args:
        config: the pipeline config.

    Returns:
        The storage block.
    """
    if config.storage.result_storage:
        from prefect.blocks.core import Block

        try:
            return Block.load(config.storage.result_storage)
        except ValueError as err:
            slug = config.storage.result_storage
            raise PipelineError(f"storage.result_storage: cannot load block {slug!r}: {err}") from None
    directory = Path(config.workdir) / "prefect-results"
    block = LocalFileSystem(basepath=str(directory))
    block.save(f"scf-results-{content_hash(str(directory.resolve()))[:16]}", overwrite=True)
    return block


def read_result(storage: Any, key: str) -> Any:
    """A persisted step result by its cache key (what a pool run left), or None when absent."""
    store = ResultStore(result_storage=storage)
    return store.read(key).result if store.exists(key) else None


def bind(step: Any, storage: Any) -> Any:
    """A cached task with its results persisted in ``storage`` (from ``result_storage``)."""
    return step.with_options(result_storage=storage)


def is_cached(storage: Any, key: str) -> bool:
    """Whether a cached step's result is already persisted (the step would be skipped)."""
    return ResultStore(result_storage=storage).exists(key)


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

    zoo_root = zoo_dir(zoo) if any(ref.startswith(ZOO_PREFIX) for ref in refs.values()) else None
    resolved = {}
    for role, ref in refs.items():
        source = resolve_source(str(_zoo_path(ref, zoo_root)) if ref.startswith(ZOO_PREFIX) else ref)
        resolved[role] = results_db.Source(
            role=role,
            ref=ref,
            revision=source.revision,
            fingerprint=source.fingerprint,
            path=str(source.path),
        )
    return resolved


def _zoo_path(ref: str, zoo_root: Path) -> Path:
    """``zoo:<model>`` -> its directory in the built zoo."""
    name = ref.removeprefix(ZOO_PREFIX)
    models = sorted(p.name for p in zoo_root.iterdir() if (p / "config.json").is_file())
    if name not in models:
        raise PipelineError(f"source {ref!r}: unknown zoo model; allowed: {', '.join(models)}")
    return zoo_root / name


def load_secrets(secrets: dict[str, str]) -> None:
    """Put the credentials the config names (env variable -> Prefect Secret block) into this
    process's environment, where huggingface_hub, MLflow and every child step read them. Only the
    names are ever logged, never a value.

    Raises:
        PipelineError: a Secret block that cannot be loaded (named, without its value).
    """
    from prefect.blocks.system import Secret

    for variable, block in secrets.items():
        try:
            os.environ[variable] = str(Secret.load(block).get())
        except ValueError as err:
            raise PipelineError(f"secrets.{variable}: cannot load Prefect Secret block {block!r} "
                                f"({type(err).__name__})") from None
        get_run_logger().info("%s taken from Prefect Secret block %r", variable, block)


def zoo_dir(zoo: ZooSettings) -> Path:
    """The toy zoo's directory, built (trained) in a child process on first use, then reused."""
    log = scf_cache_dir() / "logs"
    step = ChildStep(
        "zoo",
        f"zoo-{zoo.size}-seed{zoo.seed}",
        scf_command("zoo", "build", "--size", zoo.size, "--seed", str(zoo.seed), "--no-progress"),
        log / f"zoo-{zoo.size}-seed{zoo.seed}-{os.getpid()}.log",
        timeout_s=3600,
    )
    lines: list[str] = []
    run_child(step, lines.append)
    built = [line.removeprefix("zoo: ") for line in lines if line.startswith("zoo: ")]
    if not built:
        reason = "the zoo build printed no 'zoo: <dir>' line"
        raise StepFailed("zoo", step.label, reason, lines, step.log_path)
    return Path(built[-1])


class StepSettings(BaseModel):
    """How a flow runs a merge or an evaluation in its child process.

    Attributes:
        timeout_s: kill the child after this many seconds.
        gpu_lock: ``auto``, ``on`` or ``off`` (see ``tasks.gpu``).
        log_dir: the child's log and its input and output files go in a fresh directory under it.
    """

    timeout_s: float
    gpu_lock: str = "auto"
    log_dir: str


def step_dir(settings: StepSettings, model_id: str, step: str) -> Path:
    """A fresh directory for one attempt of a step: ``<log_dir>/<model id>/<step>-<time>-<random>``.

    Every attempt gets its own, so two runs of the same step never write each other's files.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = Path(settings.log_dir) / model_id / f"{step}-{stamp}-{secrets.token_hex(3)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def latest_log(settings: StepSettings, model_id: str) -> Path | None:
    """The newest child log of a model's steps (what a pool worker left in the shared log directory)."""
    logs = sorted(Path(settings.log_dir, model_id).glob("*/*.log"), key=lambda path: path.stat().st_mtime)
    return logs[-1] if logs else None


def _forward(step: str, label: str):
    logger = get_run_logger()
    return lambda line: logger.info("[%s %s] %s", step, label, line)


@task(
    name="merge",
    task_run_name="merge-{label}",
    cache_key_fn=_key_from_argument,
    persist_result=True,
)
def merge_candidate(
    spec: MergeSpec, out: str, label: str, cache_key: str, settings: StepSettings, model_id: str
) -> MergeOutcome:
    """Merge one candidate into ``out`` (content-addressed by candidate id), atomically, in a child
    process (``scf merge --config <spec>``) holding the GPU when it runs on one.

    A complete ``out`` left by an earlier run that died before its result was recorded is reused.

    Returns:
        Where the model is and its merge report.

    Raises:
        StepFailed: the child failed, was killed or timed out.
    """
    report_file = Path(out) / REPORT_NAME
    if report_file.exists():  # the directory appears complete or not at all (atomic rename)
        return MergeOutcome(path=out, report=json.loads(report_file.read_text()))
    work = step_dir(settings, model_id, "merge")
    spec_file = work / "merge_spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    command = scf_command("merge", "--config", str(spec_file), "--out", out)
    step = ChildStep("merge", label, command, work / "merge.log", settings.timeout_s)
    with gpu_slot(spec.device, settings.gpu_lock):
        run_child(step, _forward("merge", label))
    if not report_file.is_file():
        raise StepFailed("merge", label, f"finished but wrote no {report_file}", [], step.log_path)
    return MergeOutcome(path=out, report=json.loads(report_file.read_text()))


@task(
    name="evaluate",
    task_run_name="evaluate-{label}",
    cache_key_fn=_key_from_argument,
    persist_result=True,
)
def evaluate_model(
    model_dir: str, spec: EvalSpec, label: str, cache_key: str, settings: StepSettings, model_id: str
) -> EvalReport:
    """Evaluate one model (a parent or a merged candidate) in a child process
    (``scf eval <model> --spec <spec>``) holding the GPU when it runs on one.

    Returns:
        The evaluation report (scores, repetition, safety, samples).

    Raises:
        StepFailed: the child failed, was killed or timed out.
    """
    if not Path(model_dir).exists():
        raise PipelineError(f"model directory {model_dir} is missing; cannot evaluate {label}")
    work = step_dir(settings, model_id, "evaluate")
    spec_file, report_file = work / "eval_spec.json", work / "eval_report.json"
    spec_file.write_text(spec.model_dump_json(indent=2))
    command = scf_command("eval", str(model_dir), "--spec", str(spec_file), "--out", str(report_file))
    step = ChildStep("evaluate", label, command, work / "evaluate.log", settings.timeout_s)
    with gpu_slot(spec.device, settings.gpu_lock):
        run_child(step, _forward("evaluate", label))
    return EvalReport.read_json(report_file)


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
    gated: tuple[str, ...] = (),
) -> str:
    """Log one evaluated model as a nested MLflow run with its artifacts.

    Args:
        gated: the gate's benchmark keys (logged once more as ``compare.<key>``, with the rates).

    Returns:
        The MLflow run id.
    """
    files = write_artifacts(Path(artifact_dir), report, merge_report, model.path)
    metrics = tracking.model_metrics(report.metrics(), merge_report, report.seconds, gated)
    params = {**model_params(model, report.spec), "eval.engine": report.engine}
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
            "eval.vllm": spec.vllm.model_dump(mode="json"),
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
    name="log-mlflow-failure",
    task_run_name="log-failure-{label}",
    retries=3,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_unless_bad_input,
)
def log_failure(
    uri: str,
    exp_id: str,
    parent_run_id: str,
    label: str,
    model: results_db.ModelRecord,
    failure: str,
    tail: list[str],
    artifact_dir: str,
) -> str:
    """Log a model whose merge or evaluation failed: a FAILED nested run with the reason as a tag and
    the child's last output lines as ``failure.log``.

    Returns:
        The MLflow run id.
    """
    out = Path(artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "failure.log"
    log_file.write_text(f"{failure}\n\n" + "\n".join(tail) + "\n")
    params = {"kind": model.kind, "method": model.method or "none", "params": model.params}
    tags = {"candidate_id": model.id, "kind": model.kind, "failure": failure[:4000]}
    return tracking.log_model_run(
        uri, exp_id, parent_run_id, label, params, {}, [log_file], tags, status="FAILED"
    )


@task(
    name="store-duckdb-failure",
    task_run_name="store-failure-{label}",
    retries=3,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_unless_bad_input,
)
def store_failure(
    db_path: str,
    config_name: str,
    label: str,
    model: results_db.ModelRecord,
    failure: str,
    run_id: str | None,
) -> None:
    """Store a failed model: its candidates row, ``status='failed'`` and the reason."""
    results_db.write_failure(Path(db_path), config_name, model, failure, run_id)


def publish_verdict(summary: dict[str, Any]) -> None:
    """The run's outcome as a Prefect markdown artifact (candidate, decision, reasons), shown on the
    flow run's page in the Prefect UI."""
    from prefect.artifacts import create_markdown_artifact

    promoted = summary["promoted"]
    lines = [
        f"## {summary['config']}: "
        + (f"promoted `{_label_of(summary, promoted)}`" if promoted else "nothing promoted"),
        "",
        f"Champion: `{summary['champion'] or 'none'}`. MLflow run `{summary['mlflow_run_id']}`, "
        f"DuckDB `{summary['duckdb']}`.",
        "",
        "| candidate | id | decision | reasons |",
        "| --- | --- | --- | --- |",
    ]
    for cand in summary["candidates"]:
        reasons = "<br>".join(reason.replace("|", "\\|") for reason in cand["reasons"])
        decision = "**FAILED**" if cand["status"] == "failed" else cand["decision"]
        lines.append(f"| {cand['label']} | `{cand['id']}` | {decision} | {reasons} |")
    key = "verdict-" + "".join(c if c.isalnum() else "-" for c in summary["config"].lower())
    create_markdown_artifact(markdown="\n".join(lines), key=key[:100], description="the night's verdict")


def notify(config: Any, summary: dict[str, Any] | None, error: str | None = None) -> None:
    """Post the run's verdict (or why it failed) to the config's webhook; never fails the run."""
    from tasks import notify as notifier

    if not (config.notify.webhook_url or config.notify.block):
        return
    run_id = summary["flow_run_id"] if summary else None
    links = {"prefect": _prefect_url(run_id), "mlflow": _mlflow_url(config, summary)}
    if summary is not None:
        payload = notifier.verdict_payload(summary, links)
    else:
        payload = {"text": f"scf-pipeline {config.name}: the night failed: {error}", "config": config.name,
                   "promoted": None, "error": error, "links": links}
    if notifier.post(config.notify, payload):
        get_run_logger().info("verdict posted to the notify webhook")


def _prefect_url(flow_run_id: str | None) -> str | None:
    from prefect import runtime
    from prefect.settings import PREFECT_UI_URL

    run_id = flow_run_id or runtime.flow_run.id
    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/runs/flow-run/{run_id}" if base and run_id else None


def _mlflow_url(config: Any, summary: dict[str, Any] | None) -> str | None:
    uri = config.mlflow_uri
    if not summary or not summary.get("mlflow_run_id"):
        return None
    if uri.startswith(("http://", "https://")):
        experiment, run = summary["mlflow_experiment_id"], summary["mlflow_run_id"]
        return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run}"
    return tracking.ui_command(uri)


def _label_of(summary: dict[str, Any], candidate_id: str) -> str:
    return next(c["label"] for c in summary["candidates"] if c["id"] == candidate_id)


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
    samples = results_db.samples_from_report(report)
    if merge_report is not None:
        stats.sparsity = merge_report["totals"]["sparsity"]
        stats.merge_seconds = merge_report["timings"]["total_seconds"]
    return results_db.write_model_results(Path(db_path), config_name, model, scores, stats, run_id, samples)


@task(
    name="gate",
    task_run_name="gate-{config_name}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
)
def gate(
    db_path: str, config_name: str, candidate_ids: list[str], parents: dict[str, str], policy: GatePolicy
) -> list[GateDecision]:
    """Judge this run's candidates against their parents and the current champion; pick the winner.

    Args:
        db_path: the results database.
        config_name: the config's name.
        candidate_ids: the candidates to judge (evaluated, with their samples stored).
        parents: parent model id -> label.
        policy: the gate policy.

    Returns:
        One decision per candidate; at most one is ``promoted``.
    """
    models = {cid: _models(db_path, config_name, cid, parents) for cid in candidate_ids}
    verdicts = {cid: judge(Path(db_path), config_name, models[cid], policy) for cid in candidate_ids}
    champion_id = next(iter(models.values())).champion if models else None
    return pick_winner(verdicts, champion_id)


@task(
    name="race-check",
    task_run_name="race-check-{candidate_id}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
)
def hopeless(
    db_path: str, config_name: str, candidate_id: str, parents: dict[str, str], policy: GatePolicy
) -> list[str]:
    """Racing: the gate's checks on the items evaluated so far; the failures no more items can fix.

    Returns:
        The reasons the candidate is already proven to fail (empty: let it go on).
    """
    models = _models(db_path, config_name, candidate_id, parents)
    return judge(Path(db_path), config_name, models, policy, final=False).hopeless


def _models(db_path: str, config_name: str, candidate_id: str, parents: dict[str, str]) -> Models:
    """The candidate, its parents and the current champion, as the gate compares them."""
    current = results_db.champion(Path(db_path), config_name)
    champion_id = current["candidate_id"] if current else None
    label = results_db.label_of(Path(db_path), config_name, champion_id) if champion_id else None
    return Models(candidate_id, parents, champion_id, label)


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
    """The resolved pipeline config (defaults filled) as YAML, for MLflow and next to the results.

    A webhook URL is a credential (anyone holding a Slack webhook URL can post to the channel): it is
    written as ``<redacted>``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    resolved = config.model_dump(mode="json")
    if resolved.get("notify", {}).get("webhook_url"):
        resolved["notify"]["webhook_url"] = "<redacted>"
    out.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return out


def elapsed(started: float) -> str:
    """Seconds since ``started`` as text for logs."""
    return f"{time.perf_counter() - started:.1f}s"
