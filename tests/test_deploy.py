"""Deployments: prefect.yaml on a real Prefect server, and the docker-compose stack's shape.

The slow test does what docs/deploy.md tells a user to do, on loopback with a private
PREFECT_HOME: `prefect server start`, `prefect work-pool create`, `prefect deploy --all` from
the checkout, the worker started by docker/worker-entrypoint.sh (the compose worker's command),
then a run of the on-demand deployment triggered through the API, on the tiny toy zoo.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers_prefect import (  # tests/ is on sys.path
    PROCESS_START_S,
    REPO,
    VENV_BIN,
    PrefectServer,
    free_port,
    prefect_server_process,
    start_process,
    stop_process,
    wait_healthy,
)
from prefect import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks import results_db

POOL = "scf"  # the process pool prefect.yaml's deployments target
RUN_TIMEOUT_S = 600  # generous: each evaluation child pays torch, transformers and lm-eval imports


def _load_yaml(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


# ---------------------------------------------------------------------------------------------
# prefect.yaml, docker-compose.yml, Dockerfile: what a user relies on before running anything
# ---------------------------------------------------------------------------------------------


def test_prefect_yaml_has_nightly_cron_and_on_demand_deployments() -> None:
    deployments = {d["name"]: d for d in _load_yaml("prefect.yaml")["deployments"]}

    assert set(deployments) == {"nightly", "merge-and-evaluate"}
    assert deployments["nightly"]["entrypoint"] == "flows/nightly.py:nightly"
    assert deployments["merge-and-evaluate"]["entrypoint"] == "flows/merge_eval.py:merge_and_evaluate"
    assert deployments["nightly"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert deployments["merge-and-evaluate"]["schedules"] == []
    for deployment in deployments.values():
        assert deployment["work_pool"]["name"] == POOL
        config = deployment["parameters"]["config_path"]
        assert config.startswith("configs/") and (REPO / config).is_file(), config


def test_compose_services_wait_for_healthy_dependencies() -> None:
    services = _load_yaml("docker-compose.yml")["services"]

    assert set(services) == {"postgres", "prefect-server", "mlflow", "worker"}
    for name, service in services.items():
        assert service["healthcheck"]["test"], f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"
    assert services["prefect-server"]["depends_on"].keys() == {"postgres"}
    assert services["mlflow"]["depends_on"].keys() == {"postgres"}
    assert services["worker"]["depends_on"].keys() == {"prefect-server", "mlflow"}


def test_compose_stores_live_in_postgres_and_the_worker_gets_the_gpus() -> None:
    services = _load_yaml("docker-compose.yml")["services"]

    database_url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert database_url.startswith("postgresql+asyncpg://") and "@postgres:5432/prefect" in database_url
    mlflow_args = services["mlflow"]["command"]
    assert "--serve-artifacts" in mlflow_args
    backend = [arg for arg in mlflow_args if arg.startswith("--backend-store-uri=")]
    assert len(backend) == 1 and backend[0].startswith("--backend-store-uri=postgresql://")
    assert backend[0].endswith("@postgres:5432/mlflow")
    assert any(volume.endswith(":/mlartifacts") for volume in services["mlflow"]["volumes"])

    worker = services["worker"]
    assert worker["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["environment"]["SCF_WORK_POOL"] == POOL
    gpus = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # Published ports stay on the host's loopback.
    for service in services.values():
        assert all(port.startswith("127.0.0.1:") for port in service.get("ports", []))


def test_docker_pool_variant_uses_the_compose_image_network_and_volumes() -> None:
    compose = _load_yaml("docker-compose.yml")
    pool = _load_yaml("prefect.yaml")["definitions"]["work_pools"]["gpu_docker"]["job_variables"]

    project = compose["name"]
    assert pool["image"] == compose["services"]["worker"]["image"]
    assert pool["networks"] == [f"{project}_default"]
    for volume in pool["volumes"]:
        assert volume.split(":")[0].removeprefix(f"{project}_") in compose["volumes"], volume


def _compose_cli() -> list[str] | None:
    """`docker compose` (plugin) or `docker-compose` (standalone), whichever works here."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_docker_compose_config_validates() -> None:
    # Client-side validation against the Compose spec; needs no Docker engine.
    compose = _compose_cli()
    if compose is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = subprocess.run(
        [*compose, "-f", "docker-compose.yml", "config", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(maxsplit=1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_copies_existing_files_and_runs_the_worker_entrypoint() -> None:
    instructions = _dockerfile_instructions()
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}

    for sources in (shlex.split(args)[:-1] for kind, args in instructions if kind == "COPY"):
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies missing path {source}"
            assert source.rstrip("/") not in ignored, f".dockerignore drops {source}"
    installs = [args for kind, args in instructions if kind == "RUN" and "pip install" in args]
    assert any('".[vllm,evals]"' in args for args in installs)  # GPU backend + lm-eval task extras
    copies = dict(shlex.split(args)[-2:] for kind, args in instructions if kind == "COPY")
    assert copies["docker/worker-entrypoint.sh"] == "/usr/local/bin/scf-worker"
    assert ("CMD", '["scf-worker"]') in instructions


def _run_worker_entrypoint(**env: str) -> subprocess.CompletedProcess:
    base = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    base["PATH"] = f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}"
    return subprocess.run(
        ["bash", str(REPO / "docker" / "worker-entrypoint.sh")],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_worker_entrypoint_needs_an_api_url() -> None:
    result = _run_worker_entrypoint()

    assert result.returncode != 0
    assert "set PREFECT_API_URL to the Prefect server API" in result.stderr


def test_worker_entrypoint_gives_up_on_an_unreachable_api() -> None:
    api_url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there

    result = _run_worker_entrypoint(PREFECT_API_URL=api_url, SCF_API_WAIT_S="1")

    assert result.returncode == 1
    assert f"error: Prefect API {api_url} not healthy after 1 s" in result.stderr


# ---------------------------------------------------------------------------------------------
# A real Prefect server on loopback
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    with prefect_server_process(tmp_path_factory.mktemp("prefect-home")) as server:
        yield server


def _api(api_url: str):
    """Prefect settings that point this process's client at `api_url`."""
    return temporary_settings(updates={PREFECT_API_URL: api_url})


async def _deployments_by_name() -> dict[str, object]:
    async with get_client() as client:
        return {deployment.name: deployment for deployment in await client.read_deployments()}


async def _global_concurrency_limit(name: str) -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(name)).limit


def _check_deployments(deployments: dict) -> None:
    """What `prefect deploy --all` made of prefect.yaml: names, schedule, typed parameters, pull step."""
    assert set(deployments) == {"nightly", "merge-and-evaluate"}
    nightly, on_demand = deployments["nightly"], deployments["merge-and-evaluate"]
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 2 * * *", "UTC")]
    assert on_demand.schedules == []
    assert "candidate" in on_demand.parameter_openapi_schema["properties"]
    for deployment in deployments.values():
        # The UI renders its run form from this schema.
        fields = deployment.parameter_openapi_schema["properties"]
        assert fields["config_path"]["type"] == "string"
        assert deployment.parameters == {"config_path": "configs/demo.yaml"}
        assert deployment.work_pool_name == POOL
        directory = {"directory": str(REPO)}
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": directory}]


def _cheap_config(tmp_path: Path) -> Path:
    """configs/demo.yaml cut to one scf_rkl candidate and a few samples, its stores under `tmp_path`."""
    config = _load_yaml("configs/demo.yaml")
    config["name"] = "deploy-test"
    config["candidates"] = [{"method": "scf_rkl"}]
    config["eval"]["limit"] = 4
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config["storage"] = {"workdir": str(tmp_path / "work"), "mlflow_uri": mlflow_uri}
    path = tmp_path / "deploy-test.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow
def test_on_demand_deployment_runs_on_a_worker_to_completion(
    prefect_server: PrefectServer, tiny_zoo: Path, tmp_path: Path
) -> None:
    server = prefect_server
    server.cli("work-pool", "create", POOL, "--type", "process")
    # The worker starts (docker/worker-entrypoint.sh, as in docker-compose) while we deploy.
    health_port = free_port()
    worker_env = dict(
        server.env,
        SCF_WORK_POOL=POOL,
        SCF_WORKER_LIMIT="1",
        SCF_GPU_SLOTS="1",  # the optional server-wide limit
        PREFECT_WORKER_WEBSERVER_HOST="127.0.0.1",
        PREFECT_WORKER_WEBSERVER_PORT=str(health_port),
    )
    worker_log = tmp_path / "worker.log"
    worker = start_process(["bash", str(REPO / "docker" / "worker-entrypoint.sh")], worker_env, worker_log)
    try:
        server.cli("--no-prompt", "deploy", "--all")
        with _api(server.api_url):
            deployments = asyncio.run(_deployments_by_name())
        _check_deployments(deployments)

        wait_healthy(f"http://127.0.0.1:{health_port}/health", worker, worker_log, PROCESS_START_S)
        config = _cheap_config(tmp_path)
        with _api(server.api_url):
            assert asyncio.run(_global_concurrency_limit("gpu")) == 1
            flow_run = run_deployment(
                deployments["merge-and-evaluate"].id,
                parameters={"config_path": str(config), "candidate": "scf_rkl"},
                timeout=RUN_TIMEOUT_S,
                poll_interval=1,
            )
        assert flow_run.state is not None and flow_run.state.is_completed(), (
            f"flow run ended {flow_run.state}\n{worker_log.read_text()[-6000:]}"
        )
    finally:
        stop_process(worker)
    # The run's results are in the DuckDB file the config names: both parents and the
    # candidate, which the gate has judged.
    leaderboard = results_db.leaderboard(tmp_path / "work" / "results.duckdb", "deploy-test")
    assert sorted(entry["kind"] for entry in leaderboard) == ["merge", "parent", "parent"]
    [candidate] = [entry for entry in leaderboard if entry["kind"] == "merge"]
    assert candidate["label"] == "scf_rkl" and candidate["decision"] in {"promoted", "passed", "rejected"}
