"""Whole nights under faults, on the tiny zoo with real child processes, Prefect, MLflow and DuckDB.

- A night SIGKILLed during an evaluation, and another during a DuckDB write: the rerun completes,
  reuses what finished, leaves no duplicate or orphan row, and decides as an uninterrupted night.
- Two nights at once on the same DuckDB file and MLflow store: both finish, every row of both there.
- Secrets: a night run with a recognisable fake HF token and MLflow password in the environment, and a
  token from a Prefect Secret block, writes neither anywhere (files, DuckDB rows, MLflow, Prefect logs
  and flow-run parameters).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import psutil
import pytest
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness
from test_pipeline_e2e import write_config  # tests/ is on sys.path
from test_pipeline_kill import _orphans

from tasks import results_db
from tasks.config import load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CANDIDATES = [{"method": "scf_rkl", "params": {"alpha": 0.5}}]
FAKE_TOKEN = "hf_scfFAKEtoken0123456789abcdef"
FAKE_PASSWORD = "mlflowFAKEpassword0123456789"
BLOCK_TOKEN = "hf_scfFAKEsecretBLOCK987654321"


@pytest.fixture(scope="module")
def server(tiny_zoo: Path):
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def _config(root: Path, name: str, **changes) -> Path:
    return write_config(root, name=name, candidates=CANDIDATES, **changes)


def _decisions(path: Path) -> dict[str, str]:
    config = load_config(path)
    rows = results_db.with_retry(config.duckdb_path, lambda con: con.execute(
        "SELECT c.label, d.decision FROM gate_decisions d JOIN candidates c ON c.id = d.candidate_id "
        "AND c.config_name = d.config_name WHERE d.config_name = ?", [config.name]).fetchall(),
        read_only=True)
    return dict(rows)


STARTED: list[psutil.Popen] = []


@pytest.fixture(autouse=True)
def _no_night_outlives_its_test():
    """A failed test must not leave a night (and its children) eating the CPU of the tests after it."""
    yield
    while STARTED:
        night = STARTED.pop()
        if night.is_running():
            for process in [*night.children(recursive=True), night]:
                with contextlib.suppress(psutil.Error):
                    process.kill()


def _night_process(config: Path, api_url: str, **env: str) -> psutil.Popen:
    """`scf nightly` in a subprocess against the test server; its output in ``<config>.log``."""
    with config.with_suffix(".log").open("wb") as log:
        night = psutil.Popen([sys.executable, "-m", "flows.cli", "nightly", "--config", str(config)],
                             cwd=REPO, env={**os.environ, "PREFECT_API_URL": api_url, **env},
                             stdout=log, stderr=subprocess.STDOUT)
    STARTED.append(night)
    return night


def _tail(config: Path) -> str:
    return config.with_suffix(".log").read_text(errors="replace")[-3000:]


def _wait_for(predicate, process: psutil.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            pytest.fail(f"the night ended (code {process.returncode}) before the fault point")
        time.sleep(0.05)
    pytest.fail("the fault point was never reached")


@pytest.fixture(scope="module")
def uninterrupted(server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference night, run with fake credentials in its environment (the secrets test reads it)."""
    from prefect.blocks.system import Secret

    from flows.nightly import nightly

    root = tmp_path_factory.mktemp("reference")
    Secret(value=BLOCK_TOKEN).save("scf-test-hf-token", overwrite=True)
    path = _config(root, "faults", secrets={"HF_TOKEN": "scf-test-hf-token"})
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("HF_TOKEN", raising=False)  # the night sets it from the block: restored after
        patch.setenv("MLFLOW_TRACKING_PASSWORD", FAKE_PASSWORD)
        patch.setenv("HUGGING_FACE_HUB_TOKEN", FAKE_TOKEN)
        summary = nightly(config_path=str(path))
    return {"root": root, "config": path, "summary": summary, "decisions": _decisions(path)}


def test_a_night_killed_during_an_evaluation_reruns_to_the_same_verdict(
    server: str, uninterrupted: dict, tmp_path: Path
) -> None:
    from flows.nightly import nightly

    path = _config(tmp_path, "faults")
    night = _night_process(path, server)

    def candidate_evaluating() -> bool:
        for child in night.children(recursive=True):
            try:
                if "eval" in child.cmdline() and child.environ().get("SCF_STEP_LABEL") == "scf_rkl":
                    return True
            except psutil.Error:
                continue
        return False

    _wait_for(candidate_evaluating, night)
    night.send_signal(signal.SIGKILL)
    night.wait(timeout=60)
    summary = nightly(config_path=str(path))
    [candidate] = summary["candidates"]
    assert (candidate["merge_cached"], candidate["eval_cached"]) == (True, False)  # the merge finished
    assert _decisions(path) == uninterrupted["decisions"] == {"scf_rkl": "promoted"}
    assert _orphans(load_config(path).duckdb_path) == {}
    assert results_db.row_counts(load_config(path).duckdb_path)["candidates"] == 3


def test_a_night_killed_during_a_duckdb_write_reruns_to_the_same_verdict(
    server: str, uninterrupted: dict, tmp_path: Path
) -> None:
    from flows.nightly import nightly

    path = _config(tmp_path, "faults")
    marker = tmp_path / "duckdb.marker"
    night = _night_process(path, server, SCF_FAULT_PAUSE="duckdb_write", SCF_FAULT_MARKER=str(marker))
    _wait_for(marker.exists, night)  # inside the transaction storing the first parent's results
    night.send_signal(signal.SIGKILL)
    night.wait(timeout=60)
    marker.unlink()
    db = load_config(path).duckdb_path
    assert results_db.row_counts(db)["candidates"] == 0  # the open transaction was never committed
    summary = nightly(config_path=str(path))
    assert summary["candidates"][0]["decision"] == "promoted"
    assert _decisions(path) == uninterrupted["decisions"]
    assert _orphans(db) == {}
    counts = results_db.row_counts(db)
    assert (counts["candidates"], counts["gate_decisions"], counts["champions"]) == (3, 1, 1)


def test_two_nights_at_once_on_one_database_keep_every_row(server: str, tmp_path: Path) -> None:
    shared = {"duckdb": str(tmp_path / "shared.duckdb"), "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    paths = []
    for name in ("night-a", "night-b"):
        root = tmp_path / name
        root.mkdir()
        paths.append(_config(root, name, storage={"workdir": str(root / "work"), **shared}))
    nights = [_night_process(path, server) for path in paths]
    codes = [night.wait(timeout=900) for night in nights]
    assert codes == [0, 0], "\n\n".join(_tail(path) for path in paths)
    with duckdb.connect(shared["duckdb"], read_only=True) as con:
        rows = con.execute("SELECT config_name, count(*) FROM candidates GROUP BY 1 ORDER BY 1").fetchall()
        decisions = con.execute(
            "SELECT config_name, count(*) FROM gate_decisions GROUP BY 1 ORDER BY 1").fetchall()
        duplicates = con.execute(
            "SELECT count(*) FROM (SELECT config_name, model_id, benchmark, metric, item_id "
            "FROM samples GROUP BY ALL HAVING count(*) > 1)").fetchone()[0]
    assert rows == [("night-a", 3), ("night-b", 3)] and decisions == [("night-a", 1), ("night-b", 1)]
    assert duplicates == 0
    with sqlite3.connect(tmp_path / "mlflow.db") as mlflow:
        experiments = {name for (name,) in mlflow.execute("SELECT name FROM experiments")}
    assert {"night-a", "night-b"} <= experiments


def test_no_secret_appears_anywhere(server: str, uninterrupted: dict) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    secrets = (FAKE_TOKEN, FAKE_PASSWORD, BLOCK_TOKEN)
    root = uninterrupted["root"]
    files = [path for path in root.rglob("*") if path.is_file()]
    assert len(files) > 20  # models, logs, MLflow artifacts, the DuckDB and MLflow stores
    leaks = [str(path) for path in files for secret in secrets if secret.encode() in path.read_bytes()]
    assert leaks == []
    db = load_config(uninterrupted["config"]).duckdb_path
    with duckdb.connect(str(db), read_only=True) as con:
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            text = str(con.execute(f"SELECT * FROM {table}").fetchall())
            assert not any(secret in text for secret in secrets), table

    async def prefect_records() -> str:
        run_id = uninterrupted["summary"]["flow_run_id"]
        async with get_client() as client:
            run = await client.read_flow_run(run_id)
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        return str(run.parameters) + "\n".join(log.message for log in logs)

    records = asyncio.run(prefect_records())
    assert "HF_TOKEN taken from Prefect Secret block 'scf-test-hf-token'" in records
    assert not any(secret in records for secret in secrets)
