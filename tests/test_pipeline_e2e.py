"""End to end: the nightly flow on the tiny toy zoo with a temporary Prefect server, real MLflow (sqlite)
and a real DuckDB file; then a second run that reuses every cached merge and evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from tasks import results_db, steps, tracking
from tasks.config import load_config

CANDIDATES = [
    {"method": "scf_rkl", "params": {"alpha": 1.5}},
    {"method": "linear", "params": {"weight": [0.5, 0.5]}},
    {"method": "ties", "params": {"weight": 1.0, "density": 0.5}},
]
BENCHMARKS = {"toy_math.exact_match", "toy_strings.exact_match"}


def write_config(root: Path, **changes: object) -> Path:
    """A small pipeline config over the tiny zoo, every store under ``root``."""
    config = {
        "name": "e2e",
        "zoo": {"size": "tiny", "seed": 0},
        "sources": {"base": "zoo:math", "secondary": ["zoo:strings"], "reference": "zoo:base"},
        "candidates": CANDIDATES,
        "merge": {"device": "cpu"},
        "eval": {
            "suite": "toy",
            "device": "cpu",
            "limit": 4,
            "gen": {"max_new_tokens": 16, "batch_size": 16},
        },
        # These tests are about the night's mechanics, not the verdict's quality (test_gate.py and
        # test_racing.py test that): 4 items prove nothing, and a tolerance of 2 passes every parent
        # check whatever the scores (a 0/1 difference is never below -1), so a healthy candidate
        # is always promoted on the first night.
        "gate": {
            "benchmarks": {key: {"tolerance": 2.0} for key in sorted(BENCHMARKS)},
            "min_items": 4,
            "max_repetition_rate": 1.0,
            "max_refusal_drop": 1.0,
        },
        "storage": {"workdir": str(root / "work"), "mlflow_uri": f"sqlite:///{root / 'mlflow.db'}"},
        "concurrency": 1,
    }
    config.update(changes)
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def prefect_server():
    """A temporary Prefect server (and database) for this module's flow runs."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


class Webhook:
    """A loopback HTTP server standing in for a Slack webhook: it keeps every JSON body posted."""

    def __init__(self) -> None:
        import http.server
        import threading

        posted = self.posted = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/nightly"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def two_runs(tiny_zoo: Path, prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run nightly twice on the same config; return both summaries and the row counts after each."""
    from flows.nightly import nightly

    root = tmp_path_factory.mktemp("e2e")
    webhook = Webhook()
    config_path = write_config(root, notify={"webhook_url": webhook.url})
    try:
        first = nightly(config_path=str(config_path))
    finally:
        webhook.close()  # the second night's post fails: logged, never fatal
    config = load_config(config_path)
    counts_first = results_db.row_counts(config.duckdb_path)
    champion_dir = Path(config.workdir / "candidates" / first["champion"]) if first["champion"] else None
    report_mtime = (champion_dir / "merge_report.json").stat().st_mtime_ns if champion_dir else None
    second = nightly(config_path=str(config_path))
    return {
        "root": root,
        "config_path": config_path,
        "config": config,
        "first": first,
        "second": second,
        "counts_first": counts_first,
        "counts_second": results_db.row_counts(config.duckdb_path),
        "champion_dir": champion_dir,
        "report_mtime": report_mtime,
        "posted": webhook.posted,
    }


@pytest.mark.slow
def test_every_candidate_and_parent_is_stored_with_every_benchmark(two_runs: dict) -> None:
    config = two_runs["config"]
    counts = two_runs["counts_first"]
    assert counts["candidates"] == len(CANDIDATES) + 2  # + base and secondary
    assert counts["generation_stats"] == len(CANDIDATES) + 2
    assert counts["gate_decisions"] == len(CANDIDATES)
    items = results_db.with_retry(config.duckdb_path, lambda con: con.execute(
        "SELECT benchmark, metric, count(DISTINCT model_id), count(*) FROM samples GROUP BY ALL ORDER BY ALL"
    ).fetchall(), read_only=True)
    models = len(CANDIDATES) + 2  # every model: 4 items of each benchmark, 4 harmful + 4 benign prompts
    assert [row for row in items if row[0] != "toy_safety"] == [
        ("toy_math", "exact_match", models, 4 * models), ("toy_strings", "exact_match", models, 4 * models)]
    assert ("toy_safety", "refused", models, 8 * models) in items
    entries = results_db.leaderboard(config.duckdb_path, "e2e")
    assert sorted(entry["kind"] for entry in entries) == ["merge"] * 3 + ["parent"] * 2
    for entry in entries:
        assert set(entry["scores"]) >= BENCHMARKS, entry["label"]
        assert entry["repetition_rate"] is not None and entry["refusal_rate"] is not None
    assert counts["scores"] == sum(len(entry["scores"]) for entry in entries)


@pytest.mark.slow
def test_the_best_passing_candidate_is_promoted(two_runs: dict) -> None:
    """With no champion yet and tolerances of 2, every candidate passes the parent checks; the one
    with the best objective (mean exact match, from its per-item samples) is promoted."""
    first = two_runs["first"]
    assert [c["label"] for c in first["candidates"]] == ["scf_rkl", "linear", "ties"]
    for cand in first["candidates"]:
        assert cand["reasons"], cand
    means = results_db.with_retry(two_runs["config"].duckdb_path, lambda con: dict(con.execute(
        "SELECT model_id, avg(score) FROM samples WHERE metric = 'exact_match' GROUP BY model_id"
    ).fetchall()), read_only=True)
    passing = [c for c in first["candidates"] if c["decision"] != "rejected"]
    assert passing, first["candidates"]
    best = max(passing, key=lambda c: (means[c["id"]], c["id"]))
    assert [c["id"] for c in first["candidates"] if c["decision"] == "promoted"] == [best["id"]]
    assert first["promoted"] == first["champion"] == best["id"]
    assert best["reasons"][0].startswith("passed every check; best objective of this run")


@pytest.mark.slow
def test_mlflow_has_nested_runs_with_metrics_and_artifacts(two_runs: dict) -> None:
    config = two_runs["config"]
    first = two_runs["first"]
    client = tracking.client(config.mlflow_uri)
    experiment = client.get_experiment_by_name("e2e")
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {
        "plots/score_delta_vs_parents.png",
        "plots/repetition_rate.png",
        "plots/parameter_sources.png",
    }
    assert "pipeline_config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == len(CANDIDATES) + 2
    expected = {
        *BENCHMARKS,
        "repetition_rate",
        "mean_seq_rep_4",
        "truncation_rate",
        "refusal_rate",
        "over_refusal_rate",
        "eval_seconds",
    }
    for child in children:
        assert expected <= set(child.data.metrics), child.info.run_name
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"samples.jsonl", "eval_report.json"} <= artifacts
        if child.data.tags["kind"] == "merge":
            assert {"sparsity", "merge_seconds"} <= set(child.data.metrics)
            assert "merge_report.json" in artifacts
            assert child.data.params["method"] in {"scf_rkl", "linear", "ties"}
            assert child.data.params["source.base"] == "zoo:math"
            assert child.data.tags["gate.decision"] in {"promoted", "passed", "rejected"}


@pytest.mark.slow
def test_the_champion_is_registered_and_losers_are_deleted(two_runs: dict) -> None:
    config = two_runs["config"]
    first = two_runs["first"]
    candidates_dir = config.workdir / "candidates"
    kept = sorted(path.name for path in candidates_dir.iterdir())
    assert kept == [first["champion"]]
    assert tracking.champion_source(config.mlflow_uri, "e2e") == str(candidates_dir / first["champion"])


@pytest.mark.slow
def test_a_second_run_reuses_every_merge_and_evaluation(two_runs: dict) -> None:
    second = two_runs["second"]
    assert [(c["merge_cached"], c["eval_cached"]) for c in second["candidates"]] == [(True, True)] * 3
    assert [c["id"] for c in second["candidates"]] == [c["id"] for c in two_runs["first"]["candidates"]]
    # the second night adds its decisions (every night's are kept) and nothing else
    grown = {**two_runs["counts_first"], "gate_decisions": 2 * len(CANDIDATES)}
    assert two_runs["counts_second"] == grown
    # the champion's weights were not rewritten; judged again, it stays champion: nothing new promoted
    assert (two_runs["champion_dir"] / "merge_report.json").stat().st_mtime_ns == two_runs["report_mtime"]
    assert second["champion"] == two_runs["first"]["champion"] and second["promoted"] is None
    [again] = [c for c in second["candidates"] if c["id"] == second["champion"]]
    assert again["decision"] == "passed" and "it is the champion already" in again["reasons"][0]


@pytest.mark.slow
def test_scf_results_prints_the_leaderboard(two_runs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    assert main(["results", "--config", str(two_runs["config_path"])]) == 0
    out = capsys.readouterr().out
    assert "Leaderboard: e2e" in out
    for label in ("scf_rkl", "linear", "ties", "base=math", "secondary_0=strings"):
        assert label in out
    assert all(key in out for key in BENCHMARKS)


@pytest.mark.slow
def test_a_deleted_merge_is_redone_when_its_evaluation_must_run(two_runs: dict) -> None:
    """A loser's weights are gone but its merge result is cached: when its evaluation has to run again
    (here: its cached evaluation is dropped, as after a crash), the merge must run again too."""
    from flows.nightly import nightly

    config = two_runs["config"]
    losers = [c for c in two_runs["second"]["candidates"] if c["id"] != two_runs["second"]["champion"]]
    loser = losers[0]
    assert not (config.workdir / "candidates" / loser["id"]).exists()
    (config.workdir / "prefect-results" / steps.eval_key(loser["id"], config.eval)).unlink()
    third = nightly(config_path=str(two_runs["config_path"]))
    redone = {c["id"]: (c["merge_cached"], c["eval_cached"]) for c in third["candidates"]}
    assert redone[loser["id"]] == (False, False)
    assert all(flags == (True, True) for cid, flags in redone.items() if cid != loser["id"])
    counts = results_db.row_counts(config.duckdb_path)
    assert counts == {**two_runs["counts_first"], "gate_decisions": 3 * len(CANDIDATES)}


def test_io_steps_retry_failures_but_never_bad_input(prefect_server: None) -> None:
    from prefect import flow, task

    from scf.errors import ScfError
    from tasks.steps import retry_unless_bad_input

    calls: list[str] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_bad_input)
    def flaky(error: type[Exception]) -> None:
        calls.append(error.__name__)
        raise error("boom")

    @flow
    def run(error: str) -> None:
        flaky({"ScfError": ScfError, "OSError": OSError}[error])

    with pytest.raises(ScfError):
        run("ScfError")
    assert calls == ["ScfError"]  # bad input: no retry
    with pytest.raises(OSError):
        run("OSError")
    assert calls == ["ScfError", "OSError", "OSError", "OSError"]  # IO trouble: 2 retries


@pytest.mark.slow
def test_the_webhook_receives_the_verdict(two_runs: dict) -> None:
    [payload] = two_runs["posted"]
    first = two_runs["first"]
    label = next(c["label"] for c in first["candidates"] if c["id"] == first["promoted"])
    assert payload["text"].startswith(f"scf-pipeline e2e: promoted {label} ({first['promoted']}).")
    assert payload["promoted"] == first["promoted"] and payload["champion"] == first["champion"]
    assert payload["failures"] == [] and len(payload["candidates"]) == len(CANDIDATES)
    assert payload["links"]["prefect"].endswith(f"/runs/flow-run/{first['flow_run_id']}")
    assert payload["links"]["mlflow"].startswith("mlflow ui --backend-store-uri sqlite:///")
    assert two_runs["second"]["candidates"]  # the second night ran although its post failed
    resolved = (two_runs["config"].workdir / "artifacts" / "pipeline_config.yaml").read_text()
    assert "127.0.0.1" not in resolved and "webhook_url: <redacted>" in resolved
