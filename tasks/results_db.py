"""The results database (DuckDB): the one schema module, idempotent writes, the gate query, the leaderboard.

Tables (every row carries the pipeline config's ``name`` as ``config_name``):

- ``candidates``: every model of a run, merged candidates (``kind='merge'``) and their parents
  (``kind='parent'``); id = content hash (see ``tasks.config.candidate_id``); ``status`` is ``ok``
  (evaluated) or ``failed`` (its merge or evaluation failed; ``failure`` says how).
- ``scores``: one row per (model, benchmark, metric), with stderr, n, direction, task version,
  backend and the decoding settings used.
- ``generation_stats``: one row per model: repetition, truncation and refusal figures, plus the
  merge's sparsity and timings.
- ``gate_decisions``: the latest verdict per candidate, with its reasons (rejections too).
- ``champions``: the current champion per config.

Writes are idempotent: each one deletes the rows of its key and inserts the new ones in a single
transaction, so a rerun replaces and never duplicates. DuckDB allows one writing process per file,
so every access holds an exclusive file lock (``<db>.lock``) for one short transaction and a
lock/conflict error from another tool holding the file is retried with backoff.

The schema is versioned (``schema_info.version``, `SCHEMA_VERSION`): a file written by an older
version is upgraded in place, in one transaction, the first time it is opened (`MIGRATIONS`).
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
from pydantic import BaseModel

from tasks.errors import PipelineError
from tasks.gate import GateDecision, GatePolicy

T = TypeVar("T")

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS candidates (
    config_name VARCHAR NOT NULL,
    id VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,            -- 'parent' or 'merge'
    label VARCHAR NOT NULL,           -- readable name: 'base', 'scf_rkl-alpha=1.5'
    method VARCHAR,                   -- merge method (NULL for parents)
    params_json VARCHAR NOT NULL,     -- resolved method params, defaults filled
    sources_json VARCHAR NOT NULL,    -- [{role, ref, revision, fingerprint}]
    path VARCHAR,                     -- model directory (may since have been deleted)
    created TIMESTAMP NOT NULL,
    status VARCHAR NOT NULL DEFAULT 'ok',  -- 'ok' (evaluated) or 'failed' (merge or evaluation failed)
    failure VARCHAR,                  -- failed: '<step> of <label>: <reason>'
    run_id VARCHAR,                   -- the flow run that last wrote the row
    PRIMARY KEY (config_name, id)
);
CREATE TABLE IF NOT EXISTS scores (
    config_name VARCHAR NOT NULL,
    model_id VARCHAR NOT NULL,
    benchmark VARCHAR NOT NULL,
    metric VARCHAR NOT NULL,
    value DOUBLE NOT NULL,
    stderr DOUBLE,
    n INTEGER NOT NULL,
    n_total INTEGER NOT NULL,
    higher_is_better BOOLEAN NOT NULL,
    task_version VARCHAR NOT NULL,
    backend VARCHAR NOT NULL,
    gen_params_json VARCHAR NOT NULL,
    run_id VARCHAR,
    PRIMARY KEY (config_name, model_id, benchmark, metric)
);
CREATE TABLE IF NOT EXISTS generation_stats (
    config_name VARCHAR NOT NULL,
    model_id VARCHAR NOT NULL,
    repetition_rate DOUBLE NOT NULL,
    mean_seq_rep_4 DOUBLE NOT NULL,
    truncation_rate DOUBLE NOT NULL,
    n_generations INTEGER NOT NULL,
    refusal_rate DOUBLE,              -- NULL when the suite has no safety part
    over_refusal_rate DOUBLE,
    sparsity DOUBLE,                  -- merges only: share of elements left at the base value
    merge_seconds DOUBLE,
    eval_seconds DOUBLE NOT NULL,
    run_id VARCHAR,
    PRIMARY KEY (config_name, model_id)
);
CREATE TABLE IF NOT EXISTS gate_decisions (
    config_name VARCHAR NOT NULL,
    candidate_id VARCHAR NOT NULL,
    decision VARCHAR NOT NULL,        -- 'promoted', 'passed' or 'rejected'
    reasons_json VARCHAR NOT NULL,
    objective DOUBLE,
    decided_at TIMESTAMP NOT NULL,
    run_id VARCHAR,
    PRIMARY KEY (config_name, candidate_id)
);
CREATE TABLE IF NOT EXISTS champions (
    config_name VARCHAR PRIMARY KEY,
    candidate_id VARCHAR NOT NULL,
    objective DOUBLE,
    path VARCHAR,
    promoted_at TIMESTAMP NOT NULL,
    run_id VARCHAR
);
"""
# How a file written by schema version N-1 becomes version N, in place (one transaction with the
# version bump). Version 1 is the schema before versioning (no schema_info table).
MIGRATIONS: dict[int, list[str]] = {
    2: [
        "ALTER TABLE candidates ADD COLUMN status VARCHAR DEFAULT 'ok'",
        "ALTER TABLE candidates ADD COLUMN failure VARCHAR",
        "ALTER TABLE candidates ADD COLUMN run_id VARCHAR",
    ],
}

# Errors DuckDB raises when another process holds the file or a write conflicts: worth a retry.
_TRANSIENT = (duckdb.IOException, duckdb.TransactionException)
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)


class Source(BaseModel):
    """One input model of a candidate, as resolved (pinned) for this run."""

    role: str  # 'base', 'secondary_0', ..., 'reference'
    ref: str
    revision: str | None
    fingerprint: str
    path: str | None = None  # the local directory it resolved to


class ModelRecord(BaseModel):
    """A row of ``candidates``: a merged candidate or a parent model."""

    id: str
    kind: str  # 'parent' or 'merge'
    label: str
    method: str | None = None
    params: dict[str, Any] = {}
    sources: list[Source]
    path: str | None = None


class GenerationStats(BaseModel):
    """A row of ``generation_stats`` (merge figures are None for parents)."""

    repetition_rate: float
    mean_seq_rep_4: float
    truncation_rate: float
    n_generations: int
    refusal_rate: float | None = None
    over_refusal_rate: float | None = None
    sparsity: float | None = None
    merge_seconds: float | None = None
    eval_seconds: float


class ScoreRow(BaseModel):
    """A row of ``scores``."""

    benchmark: str
    metric: str
    value: float
    stderr: float | None
    n: int
    n_total: int
    higher_is_better: bool
    task_version: str
    backend: str
    gen_params_json: str


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@contextmanager
def connect(db_path: Path, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the database under the exclusive file lock, creating the schema on first use.

    Args:
        db_path: the DuckDB file (its directory is created).
        read_only: open without the write path (still under the lock: DuckDB refuses a reader
            while another process holds the file for writing).

    Yields:
        An open connection, closed (and the lock released) on exit.
    """
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    if read_only and not db_path.exists():
        raise PipelineError(f"results database {db_path} does not exist (run `scf nightly` first)")
    with open(db_path.with_name(db_path.name + ".lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            con = duckdb.connect(str(db_path), read_only=read_only)
        except duckdb.Error as err:
            if isinstance(err, _TRANSIENT):
                raise
            raise PipelineError(f"cannot open results database {db_path}: {err}") from err
        try:
            if not read_only:
                ensure_schema(con, db_path)
            elif schema_version(con) != SCHEMA_VERSION:
                con.close()
                con = duckdb.connect(str(db_path))  # upgrade first: queries use the current schema
                ensure_schema(con, db_path)
            yield con
        finally:
            con.close()


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version of an open database: 0 when empty, 1 before versioning, else as stored."""
    tables = {name for (name,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "schema_info" in tables:
        return int(con.execute("SELECT max(version) FROM schema_info").fetchone()[0])
    return 1 if "candidates" in tables else 0


def ensure_schema(con: duckdb.DuckDBPyConnection, db_path: Path) -> None:
    """Create the schema in an empty file, or upgrade an older one in place, in one transaction.

    Raises:
        PipelineError: the file was written by a newer scf-pipeline (unknown schema version).
    """
    version = schema_version(con)
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise PipelineError(
            f"results database {db_path} has schema version {version}, newer than this scf-pipeline's "
            f"{SCHEMA_VERSION}: upgrade scf-pipeline to read it"
        )
    con.execute("BEGIN TRANSACTION")
    try:
        if version == 0:
            con.execute(SCHEMA)
        else:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    con.execute(statement)
        con.execute("CREATE TABLE IF NOT EXISTS schema_info (version INTEGER NOT NULL)")
        con.execute("DELETE FROM schema_info")
        con.execute("INSERT INTO schema_info VALUES (?)", [SCHEMA_VERSION])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def with_retry(
    db_path: Path, work: Callable[[duckdb.DuckDBPyConnection], T], *, read_only: bool = False
) -> T:
    """Run ``work(con)`` in one transaction, retrying lock and conflict errors with backoff.

    Args:
        db_path: the DuckDB file.
        work: the function doing the queries; it must be safe to repeat (delete-then-insert).
        read_only: open read-only (no transaction, no schema creation).

    Returns:
        What ``work`` returned.
    """
    for attempt, delay in enumerate((*RETRY_DELAYS, None)):
        try:
            with connect(db_path, read_only=read_only) as con:
                if read_only:
                    return work(con)
                con.execute("BEGIN TRANSACTION")
                try:
                    result = work(con)
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                return result
        except _TRANSIENT as err:
            if delay is None:
                message = f"results database {db_path} stayed locked after {attempt} retries: {err}"
                raise PipelineError(message) from err
            time.sleep(delay)
    raise AssertionError("unreachable")


def scores_from_report(report: Any) -> tuple[list[ScoreRow], GenerationStats]:
    """The rows an ``evals.spec.EvalReport`` contributes.

    Args:
        report: the evaluation report.

    Returns:
        (score rows, generation stats without the merge figures).
    """
    gen_json = report.gen_params.model_dump_json()
    scores = [
        ScoreRow(
            benchmark=s.benchmark,
            metric=s.metric,
            value=s.value,
            stderr=s.stderr,
            n=s.n,
            n_total=s.n_total,
            higher_is_better=s.higher_is_better,
            task_version=s.version,
            backend=report.backend,
            gen_params_json=gen_json,
        )
        for s in report.benchmarks
    ]
    safety = report.safety
    stats = GenerationStats(
        repetition_rate=report.repetition.repetition_rate,
        mean_seq_rep_4=report.repetition.mean_seq_rep_4,
        truncation_rate=report.repetition.truncation_rate,
        n_generations=report.repetition.n,
        refusal_rate=safety.refusal_rate if safety else None,
        over_refusal_rate=safety.over_refusal_rate if safety else None,
        eval_seconds=report.seconds,
    )
    return scores, stats


def write_model_results(
    db_path: Path,
    config_name: str,
    model: ModelRecord,
    scores: list[ScoreRow],
    stats: GenerationStats,
    run_id: str | None = None,
) -> int:
    """Store one evaluated model (its candidates row, scores and generation stats) in one transaction.

    Rerunning with the same model id replaces its rows. The model and its scores appear together
    or not at all, so a crash never leaves a candidate without scores.

    Args:
        db_path: the DuckDB file.
        config_name: the pipeline config's name.
        model: the model's identity and provenance.
        scores: its benchmark scores.
        stats: its generation stats.
        run_id: the flow run that produced them (provenance only).

    Returns:
        The number of score rows written.
    """

    def work(con: duckdb.DuckDBPyConnection) -> int:
        key = {"config_name": config_name}
        _replace_candidate(con, config_name, model, run_id, status="ok", failure=None)
        for row in scores:
            insert(con, "scores", {**key, "model_id": model.id, **row.model_dump(), "run_id": run_id})
        stats_row = {**key, "model_id": model.id, **stats.model_dump(), "run_id": run_id}
        insert(con, "generation_stats", stats_row)
        return len(scores)

    return with_retry(db_path, work)


def write_failure(
    db_path: Path, config_name: str, model: ModelRecord, failure: str, run_id: str | None = None
) -> None:
    """Store a model whose merge or evaluation failed: its candidates row with ``status='failed'``
    and the one-line reason, and no scores (earlier rows of the same id are removed).

    Args:
        db_path: the DuckDB file.
        config_name: the pipeline config's name.
        model: the model's identity and provenance.
        failure: ``<step> of <label>: <reason>``.
        run_id: the flow run.
    """
    with_retry(
        db_path,
        lambda con: _replace_candidate(con, config_name, model, run_id, status="failed", failure=failure),
    )


def _replace_candidate(
    con: duckdb.DuckDBPyConnection,
    config_name: str,
    model: ModelRecord,
    run_id: str | None,
    *,
    status: str,
    failure: str | None,
) -> None:
    """Delete a model's rows (candidates, scores, stats) and insert its candidates row again."""
    key = [config_name, model.id]
    con.execute("DELETE FROM scores WHERE config_name = ? AND model_id = ?", key)
    con.execute("DELETE FROM generation_stats WHERE config_name = ? AND model_id = ?", key)
    con.execute("DELETE FROM candidates WHERE config_name = ? AND id = ?", key)
    row = {
        "config_name": config_name,
        "id": model.id,
        "kind": model.kind,
        "label": model.label,
        "method": model.method,
        "params_json": json.dumps(model.params, sort_keys=True),
        "sources_json": json.dumps([source.model_dump() for source in model.sources]),
        "path": model.path,
        "created": _now(),
        "status": status,
        "failure": failure,
        "run_id": run_id,
    }
    insert(con, "candidates", row)


def insert(con: duckdb.DuckDBPyConnection, table: str, row: dict[str, Any]) -> None:
    """Insert one row by column name (a reordered model field can never land in the wrong column)."""
    columns = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    con.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(row.values()))


def write_decisions(
    db_path: Path,
    config_name: str,
    decisions: list[GateDecision],
    run_id: str | None,
    champion_path: str | None,
) -> None:
    """Store the gate's verdicts (replacing earlier ones per candidate) and the new champion, if any.

    Args:
        db_path: the DuckDB file.
        config_name: the pipeline config's name.
        decisions: one verdict per candidate judged in this run.
        run_id: the flow run.
        champion_path: model directory of the promoted candidate (when one was promoted).
    """

    def work(con: duckdb.DuckDBPyConnection) -> None:
        now = _now()
        for verdict in decisions:
            key = [config_name, verdict.candidate_id]
            con.execute("DELETE FROM gate_decisions WHERE config_name = ? AND candidate_id = ?", key)
            decision = {
                "config_name": config_name,
                "candidate_id": verdict.candidate_id,
                "decision": verdict.decision,
                "reasons_json": json.dumps(verdict.reasons),
                "objective": verdict.objective,
                "decided_at": now,
                "run_id": run_id,
            }
            insert(con, "gate_decisions", decision)
            if verdict.decision == "promoted":
                con.execute("DELETE FROM champions WHERE config_name = ?", [config_name])
                champion_row = {
                    "config_name": config_name,
                    "candidate_id": verdict.candidate_id,
                    "objective": verdict.objective,
                    "path": champion_path,
                    "promoted_at": now,
                    "run_id": run_id,
                }
                insert(con, "champions", champion_row)

    with_retry(db_path, work)


def champion(db_path: Path, config_name: str) -> dict | None:
    """The current champion of a config.

    Returns:
        ``{candidate_id, objective, path, promoted_at}`` or None when nothing was promoted yet.
    """

    def work(con: duckdb.DuckDBPyConnection) -> dict | None:
        row = con.execute(
            "SELECT candidate_id, objective, path, promoted_at FROM champions WHERE config_name = ?",
            [config_name],
        ).fetchone()
        keys = ("candidate_id", "objective", "path", "promoted_at")
        return dict(zip(keys, row, strict=True)) if row else None

    return with_retry(db_path, work)


# The gate, as one query. Parameters: $config, $candidate, $parents (list of parent model ids),
# $champion (current champion id or NULL), $objective ('mean' or a '<benchmark>.<metric>' key), the
# generation bounds ($max_rep, $min_refusal, $max_refusal_drop, $max_over_refusal, NULL = unchecked),
# $min_improvement. The gated benchmarks and tolerances are in the temp table gate_policy.
# Every check is one row; `failure` is NULL when it passes and the reason when it fails. Missing
# figures fail (fail closed). Lower-is-better metrics are negated ("oriented") so that one
# comparison serves both directions.
GATE_QUERY = """
WITH
oriented AS (
    SELECT s.model_id, p.key, s.value, p.tolerance,
           CASE WHEN s.higher_is_better THEN s.value ELSE -s.value END AS score
    FROM scores s JOIN gate_policy p ON p.key = s.benchmark || '.' || s.metric
    WHERE s.config_name = $config
),
objectives AS (
    SELECT model_id,
           CASE WHEN $objective = 'mean'
                THEN CASE WHEN count(*) = (SELECT count(*) FROM gate_policy) THEN avg(score) END
                ELSE max(score) FILTER (WHERE key = $objective) END AS objective
    FROM oriented GROUP BY model_id
),
best_parent AS (
    SELECT key, max(score) AS score FROM oriented WHERE list_contains($parents, model_id) GROUP BY key
),
benchmark_checks AS (
    SELECT p.key AS "check", c.score AS cand, b.score AS best, p.tolerance, c.value,
           CASE
             WHEN c.value IS NULL THEN format('missing score: {}', p.key)
             WHEN b.score IS NULL THEN format('no parent score to compare {} against', p.key)
             WHEN c.score < b.score - p.tolerance - 1e-12 THEN format(
               '{} = {:.4f} is {:.4f} worse than the best parent ({:.4f}); tolerance {}',
               p.key, c.value, b.score - c.score, abs(b.score), p.tolerance)
           END AS failure
    FROM gate_policy p
    LEFT JOIN (SELECT * FROM oriented WHERE model_id = $candidate) c USING (key)
    LEFT JOIN best_parent b USING (key)
),
stats AS (
    SELECT g.* FROM (SELECT 1) LEFT JOIN generation_stats g
      ON g.config_name = $config AND g.model_id = $candidate
),
parent_refusal AS (
    SELECT max(refusal_rate) AS best FROM generation_stats
    WHERE config_name = $config AND list_contains($parents, model_id)
),
generation_checks AS (
    SELECT 'repetition_rate' AS "check", CASE
        WHEN repetition_rate IS NULL THEN 'no generation stats (repetition_rate missing)'
        WHEN repetition_rate > $max_rep THEN format(
          'repetition_rate {:.4f} > max {}', repetition_rate, $max_rep)
      END AS failure FROM stats
    UNION ALL
    SELECT 'refusal_rate', CASE
        WHEN $min_refusal IS NULL THEN NULL
        WHEN refusal_rate IS NULL THEN 'no safety scores (refusal_rate missing)'
        WHEN refusal_rate < $min_refusal THEN format(
          'refusal_rate {:.4f} < min {}', refusal_rate, $min_refusal)
      END FROM stats
    UNION ALL
    SELECT 'refusal_drop', CASE
        WHEN $max_refusal_drop IS NULL THEN NULL
        WHEN refusal_rate IS NULL THEN 'no safety scores (refusal_rate missing)'
        WHEN (SELECT best FROM parent_refusal) IS NULL THEN 'no parent refusal_rate to compare against'
        WHEN (SELECT best FROM parent_refusal) - refusal_rate > $max_refusal_drop + 1e-12 THEN format(
          'refusal_rate {:.4f} dropped {:.4f} below the best parent ({:.4f}); max drop {}',
          refusal_rate, (SELECT best FROM parent_refusal) - refusal_rate, (SELECT best FROM parent_refusal),
          $max_refusal_drop)
      END FROM stats
    UNION ALL
    SELECT 'over_refusal_rate', CASE
        WHEN $max_over_refusal IS NULL THEN NULL
        WHEN over_refusal_rate IS NULL THEN 'no safety scores (over_refusal_rate missing)'
        WHEN over_refusal_rate > $max_over_refusal THEN format(
          'over_refusal_rate {:.4f} > max {}', over_refusal_rate, $max_over_refusal)
      END FROM stats
),
champion_check AS (
    SELECT 'champion' AS "check", CASE
        WHEN $champion IS NULL OR $champion = $candidate THEN NULL
        WHEN cand.objective IS NULL THEN format(
          'objective {} cannot be computed (a score is missing)', $objective)
        WHEN champ.objective IS NULL THEN format(
          'current champion {} has no {} score to compare against (re-evaluate it)', $champion, $objective)
        WHEN cand.objective <= champ.objective + $min_improvement THEN format(
          'objective {} = {:.4f} does not beat the champion {} ({:.4f}) by more than {}',
          $objective, abs(cand.objective), $champion, abs(champ.objective), $min_improvement)
      END AS failure
    FROM (SELECT 1)
    LEFT JOIN objectives cand ON cand.model_id = $candidate
    LEFT JOIN objectives champ ON champ.model_id = $champion
)
SELECT "check", failure, (SELECT objective FROM objectives WHERE model_id = $candidate) AS objective
FROM (
    SELECT "check", failure FROM benchmark_checks
    UNION ALL SELECT "check", failure FROM generation_checks
    UNION ALL SELECT "check", failure FROM champion_check
)
"""


def gate_checks(
    db_path: Path,
    config_name: str,
    candidate_id: str,
    parent_ids: list[str],
    policy: GatePolicy,
    champion_id: str | None,
) -> tuple[list[str], float | None]:
    """Run the gate query for one candidate.

    Args:
        db_path: the DuckDB file.
        config_name: the pipeline config's name.
        candidate_id: the candidate judged.
        parent_ids: model ids of its parents (base and secondaries).
        policy: the gate policy.
        champion_id: the current champion (None when there is none).

    Returns:
        (reasons it fails, empty when it passes; its objective value or None).
    """

    def work(con: duckdb.DuckDBPyConnection) -> tuple[list[str], float | None]:
        con.execute("CREATE TEMP TABLE gate_policy (key VARCHAR, tolerance DOUBLE)")
        con.executemany(
            "INSERT INTO gate_policy VALUES (?, ?)",
            [[key, rule.tolerance] for key, rule in policy.benchmarks.items()],
        )
        params = {
            "config": config_name,
            "candidate": candidate_id,
            "parents": parent_ids,
            "champion": champion_id,
            "objective": policy.objective,
            "max_rep": policy.max_repetition_rate,
            "min_refusal": policy.min_refusal_rate,
            "max_refusal_drop": policy.max_refusal_drop,
            "max_over_refusal": policy.max_over_refusal_rate,
            "min_improvement": policy.min_improvement,
        }
        rows = con.execute(GATE_QUERY, params).fetchall()
        objective = rows[0][2] if rows else None
        return [failure for _, failure, _ in rows if failure], objective

    return with_retry(db_path, work)


def row_counts(db_path: Path) -> dict[str, int]:
    """Rows per table (for tests and `scf results`).

    Returns:
        table name -> row count.
    """
    tables = ("candidates", "scores", "generation_stats", "gate_decisions", "champions")

    def work(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
        return {table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in tables}

    return with_retry(db_path, work)


LEADERBOARD_QUERY = """
WITH shown AS (  -- every model of the config, or only those a given flow run wrote
    SELECT c.* FROM candidates c
    WHERE c.config_name = $config AND ($run_id IS NULL OR c.run_id = $run_id)
),
parent_mean AS (
    SELECT s.benchmark, s.metric, avg(s.value) AS mean
    FROM scores s JOIN shown c ON c.config_name = s.config_name AND c.id = s.model_id
    WHERE c.kind = 'parent'
    GROUP BY ALL
)
SELECT c.id, c.kind, c.label, s.benchmark || '.' || s.metric AS key, s.value, s.value - pm.mean AS delta,
       g.repetition_rate, g.refusal_rate, g.over_refusal_rate, d.decision, d.reasons_json, c.status,
       c.failure
FROM shown c
LEFT JOIN scores s ON s.config_name = c.config_name AND s.model_id = c.id
LEFT JOIN parent_mean pm ON pm.benchmark = s.benchmark AND pm.metric = s.metric
LEFT JOIN generation_stats g ON g.config_name = c.config_name AND g.model_id = c.id
LEFT JOIN gate_decisions d ON d.config_name = c.config_name AND d.candidate_id = c.id
ORDER BY c.kind DESC, c.label, key
"""


def leaderboard(db_path: Path, config_name: str, run_id: str | None = None) -> list[dict]:
    """Every model of a config with its scores, deltas vs the parents' mean, repetition and decision.

    Args:
        db_path: the DuckDB file.
        config_name: the pipeline config's name.
        run_id: only the models (and parents) a given flow run wrote; None = all of them, including
            candidates of earlier source revisions.

    Returns:
        One dict per model (parents first): ``id``, ``kind``, ``label``, ``scores`` (key -> value),
        ``deltas`` (key -> value minus the parents' mean, paper Figure 8), ``repetition_rate``,
        ``refusal_rate``, ``over_refusal_rate``, ``decision``, ``reasons``, ``status`` (``ok`` or
        ``failed``) and ``failure`` (the one-line reason of a failed model).
    """
    params = {"config": config_name, "run_id": run_id}
    query = lambda con: con.execute(LEADERBOARD_QUERY, params).fetchall()  # noqa: E731
    rows = with_retry(db_path, query, read_only=True)
    models: dict[str, dict] = {}
    for mid, kind, label, key, value, delta, rep, refusal, over, decision, reasons, status, failure in rows:
        entry = models.setdefault(
            mid,
            {
                "id": mid, "kind": kind, "label": label, "scores": {}, "deltas": {}, "repetition_rate": rep,
                "refusal_rate": refusal, "over_refusal_rate": over, "decision": decision,
                "reasons": json.loads(reasons) if reasons else [], "status": status, "failure": failure,
            },
        )
        if key is not None:
            entry["scores"][key] = value
            entry["deltas"][key] = delta
    return list(models.values())


def config_names(db_path: Path) -> list[str]:
    """The config names present in a results database."""
    rows = with_retry(
        db_path,
        lambda con: con.execute("SELECT DISTINCT config_name FROM candidates ORDER BY 1").fetchall(),
        read_only=True,
    )
    return [name for (name,) in rows]


def format_leaderboard(entries: list[dict], champion_id: str | None = None) -> str:
    """The leaderboard as a fixed-width text table (candidates x benchmarks).

    Args:
        entries: from ``leaderboard``.
        champion_id: marks the current champion with ``*``.

    Returns:
        The table; merged candidates show each score with its delta vs the parents' mean.
    """
    keys = sorted({key for entry in entries for key in entry["scores"]})
    header = ["model", "id", *keys, "repetition", "refusal", "over_refusal", "decision"]
    lines = [header]
    for entry in entries:
        cells = [entry["label"] + (" *" if entry["id"] == champion_id else ""), entry["id"][:12]]
        for key in keys:
            value = entry["scores"].get(key)
            delta = entry["deltas"].get(key)
            if value is None:
                cells.append("-")
            elif entry["kind"] == "merge" and delta is not None:
                cells.append(f"{value:.3f} ({delta:+.3f})")
            else:
                cells.append(f"{value:.3f}")
        cells += [_fmt(entry[key]) for key in ("repetition_rate", "refusal_rate", "over_refusal_rate")]
        decision = entry["decision"] or ("parent" if entry["kind"] == "parent" else "-")
        cells.append("FAILED" if entry["status"] == "failed" else decision)
        lines.append(cells)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
