"""One candidate's failure is recorded, never fatal to the night.

On the tiny zoo with real child processes: one candidate's merge child is SIGKILLed mid-merge (from
outside, as the out-of-memory killer would), one candidate's evaluation raises, one merge hangs past
`merge.timeout_s`. Each ends `failed` with its reason (DuckDB, the gate decision, MLflow with the
child's log, the Prefect verdict artifact), the healthy candidate is judged and promoted, and a rerun
retries only the failed ones. A parent that cannot be evaluated, or a night where no candidate could
be judged, makes `scf nightly` exit 1.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from prefect import get_client
from prefect.testing.utilities import prefect_test_harness
from test_pipeline_e2e import write_config  # tests/ is on sys.path

from tasks import results_db, tracking
from tasks.config import load_config

pytestmark = pytest.mark.slow
CANDIDATES = [
    {"method": "scf_rkl", "params": {"alpha": 1.5}},
    {"method": "linear", "params": {"weight": [0.5, 0.5]}},  # merge child SIGKILLed mid-merge
    {"method": "ties", "params": {"density": 0.5}},  # evaluation raises
    {"method": "task_arithmetic"},  # merge hangs until merge.timeout_s
]
FAULTS = "eval:ties=raise;merge:task_arithmetic=hang"
MERGE_TIMEOUT_S = 40


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


class MergeKiller:
    """SIGKILLs the merge child of one candidate once it has started writing its output."""

    def __init__(self, label: str, models_dir: Path) -> None:
        self.label, self.models_dir, self.killed = label, models_dir, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _find(self) -> psutil.Process | None:
        for process in psutil.process_iter(["cmdline"]):
            try:
                if "merge" in (process.info["cmdline"] or []) and \
                        process.environ().get("SCF_STEP_LABEL") == self.label:
                    return process
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return None

    def _run(self) -> None:
        while not self._stop.is_set() and (target := self._find()) is None:
            time.sleep(0.05)
        while not self._stop.is_set() and target.is_running():
            if self.models_dir.is_dir() and any(".scf-tmp-" in p.name for p in self.models_dir.iterdir()):
                target.kill()
                self.killed = True
                return
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def nights(tiny_zoo: Path, prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A night with three failing candidates, then a rerun without faults."""
    from flows.nightly import nightly

    root = tmp_path_factory.mktemp("failures")
    config_path = write_config(root, name="failures", candidates=CANDIDATES, keep_candidates=True)
    raw = yaml.safe_load(config_path.read_text())
    raw["merge"]["timeout_s"] = MERGE_TIMEOUT_S
    config_path.write_text(yaml.safe_dump(raw))
    config = load_config(config_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SCF_FAULT_INJECT", FAULTS)
        killer = MergeKiller("linear", config.models_dir)
        try:
            first = nightly(config_path=str(config_path))
        finally:
            killer.stop()
    rows = _rows(config.duckdb_path, "SELECT label, status, failure FROM candidates WHERE kind = 'merge'")
    left = sorted(path.name for path in config.models_dir.iterdir())
    second = nightly(config_path=str(config_path))
    return {"root": root, "config": config, "config_path": config_path, "first": first, "second": second,
            "killed": killer.killed, "rows_first": rows, "models_after_first": left}


def _rows(db: Path, query: str) -> list[tuple]:
    return results_db.with_retry(db, lambda con: con.execute(query).fetchall(), read_only=True)


def _by_label(summary: dict) -> dict[str, dict]:
    return {c["label"]: c for c in summary["candidates"]}


def test_each_failure_is_recorded_with_its_step_and_reason(nights: dict) -> None:
    assert nights["killed"], "the linear merge was never seen writing"
    first = _by_label(nights["first"])
    assert first["linear"]["status"] == "failed"
    assert first["linear"]["failure"] == (
        "merge of linear: killed by SIGKILL (out of memory, or killed from outside)"
    )
    assert first["ties"]["failure"] == (
        "evaluate of ties: exited with code 1; last line: RuntimeError: injected fault in eval of ties"
    )
    assert first["task_arithmetic"]["failure"].startswith("merge of task_arithmetic: timed out after ")
    assert first["task_arithmetic"]["failure"].endswith(f"s (timeout {MERGE_TIMEOUT_S} s); killed")
    for label in ("linear", "ties", "task_arithmetic"):
        assert first[label]["decision"] == "rejected"
        assert first[label]["reasons"] == [f"failed: {first[label]['failure']}"]
    assert sorted(nights["rows_first"]) == sorted(
        (label, cand["status"], cand["failure"]) for label, cand in first.items()
    )


def test_the_healthy_candidate_is_judged_and_promoted(nights: dict) -> None:
    first = _by_label(nights["first"])
    assert first["scf_rkl"]["status"] == "ok"
    assert first["scf_rkl"]["decision"] == "promoted"
    assert nights["first"]["promoted"] == first["scf_rkl"]["id"]
    # keep_candidates: the merged ones stay; the killed and the hung merge left nothing at their
    # destination (the killed one a hidden temporary directory, which the rerun removes)
    complete = [name for name in nights["models_after_first"] if not name.startswith(".")]
    assert complete == sorted([first["scf_rkl"]["id"], first["ties"]["id"]])
    assert [name for name in nights["models_after_first"] if name.startswith(".")] in (
        [], [name for name in nights["models_after_first"] if name.startswith(f".{first['linear']['id']}.")]
    )
    assert not [path for path in nights["config"].models_dir.iterdir() if path.name.startswith(".")]


def test_mlflow_has_a_failed_run_with_the_child_s_log(nights: dict) -> None:
    config = nights["config"]
    client = tracking.client(config.mlflow_uri)
    parent = nights["first"]["mlflow_run_id"]
    runs = client.search_runs(
        [client.get_experiment_by_name("failures").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.kind = 'merge'",
    )
    by_name = {run.info.run_name: run for run in runs}
    assert by_name["ties"].info.status == "FAILED"
    assert by_name["ties"].data.tags["gate.decision"] == "rejected"
    assert by_name["ties"].data.tags["failure"].startswith("evaluate of ties:")
    log = Path(client.download_artifacts(by_name["ties"].info.run_id, "failure.log", str(nights["root"])))
    text = log.read_text()
    assert text.startswith("evaluate of ties: exited with code 1")
    assert "RuntimeError: injected fault in eval of ties" in text and "Traceback" in text
    assert by_name["scf_rkl"].info.status == "FINISHED"


def test_the_prefect_run_shows_the_verdict(nights: dict) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> str:
        first_run = ArtifactFilterFlowRunId(any_=[nights["first"]["flow_run_id"]])
        run_filter = ArtifactFilter(flow_run_id=first_run)
        async with get_client() as client:
            [artifact] = await client.read_artifacts(artifact_filter=run_filter)
            assert artifact.key == "verdict-failures" and artifact.type == "markdown"
            return artifact.data

    markdown = asyncio.run(read())
    assert "## failures: promoted `scf_rkl`" in markdown
    assert "| linear |" in markdown and "**FAILED**" in markdown
    assert "failed: merge of linear: killed by SIGKILL" in markdown


def test_a_rerun_retries_only_the_failed_candidates(nights: dict) -> None:
    second = _by_label(nights["second"])
    assert all(cand["status"] == "ok" for cand in second.values()), second
    assert (second["scf_rkl"]["merge_cached"], second["scf_rkl"]["eval_cached"]) == (True, True)
    for label in ("linear", "task_arithmetic"):
        assert (second[label]["merge_cached"], second[label]["eval_cached"]) == (False, False)
    assert (second["ties"]["merge_cached"], second["ties"]["eval_cached"]) == (True, False)
    assert {cand["decision"] for cand in second.values()} <= {"promoted", "passed", "rejected"}
    counts = results_db.row_counts(nights["config"].duckdb_path)
    assert counts["candidates"] == len(CANDIDATES) + 2


def test_scf_nightly_exits_1_when_a_parent_fails(
    nights: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cli import main

    raw = yaml.safe_load(nights["config_path"].read_text())
    raw["eval"]["limit"] = 2  # a new evaluation spec: the parents are evaluated again
    raw["candidates"] = [CANDIDATES[0]]
    path = nights["root"] / "parent-fails.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("SCF_FAULT_INJECT", "eval:base=math=raise")
    assert main(["nightly", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: parent base=math could not be evaluated, so nothing can be gated: "
                          "evaluate of base=math: exited with code 1; last line: RuntimeError: injected")


def test_scf_nightly_exits_0_with_failures_and_1_when_none_could_be_judged(
    nights: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cli import main

    raw = yaml.safe_load(nights["config_path"].read_text())
    raw["candidates"] = [CANDIDATES[0], {"method": "dare_linear", "params": {"density": 0.5}}]
    path = nights["root"] / "one-fails.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("SCF_FAULT_INJECT", "eval:dare_linear=raise")
    assert main(["nightly", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Failed: 1 of 2 candidates (the others were judged):" in out
    assert "dare_linear (" in out and "evaluate of dare_linear: exited with code 1" in out

    raw["candidates"] = [{"method": "dare_linear", "params": {"density": 0.5}}]
    path.write_text(yaml.safe_dump(raw))
    assert main(["nightly", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1].startswith(
        "error: no candidate could be judged: all 1 failed (evaluate of dare_linear: exited with code 1"
    )
    assert "Leaderboard: failures" in captured.out and "FAILED" in captured.out
