"""The results database: idempotent writes, two writing processes, a foreign lock retried, leaderboard."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from tasks import results_db as db
from tasks.errors import PipelineError
from tasks.gate import GateDecision


def _model(model_id: str, kind: str = "merge") -> db.ModelRecord:
    source = db.Source(role="base", ref="zoo:base", revision=None, fingerprint="f" * 64)
    return db.ModelRecord(
        id=model_id,
        kind=kind,
        label=f"label-{model_id}",
        method="linear",
        params={"weight": 0.5},
        sources=[source],
        path=f"/tmp/{model_id}",
    )


def _scores(math: float, strings: float = 0.5) -> list[db.ScoreRow]:
    common = dict(
        stderr=0.01,
        n=8,
        n_total=100,
        higher_is_better=True,
        task_version="1",
        backend="transformers",
        gen_params_json="{}",
    )
    return [
        db.ScoreRow(benchmark="math", metric="exact_match", value=math, **common),
        db.ScoreRow(benchmark="strings", metric="exact_match", value=strings, **common),
    ]


def _stats(repetition: float = 0.0, refusal: float | None = 0.9) -> db.GenerationStats:
    return db.GenerationStats(
        repetition_rate=repetition,
        mean_seq_rep_4=0.1,
        truncation_rate=0.0,
        n_generations=16,
        refusal_rate=refusal,
        over_refusal_rate=0.1 if refusal is not None else None,
        eval_seconds=1.5,
    )


def _write_many(db_path: str, prefix: str, n: int) -> None:
    for i in range(n):
        db.write_model_results(
            Path(db_path), "cfg", _model(f"{prefix}{i}"), _scores(i / n), _stats(), run_id=prefix
        )


def test_rerun_replaces_rows_never_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "results.duckdb"
    db.write_model_results(path, "cfg", _model("c1"), _scores(0.3), _stats(), run_id="r1")
    db.write_model_results(path, "cfg", _model("c1"), _scores(0.7), _stats(), run_id="r2")
    assert db.row_counts(path) == {
        "candidates": 1,
        "scores": 2,
        "generation_stats": 1,
        "samples": 0,
        "gate_decisions": 0,
        "champions": 0,
        "events": 0,
    }
    with duckdb.connect(str(path), read_only=True) as con:
        value, run = con.execute("SELECT value, run_id FROM scores WHERE benchmark = 'math'").fetchone()
    assert (value, run) == (0.7, "r2")


def test_every_night_s_decisions_are_kept_and_the_champion_moves(tmp_path: Path) -> None:
    path = tmp_path / "results.duckdb"
    first = GateDecision(candidate_id="c1", decision="promoted", reasons=["ok"], objective=0.5)
    db.write_decisions(path, "cfg", [first], run_id="r1", champion_path="/m/c1")
    second = [
        GateDecision(candidate_id="c1", decision="passed", reasons=["beaten"], objective=0.5),
        GateDecision(candidate_id="c2", decision="promoted", reasons=["ok"], objective=0.6),
    ]
    db.write_decisions(path, "cfg", second, run_id="r2", champion_path="/m/c2")
    assert db.row_counts(path)["gate_decisions"] == 3  # c1 in r1 and in r2, c2 in r2
    db.write_decisions(path, "cfg", second, run_id="r2", champion_path="/m/c2")  # a retried write
    assert db.row_counts(path)["gate_decisions"] == 3
    assert [reign["candidate_id"] for reign in db.champion_history(path, "cfg")] == ["c1", "c2"]
    assert db.champion(path, "cfg")["candidate_id"] == "c2"
    assert db.champion(path, "other") is None


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "results.duckdb"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_write_many, args=(str(path), prefix, 15)) for prefix in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert db.row_counts(path) == {
        "candidates": 30,
        "scores": 60,
        "generation_stats": 30,
        "samples": 0,
        "gate_decisions": 0,
        "champions": 0,
        "events": 0,
    }


def test_a_foreign_lock_is_retried_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "results.duckdb"
    db.write_model_results(path, "cfg", _model("c0"), _scores(0.1), _stats())
    # Another tool (not using our lock file) holds the database open for writing for ~1.5 s.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); "
            "print('held', flush=True); time.sleep(1.5)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    db.write_model_results(path, "cfg", _model("c1"), _scores(0.2), _stats())
    assert holder.wait(timeout=30) == 0
    assert time.monotonic() - started > 0.1  # it had to wait for the holder
    assert db.row_counts(path)["candidates"] == 2


def test_leaderboard_shows_deltas_against_the_parents_mean(tmp_path: Path) -> None:
    path = tmp_path / "results.duckdb"
    db.write_model_results(path, "cfg", _model("p1", "parent"), _scores(0.2, 0.4), _stats())
    db.write_model_results(path, "cfg", _model("p2", "parent"), _scores(0.6, 0.8), _stats())
    db.write_model_results(path, "cfg", _model("c1"), _scores(0.5, 0.5), _stats(repetition=0.25))
    db.write_decisions(
        path, "cfg", [GateDecision(candidate_id="c1", decision="rejected", reasons=["x"])], None, None
    )
    board = {entry["id"]: entry for entry in db.leaderboard(path, "cfg")}
    assert board["c1"]["deltas"]["math.exact_match"] == pytest.approx(0.1)
    assert board["c1"]["deltas"]["strings.exact_match"] == pytest.approx(-0.1)
    assert board["c1"]["decision"] == "rejected" and board["c1"]["reasons"] == ["x"]
    from flows.pipeline_cli import format_leaderboard

    text = format_leaderboard(list(board.values()))
    assert "0.500 (+0.100)" in text and "0.500 (-0.100)" in text and "rejected" in text and "0.250" in text
    assert db.config_names(path) == ["cfg"]


def test_reading_a_missing_database_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="nope.duckdb does not exist"):
        db.leaderboard(tmp_path / "nope.duckdb", "cfg")


def test_the_leaderboard_of_one_run_leaves_out_older_models(tmp_path: Path) -> None:
    path = tmp_path / "results.duckdb"
    db.write_model_results(path, "cfg", _model("old-parent", "parent"), _scores(0.9), _stats(), run_id="r1")
    db.write_model_results(path, "cfg", _model("old-cand"), _scores(0.1), _stats(), run_id="r1")
    db.write_model_results(path, "cfg", _model("parent", "parent"), _scores(0.2), _stats(), run_id="r2")
    db.write_model_results(path, "cfg", _model("cand"), _scores(0.5), _stats(), run_id="r2")
    latest = db.leaderboard(path, "cfg", run_id="r2")
    assert [entry["id"] for entry in latest] == ["parent", "cand"]
    assert latest[1]["deltas"]["math.exact_match"] == pytest.approx(0.3)  # vs this run's parent only
    assert len(db.leaderboard(path, "cfg")) == 4


def test_a_file_written_by_schema_version_1_is_upgraded_in_place(tmp_path: Path) -> None:
    old = tmp_path / "old.duckdb"
    sql = (Path(__file__).parent / "data" / "results_schema_v1.sql").read_text()
    with duckdb.connect(str(old)) as con:
        con.execute(sql)
    assert db.champion(old, "demo")["candidate_id"] == "c1"  # a read-only open upgrades first
    with duckdb.connect(str(old), read_only=True) as con:
        assert con.execute("SELECT version FROM schema_info").fetchall() == [(db.SCHEMA_VERSION,)]
        rows = con.execute("SELECT id, status, failure, run_id FROM candidates ORDER BY id").fetchall()
    assert rows == [("c1", "ok", None, None), ("p-ffff", "ok", None, None)]
    [merge] = [entry for entry in db.leaderboard(old, "demo") if entry["kind"] == "merge"]
    assert merge["scores"] == {"toy_math.exact_match": 0.5} and merge["decision"] == "promoted"
    assert db.row_counts(old) == {
        "candidates": 2, "scores": 2, "generation_stats": 2, "samples": 0, "gate_decisions": 1,
        "champions": 1, "events": 0,
    }
    [reign] = db.champion_history(old, "demo")
    assert (reign["candidate_id"], reign["run_id"], reign["until"]) == ("c1", "run-1", None)
    assert reign["reason"] == "promoted by the gate (before the champion history was kept)"


def test_a_file_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    newer = tmp_path / "new.duckdb"
    with duckdb.connect(str(newer)) as con:
        con.execute("CREATE TABLE schema_info (version INTEGER); INSERT INTO schema_info VALUES (99)")
    with pytest.raises(PipelineError, match=r"has schema version 99, newer than this scf-pipeline's \d+"):
        db.row_counts(newer)
