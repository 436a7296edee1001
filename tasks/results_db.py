"""The results database (DuckDB): the one schema module, idempotent writes and the queries that read it.

The gate's rules live in ``tasks.gate``; this module only stores and reads.

Tables (every row carries the pipeline config's ``name`` as ``config_name``):

- ``candidates``: every model of a run, merged candidates (``kind='merge'``) and their parents
  (``kind='parent'``); id = content hash (see ``tasks.config.candidate_id``); ``status`` is ``ok``
  (evaluated) or ``failed`` (its merge or evaluation failed; ``failure`` says how).
- ``scores``: one row per (model, benchmark, metric), with stderr, n, direction, task version,
  backend and the decoding settings used.
- ``generation_stats``: one row per model: repetition, truncation and refusal figures, plus the
  merge's sparsity and timings.
- ``samples``: one row per (model, benchmark, metric, item): the item's score and its generation's
  repetition and refusal figures; ``item_id`` is equal across models evaluated the same way, which
  is what the gate's paired comparisons join on.
- ``gate_decisions``: every run's verdict per candidate, with its reasons (rejections too); never
  overwritten.
- ``champions``: the champion history: who held the title, from when to when (``until`` NULL for
  the current one), which run promoted them and why.
- ``events``: changes of the title made by hand (rollbacks), with their reasons.

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
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb
from pydantic import BaseModel

from scf import faults
from tasks.errors import PipelineError

if TYPE_CHECKING:
    from tasks.gate import GateDecision

T = TypeVar("T")

SCHEMA_VERSION = 3
_DDL = """
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
CREATE TABLE IF NOT EXISTS samples (  -- one row per model x benchmark x metric x item
    config_name VARCHAR NOT NULL,
    model_id VARCHAR NOT NULL,
    benchmark VARCHAR NOT NULL,
    metric VARCHAR NOT NULL,           -- as in scores.metric ('exact_match', 'refused', ...)
    item_id VARCHAR NOT NULL,          -- '<index in the benchmark>-<hash of its prompt>': equal across models
    score DOUBLE NOT NULL,             -- the item's value of the metric (0/1 for exact match)
    looping BOOLEAN,                   -- the generation's repetition figures (same for every metric;
    seq_rep_4 DOUBLE,                  --   NULL for an item scored without generating: multiple choice)
    truncated BOOLEAN,
    refused BOOLEAN,                   -- safety items: the judge's verdict
    harmful BOOLEAN,                   -- safety items: a harmful prompt (else a benign look-alike)
    n_tokens INTEGER NOT NULL,
    run_id VARCHAR,
    PRIMARY KEY (config_name, model_id, benchmark, metric, item_id)
);
CREATE TABLE IF NOT EXISTS gate_decisions (  -- every night's verdicts, never overwritten
    config_name VARCHAR NOT NULL,
    candidate_id VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    decision VARCHAR NOT NULL,        -- 'promoted', 'passed' or 'rejected'
    reasons_json VARCHAR NOT NULL,
    objective DOUBLE,
    decided_at TIMESTAMP NOT NULL,
    PRIMARY KEY (config_name, candidate_id, run_id)
);
CREATE TABLE IF NOT EXISTS champions (  -- who held the title, from when to when, and why
    config_name VARCHAR NOT NULL,
    candidate_id VARCHAR NOT NULL,
    objective DOUBLE,
    path VARCHAR,
    since TIMESTAMP NOT NULL,
    until TIMESTAMP,                  -- NULL: the current champion
    run_id VARCHAR,                   -- the flow run that promoted it (NULL for a rollback)
    reason VARCHAR NOT NULL,
    PRIMARY KEY (config_name, since)
);
CREATE TABLE IF NOT EXISTS events (  -- rollbacks (and other changes of the title made by hand)
    config_name VARCHAR NOT NULL,
    happened_at TIMESTAMP NOT NULL,
    kind VARCHAR NOT NULL,            -- 'rollback'
    candidate_id VARCHAR NOT NULL,    -- the champion after the event
    previous_id VARCHAR,              -- the champion before it
    reason VARCHAR NOT NULL,
    PRIMARY KEY (config_name, happened_at)
);
"""
# table name -> its CREATE TABLE statement (the schema of the current version)
TABLES: dict[str, str] = {
    statement.split(None, 1)[0]: f"CREATE TABLE IF NOT EXISTS {statement.strip()}"
    for statement in _DDL.split("CREATE TABLE IF NOT EXISTS")[1:]
}
SCHEMA = "\n".join(TABLES.values())
# How a file written by schema version N-1 becomes version N, in place (one transaction with the
# version bump). Version 1 is the schema before versioning (no schema_info table).
MIGRATIONS: dict[int, list[str]] = {
    2: [
        "ALTER TABLE candidates ADD COLUMN status VARCHAR DEFAULT 'ok'",
        "ALTER TABLE candidates ADD COLUMN failure VARCHAR",
        "ALTER TABLE candidates ADD COLUMN run_id VARCHAR",
    ],
    3: [  # per-item samples; every night's decisions kept; the champion a history
        TABLES["samples"],
        "ALTER TABLE gate_decisions RENAME TO gate_decisions_v2",
        TABLES["gate_decisions"],
        "INSERT INTO gate_decisions SELECT config_name, candidate_id, coalesce(run_id, 'before-history'),"
        " decision, reasons_json, objective, decided_at FROM gate_decisions_v2",
        "DROP TABLE gate_decisions_v2",
        "ALTER TABLE champions RENAME TO champions_v2",
        TABLES["champions"],
        "INSERT INTO champions SELECT config_name, candidate_id, objective, path, promoted_at, NULL, run_id,"
        " 'promoted by the gate (before the champion history was kept)' FROM champions_v2",
        "DROP TABLE champions_v2",
        TABLES["events"],
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


class SampleRow(BaseModel):
    """A row of ``samples``: one item's value of one metric, with its generation's figures."""

    benchmark: str
    metric: str
    item_id: str
    score: float
    looping: bool | None
    seq_rep_4: float | None
    truncated: bool | None
    refused: bool | None = None
    harmful: bool | None = None
    n_tokens: int


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


def samples_from_report(report: Any) -> list[SampleRow]:
    """One row per sample and metric of an ``evals.spec.EvalReport`` (its per-item results).

    Args:
        report: the evaluation report (with its samples).

    Returns:
        The rows, in the report's order.
    """
    rows = []
    for sample in report.samples:
        generated = sample.finish_reason is not None  # multiple-choice items generate nothing
        harmful = None if sample.refused is None else sample.target == "refusal"
        for metric, value in sample.scores.items():
            rows.append(SampleRow(
                benchmark=sample.benchmark, metric=metric, item_id=sample.item_id, score=value,
                looping=sample.looping if generated else None,
                seq_rep_4=sample.seq_rep_4 if generated else None,
                truncated=sample.truncated if generated else None,
                refused=sample.refused, harmful=harmful, n_tokens=sample.n_tokens,
            ))
    return rows


def scores_from_report(report: Any) -> tuple[list[ScoreRow], GenerationStats]:
    """The aggregate rows an ``evals.spec.EvalReport`` contributes.

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
    samples: list[SampleRow] | None = None,
) -> int:
    """Store one evaluated model (its candidates row, scores, generation stats and per-item samples)
    in one transaction.

    Rerunning with the same model id replaces its rows. The model and its results appear together
    or not at all, so a crash never leaves a candidate without scores.

    Args:
        db_path: the DuckDB file.
        config_name: the pipeline config's name.
        model: the model's identity and provenance.
        scores: its benchmark scores.
        stats: its generation stats.
        run_id: the flow run that produced them (provenance only).
        samples: its per-item results (``samples_from_report``).

    Returns:
        The number of score rows written.
    """
    key = {"config_name": config_name}

    def work(con: duckdb.DuckDBPyConnection) -> int:
        _replace_candidate(con, config_name, model, run_id, status="ok", failure=None)
        for row in scores:
            insert(con, "scores", {**key, "model_id": model.id, **row.model_dump(), "run_id": run_id})
        stats_row = {**key, "model_id": model.id, **stats.model_dump(), "run_id": run_id}
        insert(con, "generation_stats", stats_row)
        if samples:
            insert_many(con, "samples", [{**key, "model_id": model.id, **row.model_dump(), "run_id": run_id}
                                         for row in samples])
        faults.pause("duckdb_write")  # a test seam (scf.faults): killed here, nothing is committed
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
    con.execute("DELETE FROM samples WHERE config_name = ? AND model_id = ?", key)
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
    insert_many(con, table, [row])


def insert_many(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict[str, Any]]) -> None:
    """Insert rows that share their columns, by column name."""
    if not rows:
        return
    columns = list(rows[0])
    statement = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
    con.executemany(statement, [[row[column] for column in columns] for row in rows])


def write_decisions(
    db_path: Path,
    config_name: str,
    decisions: list[GateDecision],
    run_id: str | None,
    champion_path: str | None,
) -> None:
    """Store one run's verdicts (every night's are kept) and make the promoted candidate champion.

    Args:
        db_path: the DuckDB file.
        config_name: the pipeline config's name.
        decisions: one verdict per candidate judged in this run.
        run_id: the flow run.
        champion_path: model directory of the promoted candidate (when one was promoted).
    """
    run = run_id or "no-run"

    def work(con: duckdb.DuckDBPyConnection) -> None:
        now = _now()
        for verdict in decisions:
            con.execute(
                "DELETE FROM gate_decisions WHERE config_name = ? AND candidate_id = ? AND run_id = ?",
                [config_name, verdict.candidate_id, run],
            )
            decision = {
                "config_name": config_name,
                "candidate_id": verdict.candidate_id,
                "run_id": run,
                "decision": verdict.decision,
                "reasons_json": json.dumps(verdict.reasons),
                "objective": verdict.objective,
                "decided_at": now,
            }
            insert(con, "gate_decisions", decision)
            if verdict.decision == "promoted":
                reason = "promoted by the gate: " + "; ".join(verdict.reasons)
                _crown(con, config_name, verdict.candidate_id, verdict.objective, champion_path, now, run,
                       reason)

    with_retry(db_path, work)


def _crown(
    con: duckdb.DuckDBPyConnection,
    config_name: str,
    candidate_id: str,
    objective: float | None,
    path: str | None,
    now: datetime,
    run_id: str | None,
    reason: str,
) -> None:
    """End the current champion's reign at ``now`` and start ``candidate_id``'s (nothing when it reigns
    already: a retried write of the same decisions)."""
    current = con.execute(
        "SELECT candidate_id FROM champions WHERE config_name = ? AND until IS NULL", [config_name]
    ).fetchone()
    if current and current[0] == candidate_id:
        return
    con.execute("UPDATE champions SET until = ? WHERE config_name = ? AND until IS NULL", [now, config_name])
    row = {
        "config_name": config_name,
        "candidate_id": candidate_id,
        "objective": objective,
        "path": path,
        "since": now,
        "until": None,
        "run_id": run_id,
        "reason": reason,
    }
    insert(con, "champions", row)


CHAMPION_COLUMNS = ("candidate_id", "objective", "path", "since", "until", "run_id", "reason")


def champion(db_path: Path, config_name: str) -> dict | None:
    """The current champion of a config.

    Returns:
        ``{candidate_id, objective, path, since, until, run_id, reason}`` (``until`` None), or None
        when nothing was promoted yet.
    """
    rows = champion_history(db_path, config_name)
    return rows[-1] if rows and rows[-1]["until"] is None else None


def champion_history(db_path: Path, config_name: str) -> list[dict]:
    """Every champion of a config, oldest first.

    Returns:
        One dict per reign, keys as in `champion`.
    """
    query = f"SELECT {', '.join(CHAMPION_COLUMNS)} FROM champions WHERE config_name = ? ORDER BY since"
    rows = with_retry(db_path, lambda con: con.execute(query, [config_name]).fetchall())
    return [dict(zip(CHAMPION_COLUMNS, row, strict=True)) for row in rows]


def record_rollback(db_path: Path, config_name: str, candidate_id: str, reason: str) -> dict:
    """Make an earlier champion the champion again, and record the rollback as an event.

    Args:
        db_path: the DuckDB file.
        config_name: the pipeline config's name.
        candidate_id: the former champion to restore.
        reason: why (stored with the event and the new reign).

    Returns:
        The new current champion.

    Raises:
        PipelineError: no champion yet, or ``candidate_id`` never held the title, or it holds it now.
    """

    def work(con: duckdb.DuckDBPyConnection) -> None:
        reigns = con.execute(
            f"SELECT {', '.join(CHAMPION_COLUMNS)} FROM champions WHERE config_name = ? ORDER BY since",
            [config_name],
        ).fetchall()
        reigns = [dict(zip(CHAMPION_COLUMNS, row, strict=True)) for row in reigns]
        current = next((r for r in reigns if r["until"] is None), None)
        if current is None:
            raise PipelineError(f"config {config_name!r} has no champion to roll back")
        if candidate_id == current["candidate_id"]:
            raise PipelineError(f"{candidate_id} is already the champion of {config_name!r}")
        former = [r for r in reigns if r["candidate_id"] == candidate_id]
        if not former:
            earlier = ", ".join(dict.fromkeys(r["candidate_id"] for r in reigns if r is not current))
            raise PipelineError(f"{candidate_id} was never champion of {config_name!r}; former champions: "
                                f"{earlier or 'none'}")
        now = _now()
        _crown(con, config_name, candidate_id, former[-1]["objective"], former[-1]["path"], now, None,
               f"rollback: {reason}")
        insert(con, "events", {"config_name": config_name, "happened_at": now, "kind": "rollback",
                               "candidate_id": candidate_id, "previous_id": current["candidate_id"],
                               "reason": reason})

    with_retry(db_path, work)
    return champion(db_path, config_name)


NIGHTS_QUERY = """
WITH nights AS (
    SELECT run_id, min(decided_at) AS decided_at, count(*) AS n_candidates,
           any_value(candidate_id) FILTER (WHERE decision = 'promoted') AS promoted
    FROM gate_decisions WHERE config_name = $config GROUP BY run_id
)
SELECT n.decided_at, n.run_id, n.n_candidates, n.promoted, pc.label,
       (SELECT ch.candidate_id FROM champions ch
        WHERE ch.config_name = $config AND ch.since <= n.decided_at
          AND (ch.until IS NULL OR ch.until > n.decided_at)
        ORDER BY ch.since DESC LIMIT 1) AS champion_after
FROM nights n
LEFT JOIN candidates pc ON pc.config_name = $config AND pc.id = n.promoted
ORDER BY n.decided_at
"""


def nights(db_path: Path, config_name: str) -> list[dict]:
    """One entry per run that judged candidates: when, which run, how many, what it promoted, and
    the champion after it.

    Returns:
        Dicts ``{decided_at, run_id, n_candidates, promoted, promoted_label, champion_after}``,
        oldest first.
    """
    keys = ("decided_at", "run_id", "n_candidates", "promoted", "promoted_label", "champion_after")
    rows = with_retry(
        db_path, lambda con: con.execute(NIGHTS_QUERY, {"config": config_name}).fetchall(), read_only=True
    )
    return [dict(zip(keys, row, strict=True)) for row in rows]


def row_counts(db_path: Path) -> dict[str, int]:
    """Rows per table (for tests and `scf results`).

    Returns:
        table name -> row count.
    """
    tables = tuple(TABLES)

    def work(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
        return {table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in tables}

    return with_retry(db_path, work)


LEADERBOARD_QUERY = """
WITH shown AS (  -- every model of the config, or only those a given flow run wrote
    SELECT c.* FROM candidates c
    WHERE c.config_name = $config AND ($run_id IS NULL OR c.run_id = $run_id)
),
decided AS (  -- each candidate's decision in that run, or its latest one
    SELECT * FROM gate_decisions
    WHERE config_name = $config AND ($run_id IS NULL OR run_id = $run_id)
    QUALIFY row_number() OVER (PARTITION BY candidate_id ORDER BY decided_at DESC) = 1
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
LEFT JOIN decided d ON d.candidate_id = c.id
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


def label_of(db_path: Path, config_name: str, model_id: str) -> str:
    """A model's label (its id when the database does not know it)."""
    row = with_retry(db_path, lambda con: con.execute(
        "SELECT label FROM candidates WHERE config_name = ? AND id = ?", [config_name, model_id]
    ).fetchone())
    return row[0] if row else model_id


def report_models(db_path: Path, config_name: str) -> list[dict]:
    """Every model of a config as the report reads it: id, kind, label, method, params, status, failure.

    Args:
        db_path: the DuckDB file.
        config_name: the pipeline config's name.

    Returns:
        One dict per ``candidates`` row, parents first, then by label.
    """
    query = (
        "SELECT id, kind, label, method, params_json, status, failure FROM candidates"
        " WHERE config_name = ? ORDER BY kind DESC, label"
    )
    rows = with_retry(db_path, lambda con: con.execute(query, [config_name]).fetchall(), read_only=True)
    keys = ("id", "kind", "label", "method", "params", "status", "failure")
    return [dict(zip(keys, (*row[:4], json.loads(row[4]), *row[5:]), strict=True)) for row in rows]


def item_scores(db_path: Path, config_name: str) -> list[tuple[str, str, str, str, float]]:
    """Every per-item score of a config: ``(model_id, benchmark, metric, item_id, score)``, sorted.

    Args:
        db_path: the DuckDB file.
        config_name: the pipeline config's name.

    Returns:
        The ``samples`` rows, ordered by model, benchmark, metric and item.
    """
    query = (
        "SELECT model_id, benchmark, metric, item_id, score FROM samples WHERE config_name = ?"
        " ORDER BY model_id, benchmark, metric, item_id"
    )
    return with_retry(db_path, lambda con: con.execute(query, [config_name]).fetchall(), read_only=True)


def compute_seconds(db_path: Path, config_name: str) -> tuple[float, float]:
    """Seconds a config's models spent merging and evaluating (sums over ``generation_stats``).

    Args:
        db_path: the DuckDB file.
        config_name: the pipeline config's name.

    Returns:
        ``(merge seconds, evaluation seconds)``; 0.0 where nothing is recorded.
    """
    query = (
        "SELECT coalesce(sum(merge_seconds), 0), coalesce(sum(eval_seconds), 0) FROM generation_stats"
        " WHERE config_name = ?"
    )
    row = with_retry(db_path, lambda con: con.execute(query, [config_name]).fetchone(), read_only=True)
    return float(row[0]), float(row[1])


def config_names(db_path: Path) -> list[str]:
    """The config names present in a results database."""
    rows = with_retry(
        db_path,
        lambda con: con.execute("SELECT DISTINCT config_name FROM candidates ORDER BY 1").fetchall(),
        read_only=True,
    )
    return [name for (name,) in rows]
