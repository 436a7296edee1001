"""Pool mode: `nightly` fans candidates out over a Prefect work pool of two process workers.

What docs/deploy.md tells a user to do, on loopback: `prefect server start`, a `process` work pool,
`prefect deploy --all`, two workers started by docker/worker-entrypoint.sh; then `nightly` with
`execution.mode: pool` on the tiny zoo. Every parent evaluation and candidate is its own flow run
under the night's run, both workers take part, and only the night writes DuckDB and gates. Then one
worker is SIGKILLed (with everything it started) while it runs a candidate: the night notices the
silent run, marks it crashed, runs it again on the other worker, and completes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers_prefect import (  # tests/ is on sys.path
    PROCESS_START_S,
    REPO,
    PrefectServer,
    free_port,
    prefect_server_process,
    start_process,
    stop_process,
    wait_healthy,
)
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.settings import PREFECT_API_URL, temporary_settings
from test_pipeline_e2e import write_config

from tasks import results_db
from tasks.config import load_config

pytestmark = pytest.mark.slow
POOL = "scf"
HEARTBEAT_S = 30  # Prefect's minimum flow-run heartbeat interval
FIRST_NIGHT = [
    {"method": "scf_rkl", "params": {"alpha": 1.5}},
    {"method": "linear", "params": {"weight": [0.5, 0.5]}},
    {"method": "ties", "params": {"density": 0.5}},
]
SECOND_NIGHT = [{"method": "dare_linear", "params": {"density": 0.5}}, {"method": "sce"}]


class Workers:
    """Two process workers (w1, w2) on the pool, one flow run at a time each."""

    def __init__(self, server: PrefectServer, root: Path) -> None:
        self.logs = {name: root / f"{name}.log" for name in ("w1", "w2")}
        self.processes = {}
        for name, log in self.logs.items():
            port = free_port()
            env = dict(
                server.env,
                SCF_WORK_POOL=POOL,
                SCF_WORKER_LIMIT="1",
                SCF_WORKER_NAME=name,
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S),
                PREFECT_WORKER_WEBSERVER_HOST="127.0.0.1",
                PREFECT_WORKER_WEBSERVER_PORT=str(port),
            )
            process = start_process(["bash", str(REPO / "docker" / "worker-entrypoint.sh")], env, log)
            self.processes[name] = (process, port)
        for name, (process, port) in self.processes.items():
            wait_healthy(f"http://127.0.0.1:{port}/health", process, self.logs[name], PROCESS_START_S)

    def ran(self, name: str) -> set[str]:
        """Flow run ids the worker took and started (from its log): both workers may try to submit a
        run; the server lets one have it and tells the other to abort."""
        lines = self.logs[name].read_text(errors="replace").splitlines()
        submitted = _ids_after(lines, f"Worker '{name}' submitting flow run '")
        return submitted - _ids_after(lines, "Aborted submission of flow run '")

    def wait_until_running_a_step(self, name: str, deadline: float) -> None:
        """Wait until the worker's flow run has a merge or evaluation child (on a busy machine the
        flow-run process starts seconds after the worker logs its submission)."""
        root = psutil.Process(self.processes[name][0].pid)
        while time.monotonic() < deadline:
            for member in root.children(recursive=True):
                try:
                    if member.environ().get("SCF_STEP_LABEL"):
                        return
                except psutil.Error:
                    continue
            time.sleep(0.2)

    def kill(self, name: str) -> None:
        """SIGKILL a worker and every process it started, as when its machine dies."""
        root = psutil.Process(self.processes[name][0].pid)
        for member in [root, *root.children(recursive=True)]:
            member.kill()

    def stop(self) -> None:
        for process, _ in self.processes.values():
            stop_process(process)


def _ids_after(lines: list[str], marker: str) -> set[str]:
    return {line.split(marker, 1)[1].split("'")[0] for line in lines if marker in line}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, tiny_zoo: Path) -> Iterator[tuple[PrefectServer, Workers]]:
    root = tmp_path_factory.mktemp("pool")
    with prefect_server_process(root / "prefect-home") as server:
        server.cli("work-pool", "create", POOL, "--type", "process")
        server.cli("--no-prompt", "deploy", "--all")
        workers = Workers(server, root)
        try:
            yield server, workers
        finally:
            workers.stop()


def _config(root: Path, candidates: list[dict]) -> Path:
    execution = {"mode": "pool", "work_pool": POOL, "max_parallel": 2, "retries": 1,
                 "heartbeat_timeout_s": 2.5 * HEARTBEAT_S}
    return write_config(root, name="pool", candidates=candidates, execution=execution)


def _children(night_run_id: str) -> list:
    async def read() -> list:
        async with get_client() as client:
            parent = FlowRunFilterParentFlowRunId(any_=[night_run_id])
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))

    return asyncio.run(read())


@pytest.fixture(scope="module")
def first_night(pool: tuple[PrefectServer, Workers], tmp_path_factory: pytest.TempPathFactory) -> dict:
    from flows.nightly import nightly

    server, workers = pool
    root = tmp_path_factory.mktemp("night")
    config_path = _config(root, FIRST_NIGHT)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        summary = nightly(config_path=str(config_path))
        children = _children(summary["flow_run_id"])
    return {"root": root, "config_path": config_path, "summary": summary, "children": children}


def test_every_model_is_its_own_flow_run_under_the_night(first_night: dict) -> None:
    children = first_night["children"]
    models = ["base", "secondary_0", *(cand["label"] for cand in first_night["summary"]["candidates"])]
    stem = first_night["config_path"].stem
    assert sorted(run.name for run in children) == sorted(f"merge-and-evaluate-{stem}-{m}" for m in models)
    assert all(run.state.is_completed() for run in children), [(r.name, r.state) for r in children]
    assert {run.parameters["store"] for run in children} == {False}


def test_both_workers_ran_at_least_one(first_night: dict, pool: tuple[PrefectServer, Workers]) -> None:
    _, workers = pool
    ids = {str(run.id) for run in first_night["children"]}
    w1, w2 = workers.ran("w1") & ids, workers.ran("w2") & ids
    assert w1 and w2 and not (w1 & w2) and w1 | w2 == ids


def test_the_night_alone_wrote_duckdb_and_promoted_one(first_night: dict) -> None:
    summary = first_night["summary"]
    config = load_config(first_night["config_path"])
    entries = {entry["label"]: entry for entry in results_db.leaderboard(config.duckdb_path, "pool")}
    for cand in summary["candidates"]:
        assert cand["status"] == "ok" and cand["decision"] in {"promoted", "passed", "rejected"}
        assert entries[cand["label"]]["scores"], cand["label"]
        assert entries[cand["label"]]["decision"] == cand["decision"]
    assert [c["decision"] for c in summary["candidates"]].count("promoted") == 1
    assert summary["champion"] == summary["promoted"]
    counts = results_db.row_counts(config.duckdb_path)
    assert counts["candidates"] == len(FIRST_NIGHT) + 2 and counts["gate_decisions"] == len(FIRST_NIGHT)


def test_a_night_survives_a_worker_killed_mid_candidate(
    first_night: dict, pool: tuple[PrefectServer, Workers]
) -> None:
    """The second night's parents are cached: its two candidates are its only pool runs. w1 is killed
    as soon as it takes one; that run goes silent, is marked crashed and runs again on w2."""
    import threading

    from flows.nightly import nightly

    server, workers = pool
    before = workers.ran("w1")
    config_path = _config(first_night["root"], SECOND_NIGHT)
    killed: list[str] = []

    def kill_w1_when_busy() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not (new := workers.ran("w1") - before):
            time.sleep(0.2)
        if new:
            workers.wait_until_running_a_step("w1", deadline)  # not just submitted: really started
            workers.kill("w1")
            killed.extend(new)

    killer = threading.Thread(target=kill_w1_when_busy, daemon=True)
    killer.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        summary = nightly(config_path=str(config_path))
        children = _children(summary["flow_run_id"])
    killer.join(timeout=10)
    assert killed, "w1 never took a run of the second night"
    by_id = {str(run.id): run for run in children}
    [lost] = [by_id[run_id] for run_id in killed]
    assert lost.state.is_crashed() and lost.state.message.startswith("no heartbeat for ")
    assert lost.state.message.endswith(" s: its worker was lost")
    candidate = lost.parameters["candidate"]
    retried = [run for run in children if run.parameters.get("candidate") == candidate and run.id != lost.id]
    assert len(retried) == 1 and retried[0].state.is_completed()
    assert str(retried[0].id) in workers.ran("w2")
    assert [cand["status"] for cand in summary["candidates"]] == ["ok", "ok"]
    assert all(cand["decision"] in {"promoted", "passed", "rejected"} for cand in summary["candidates"])
