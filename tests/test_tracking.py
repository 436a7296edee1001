"""MLflow tracking on a real sqlite store: nested runs, stable metric names, artifacts, champion alias."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import plots, tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    exp_id = tracking.experiment_id(uri, "unit", root / "artifacts")
    return uri, exp_id, root


def test_the_experiment_is_created_once(store: tuple[str, str, Path]) -> None:
    uri, exp_id, root = store
    assert tracking.experiment_id(uri, "unit", root / "elsewhere") == exp_id


def test_a_model_run_is_nested_with_stable_metrics_and_artifacts(store: tuple[str, str, Path]) -> None:
    uri, exp_id, root = store
    parent = tracking.start_run(uri, exp_id, "nightly", params={"config": "unit"})
    report = root / "merge_report.json"
    report.write_text("{}")
    merge_report = {"totals": {"sparsity": 0.9}, "timings": {"total_seconds": 3.5}}
    metrics = tracking.model_metrics({"math.exact_match": 0.5, "repetition_rate": 0.0}, merge_report, 12.0)
    assert metrics == {
        "math.exact_match": 0.5,
        "repetition_rate": 0.0,
        "eval_seconds": 12.0,
        "sparsity": 0.9,
        "merge_seconds": 3.5,
    }
    run_id = tracking.log_model_run(
        uri,
        exp_id,
        parent,
        "scf_rkl-alpha=1.5",
        params={"method": "scf_rkl", "params": {"alpha": 1.5}},
        metrics=metrics,
        artifacts=[report],
        tags={"candidate_id": "abc"},
    )
    run = tracking.client(uri).get_run(run_id)
    assert run.data.tags[tracking.PARENT_RUN_TAG] == parent
    assert run.data.metrics == metrics
    assert run.data.params == {"method": "scf_rkl", "params": '{"alpha": 1.5}'}
    assert run.info.status == "FINISHED"
    artifacts = [a.path for a in tracking.client(uri).list_artifacts(run_id)]
    assert artifacts == ["merge_report.json"]
    assert (root / "artifacts").is_dir()  # artifacts stay with the local store, not in ./mlruns


def test_promotion_registers_by_reference_and_moves_the_alias(store: tuple[str, str, Path]) -> None:
    uri, exp_id, root = store
    first, second = root / "models" / "a", root / "models" / "b"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    run_a = tracking.start_run(uri, exp_id, "a")
    run_b = tracking.start_run(uri, exp_id, "b")
    assert tracking.champion_source(uri, "unit") is None
    version_a = tracking.promote(uri, "unit", first, run_a, "a")
    assert tracking.promote(uri, "unit", first, run_a, "a") == version_a  # no duplicate version
    assert tracking.champion_source(uri, "unit") == str(first)
    version_b = tracking.promote(uri, "unit", second, run_b, "b")
    assert version_b != version_a
    assert tracking.champion_source(uri, "unit") == str(second)


def test_ui_command_points_at_the_store() -> None:
    assert (
        tracking.ui_command("sqlite:////x/mlflow.db")
        == "mlflow ui --backend-store-uri sqlite:////x/mlflow.db"
    )


def test_plots_are_written(tmp_path: Path) -> None:
    entries = [
        {
            "id": "p",
            "kind": "parent",
            "label": "base",
            "scores": {"m.a": 0.5},
            "deltas": {"m.a": 0.0},
            "repetition_rate": 0.0,
        },
        {
            "id": "c",
            "kind": "merge",
            "label": "ties-density=0.3",
            "scores": {"m.a": 0.4},
            "deltas": {"m.a": -0.1},
            "repetition_rate": 0.2,
        },
    ]
    outs = [
        plots.score_deltas(entries, tmp_path / "deltas.png"),
        plots.repetition_rates(entries, tmp_path / "repetition.png"),
        plots.parameter_sources(
            {"ties-density=0.3": {"base": 0.7, "secondary_0": 0.2, "neither": 0.1}}, tmp_path / "sources.png"
        ),
    ]
    for out in outs:
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_experiment_opens_in_the_runs_view(store: tuple[str, str, Path], tmp_path: Path) -> None:
    uri, exp_id, _ = store
    mlflow = tracking.client(uri)
    assert mlflow.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # An experiment made before the tag existed gets it on the next run.
    old = mlflow.create_experiment("untagged", artifact_location=(tmp_path / "a").as_uri())
    assert tracking.EXPERIMENT_KIND_TAG not in mlflow.get_experiment(old).tags
    assert tracking.experiment_id(uri, "untagged", tmp_path / "a") == old
    assert mlflow.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.runs_view_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )


def test_compared_figures_sort_together_and_the_decision_is_one_of_them(store: tuple[str, str, Path]) -> None:
    uri, exp_id, _ = store
    figures = {"toy_math.exact_match": 0.5, "toy_strings.exact_match": 0.25, "repetition_rate": 0.0,
               "refusal_rate": 1.0, "over_refusal_rate": 0.1, "mean_seq_rep_4": 0.02}
    merge_report = {"totals": {"sparsity": 0.9}, "timings": {"total_seconds": 3.5}}
    metrics = tracking.model_metrics(figures, merge_report, 12.0, gated=("toy_math.exact_match",))
    compared = {key: value for key, value in metrics.items() if key.startswith("compare.")}
    assert compared == {"compare.toy_math.exact_match": 0.5, "compare.repetition_rate": 0.0,
                        "compare.refusal_rate": 1.0, "compare.sparsity": 0.9}
    assert metrics == {**figures, **compared, "eval_seconds": 12.0, "sparsity": 0.9, "merge_seconds": 3.5}

    parent = tracking.start_run(uri, exp_id, "nightly-unit")
    run_id = tracking.log_model_run(uri, exp_id, parent, "scf_rkl-alpha=0.5", {}, metrics, [], {})
    tracking.log_decision(uri, run_id, "promoted")  # on the finished run, once the gate has spoken
    run = tracking.client(uri).get_run(run_id)
    assert (run.info.run_name, run.data.tags[tracking.PARENT_RUN_TAG]) == ("scf_rkl-alpha=0.5", parent)
    assert run.data.tags["gate.decision"] == "promoted"
    assert run.data.metrics["compare.decision"] == 2.0
    assert sorted(run.data.metrics)[:5] == sorted([*compared, "compare.decision"])  # one column group


def test_the_leaderboard_is_a_table_artifact_of_the_parent_run(store: tuple[str, str, Path]) -> None:
    uri, exp_id, root = store
    parent = tracking.start_run(uri, exp_id, "nightly-table")
    entries = [
        {"id": "p-1", "kind": "parent", "label": "base=math", "scores": {"toy_math.exact_match": 1.0},
         "deltas": {"toy_math.exact_match": 0.5}, "repetition_rate": 0.0, "refusal_rate": 1.0,
         "over_refusal_rate": 0.0, "decision": None, "reasons": [], "status": "ok", "failure": None},
        {"id": "c-1", "kind": "merge", "label": "scf_rkl", "scores": {"toy_math.exact_match": 0.75},
         "deltas": {"toy_math.exact_match": 0.25}, "repetition_rate": 0.1, "refusal_rate": 0.5,
         "over_refusal_rate": 0.0, "decision": "rejected", "reasons": ["a", "b"], "status": "ok",
         "failure": None},
    ]
    tracking.log_leaderboard(uri, parent, entries)

    mlflow = tracking.client(uri)
    assert [a.path for a in mlflow.list_artifacts(parent)] == [tracking.LEADERBOARD_TABLE]
    downloaded = mlflow.download_artifacts(parent, tracking.LEADERBOARD_TABLE, str(root))
    table = json.loads(Path(downloaded).read_text())
    assert table["columns"] == ["model", "id", "kind", "toy_math.exact_match", "toy_math.exact_match delta",
                                "repetition_rate", "refusal_rate", "over_refusal_rate", "decision", "reasons"]
    assert table["data"] == [
        ["base=math", "p-1", "parent", 1.0, None, 0.0, 1.0, 0.0, "parent", ""],
        ["scf_rkl", "c-1", "merge", 0.75, 0.25, 0.1, 0.5, 0.0, "rejected", "a; b"],
    ]
    # What the UI reads to show it as a table (and MlflowClient.load_table to find it).
    logged = json.loads(mlflow.get_run(parent).data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": tracking.LEADERBOARD_TABLE, "type": "table"}]
