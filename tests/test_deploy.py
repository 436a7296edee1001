"""Deployments: prefect.yaml on a real Prefect server, and the docker-compose stack's shape.

The slow test does what docs/deploy.md tells a user to do, on loopback with a private
PREFECT_HOME: `prefect server start`, `prefect work-pool create`, `prefect deploy --all` from
the checkout, the worker started by docker/worker-entrypoint.sh (the compose worker's command),
then two runs of the on-demand deployment triggered through the API, on the tiny toy zoo: one of a
config's candidates, and one that only the run's typed parameters describe (the Prefect run form).
"""

from __future__ import annotations

import asyncio
import json
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

from scf.methods.registry import METHODS
from tasks import results_db, tracking

POOL = "scf"  # the process pool prefect.yaml's deployments target
RUN_TIMEOUT_S = 600  # one run: about 4 min on 2 busy cores (each evaluation child imports torch and lm-eval)
# The typed run: a merge that no config file names, everything in the run's parameters.
EVALUATION = {"suite": "toy", "limit": 4, "max_new_tokens": 16}
TYPED_GATE = {  # 4 items prove little: wide tolerances (as tests/test_pipeline_e2e.py)
    "benchmarks": {"toy_math.exact_match": {"tolerance": 2.0}, "toy_strings.exact_match": {"tolerance": 2.0}},
    "min_items": 4,
    "max_repetition_rate": 1.0,
    "max_refusal_drop": 1.0,
}


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
    form = on_demand.parameter_openapi_schema["properties"]
    assert "candidate" in form
    # The method dropdown, as the server hands it to the UI: the registry's names, in its order.
    [methods] = [variant["enum"] for variant in form["method"]["anyOf"] if "enum" in variant]
    assert methods == list(METHODS)
    night_form = nightly.parameter_openapi_schema["properties"]
    assert list(night_form) == ["config_path", "keep_candidates", "concurrency", "mode", "racing"]
    for deployment in deployments.values():
        # The UI renders its run form from this schema.
        fields = deployment.parameter_openapi_schema["properties"]
        config_path = fields["config_path"]  # optional in the on-demand form (the form can be the whole run)
        assert [variant["type"] for variant in config_path.get("anyOf", [config_path])][0] == "string"
        assert deployment.parameters == {"config_path": "configs/demo.yaml"}
        assert deployment.work_pool_name == POOL
        directory = {"directory": str(REPO)}
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": directory}]


def _cheap_config(tmp_path: Path) -> Path:
    """configs/demo.yaml cut to one scf_rkl candidate and a few samples, its stores under `tmp_path`."""
    config = _load_yaml("configs/demo.yaml")
    config["name"] = "deploy-test"
    config["candidates"] = [{"method": "scf_rkl"}]
    # The typed run's evaluation (device auto, the toy suite's decoding, 16 tokens): its parents' results
    # are this run's, reused from the shared workdir's cache.
    config["eval"] = {"suite": "toy", "limit": 4, "gen": {"max_new_tokens": 16, "batch_size": 32}}
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
        storage = {"workdir": str(tmp_path / "work"), "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        # config_path cleared (the deployment's default is configs/demo.yaml): no config file at all.
        sources = {"base": "zoo:math", "secondary": ["zoo:strings"], "reference": "zoo:base"}
        typed = {"config_path": None, "sources": sources,
                 "method": "scf_rkl", "params": {"alpha": 1.2}, "evaluation": EVALUATION, "gate": TYPED_GATE,
                 "name": "typed-run", "storage": storage}
        with _api(server.api_url):
            assert asyncio.run(_global_concurrency_limit("gpu")) == 1
            runs = [
                run_deployment(deployments["merge-and-evaluate"].id, parameters=parameters,
                               timeout=RUN_TIMEOUT_S, poll_interval=1)
                for parameters in ({"config_path": str(config), "candidate": "scf_rkl"}, typed)
            ]
        for flow_run in runs:
            assert flow_run.state is not None and flow_run.state.is_completed(), (
                f"flow run ended {flow_run.state}\n{worker_log.read_text()[-6000:]}"
            )
    finally:
        stop_process(worker)
    # The run's results are in the DuckDB file the config names: both parents and the
    # candidate, which the gate has judged.
    db = tmp_path / "work" / "results.duckdb"
    leaderboard = results_db.leaderboard(db, "deploy-test")
    assert sorted(entry["kind"] for entry in leaderboard) == ["merge", "parent", "parent"]
    [candidate] = [entry for entry in leaderboard if entry["kind"] == "merge"]
    assert candidate["label"] == "scf_rkl" and candidate["decision"] in {"promoted", "passed", "rejected"}
    assert runs[1].name == "merge-and-evaluate-typed-run-scf_rkl"
    _check_typed_run(db, storage["mlflow_uri"], runs[1].id)


def _check_typed_run(db: Path, mlflow_uri: str, flow_run_id: object) -> None:
    """The typed run's rows in DuckDB and its runs in MLflow: named, nested, compared, tabled."""
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT kind, label, method, params_json, run_id FROM candidates "
                           "WHERE config_name = 'typed-run' ORDER BY kind, label").fetchall()
    assert [(kind, label, method) for kind, label, method, _, _ in rows] == [
        ("merge", "scf_rkl", "scf_rkl"), ("parent", "base=math", None),
        ("parent", "secondary_0=strings", None),
    ]
    assert yaml.safe_load(rows[0][3])["alpha"] == 1.2 and {row[4] for row in rows} == {str(flow_run_id)}
    [candidate] = [e for e in results_db.leaderboard(db, "typed-run") if e["kind"] == "merge"]
    assert candidate["decision"] == "promoted"  # the first champion of its config: wide tolerances

    mlflow = tracking.client(mlflow_uri)
    experiment = mlflow.get_experiment_by_name("typed-run")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = {run.info.run_name: run for run in mlflow.search_runs([experiment.experiment_id])}
    parent = runs.pop("merge-and-evaluate-typed-run")
    assert set(runs) == {"base=math", "secondary_0=strings", "scf_rkl"}
    assert {run.data.tags[tracking.PARENT_RUN_TAG] for run in runs.values()} == {parent.info.run_id}
    compared = sorted(key for key in runs["scf_rkl"].data.metrics if key.startswith("compare."))
    assert compared == ["compare.decision", "compare.refusal_rate", "compare.repetition_rate",
                        "compare.sparsity", "compare.toy_math.exact_match", "compare.toy_strings.exact_match"]
    assert runs["scf_rkl"].data.metrics["compare.decision"] == tracking.DECISION_CODES["promoted"]
    artifacts = {a.path for a in mlflow.list_artifacts(parent.info.run_id)}
    assert {tracking.LEADERBOARD_TABLE, "plots"} <= artifacts
    plots = {a.path for a in mlflow.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/score_delta_vs_parents.png", "plots/repetition_rate.png",
                     "plots/parameter_sources.png"}
    table = json.loads(Path(mlflow.download_artifacts(parent.info.run_id, tracking.LEADERBOARD_TABLE,
                                                      str(db.parent))).read_text())
    assert sorted(row[0] for row in table["data"]) == ["base=math", "scf_rkl", "secondary_0=strings"]
