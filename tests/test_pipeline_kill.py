"""A nightly run killed mid-merge (SIGKILL) leaves no partial model nor orphan rows; the rerun completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness
from test_pipeline_e2e import write_config  # tests/ is on sys.path (pytest rootdir conftest)

from tasks import results_db
from tasks.config import load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_server():
    """A temporary Prefect server the killed subprocess and the rerun both report to."""
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def _kill_mid_merge(config_path: Path, candidates_dir: Path, api_url: str, log: Path) -> None:
    """Start `scf nightly` in a subprocess and SIGKILL it while a merge's temporary directory exists."""
    env = {**os.environ, "PREFECT_API_URL": api_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "nightly", "--config", str(config_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if candidates_dir.exists() and any(".scf-tmp-" in p.name for p in candidates_dir.iterdir()):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return
            time.sleep(0.002)
        tail = log.read_text()[-3000:]
        pytest.fail(f"no merge in progress was seen (exit code {proc.poll()}); log tail:\n{tail}")
    finally:
        if proc.poll() is None:
            proc.kill()


def _orphans(db_path: Path) -> dict[str, int]:
    """Rows that point at nothing, or models missing their scores or stats."""
    checks = {
        "candidates without stats": "SELECT count(*) FROM candidates c WHERE NOT EXISTS "
        "(SELECT 1 FROM generation_stats g WHERE g.model_id = c.id AND g.config_name = c.config_name)",
        "candidates without scores": "SELECT count(*) FROM candidates c WHERE NOT EXISTS "
        "(SELECT 1 FROM scores s WHERE s.model_id = c.id AND s.config_name = c.config_name)",
        "scores without candidate": "SELECT count(*) FROM scores s WHERE NOT EXISTS "
        "(SELECT 1 FROM candidates c WHERE c.id = s.model_id AND c.config_name = s.config_name)",
        "decisions without candidate": "SELECT count(*) FROM gate_decisions d WHERE NOT EXISTS "
        "(SELECT 1 FROM candidates c WHERE c.id = d.candidate_id AND c.config_name = d.config_name)",
    }
    if not db_path.exists():
        return {}
    with duckdb.connect(str(db_path), read_only=True) as con:
        return {name: n for name, query in checks.items() if (n := con.execute(query).fetchone()[0])}


def test_a_killed_run_leaves_no_partial_model_and_the_rerun_completes(
    tiny_zoo: Path, prefect_server: str, tmp_path: Path
) -> None:
    from flows.nightly import nightly

    config_path = write_config(tmp_path, name="kill", keep_candidates=True)
    config = load_config(config_path)
    candidates_dir = config.workdir / "candidates"
    _kill_mid_merge(config_path, candidates_dir, prefect_server, tmp_path / "killed-run.log")

    # Killed: every model directory at its final name is complete; the rest is a hidden temporary.
    for path in candidates_dir.iterdir():
        assert path.name.startswith(".") or (path / "merge_report.json").is_file(), path
    assert _orphans(config.duckdb_path) == {}

    summary = nightly(config_path=str(config_path))
    assert len(summary["candidates"]) == 3
    assert all(c["decision"] in {"promoted", "passed", "rejected"} for c in summary["candidates"])
    leftovers = [p.name for p in candidates_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    kept = sorted(p.name for p in candidates_dir.iterdir())
    assert kept == sorted(c["id"] for c in summary["candidates"])  # keep_candidates: all complete
    assert all((candidates_dir / name / "merge_report.json").is_file() for name in kept)
    assert _orphans(config.duckdb_path) == {}
    counts = results_db.row_counts(config.duckdb_path)
    assert counts["candidates"] == 5 and counts["gate_decisions"] == 3
