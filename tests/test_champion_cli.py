"""`scf results --history`, `scf champion` and `scf champion rollback` on a real DuckDB file and a real
MLflow registry (sqlite): two nights, two champions, then a rollback that moves the alias back."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
import yaml

from flows.cli import main
from tasks import results_db, tracking
from tasks.gate import GateDecision


@pytest.fixture
def two_champions(tmp_path: Path) -> Path:
    """A config whose first night promoted `a` and second night `b`, registered in MLflow."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {
        "name": "hist",
        "sources": {"base": "zoo:math", "secondary": ["zoo:strings"], "reference": "zoo:base"},
        "candidates": [{"method": "scf_rkl"}],
        "gate": {"benchmarks": {"toy_math.exact_match": {}}},
        "storage": {"workdir": str(tmp_path / "work"), "mlflow_uri": uri},
    }
    path = tmp_path / "hist.yaml"
    path.write_text(yaml.safe_dump(config))
    db = tmp_path / "work" / "results.duckdb"
    experiment = tracking.experiment_id(uri, "hist", tmp_path / "artifacts")
    source = results_db.Source(role="base", ref="zoo:math", revision=None, fingerprint="f" * 64)
    for night, cid in enumerate(("a", "b"), start=1):
        model_dir = tmp_path / "models" / cid
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text("{}")
        record = results_db.ModelRecord(id=cid, kind="merge", label=f"label-{cid}", sources=[source],
                                        path=str(model_dir))
        stats = results_db.GenerationStats(repetition_rate=0, mean_seq_rep_4=0, truncation_rate=0,
                                           n_generations=1, eval_seconds=1)
        results_db.write_model_results(db, "hist", record, [], stats, f"run-{night}")
        verdict = GateDecision(candidate_id=cid, decision="promoted", reasons=[f"night {night}"],
                               objective=0.5)
        results_db.write_decisions(db, "hist", [verdict], f"run-{night}", str(model_dir))
        run = tracking.start_run(uri, experiment, cid)
        tracking.promote(uri, "hist", model_dir, run, cid)
    return path


def test_history_lists_one_line_per_night(two_champions: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["results", "--history", "--config", str(two_champions)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "History: hist (2 nights)"
    assert lines[1].endswith("run run-1  1 candidates  promoted label-a (a)  champion after: a")
    assert lines[2].endswith("run run-2  1 candidates  promoted label-b (b)  champion after: b")


def test_champion_prints_the_current_one_with_its_evidence(
    two_champions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["champion", "--config", str(two_champions)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Champion of hist: label-b (b)\n  since ")
    assert ", by run run-2\n  why: promoted by the gate: night 2\n" in out


def test_rollback_moves_the_alias_and_the_record_back(
    two_champions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load(two_champions.read_text())
    uri, db = config["storage"]["mlflow_uri"], Path(config["storage"]["workdir"]) / "results.duckdb"
    client = tracking.client(uri)
    assert client.get_model_version_by_alias("scf-hist", "champion").tags["candidate_id"] == "b"

    assert main(["champion", "rollback", "--config", str(two_champions), "--reason", "b loops in prod"]) == 0
    assert "champion b -> a" in capsys.readouterr().out
    assert client.get_model_version_by_alias("scf-hist", "champion").tags["candidate_id"] == "a"
    current = results_db.champion(db, "hist")
    assert (current["candidate_id"], current["run_id"]) == ("a", None)
    assert current["reason"] == "rollback: b loops in prod"
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT kind, candidate_id, previous_id, reason FROM events").fetchall() == [
            ("rollback", "a", "b", "b loops in prod")]
    assert main(["results", "--history", "--config", str(two_champions)]) == 0  # nights are unchanged
    assert "champion after: b" in capsys.readouterr().out.splitlines()[2]


def test_rollback_refuses_what_it_cannot_restore(
    two_champions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["champion", "rollback", "--config", str(two_champions), "--to", "zz", "--reason", "x"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --to 'zz' matches 0 former champions; former champions: a")
    (Path(yaml.safe_load(two_champions.read_text())["storage"]["workdir"]).parent / "models" / "a"
     / "config.json").unlink()
    assert main(["champion", "rollback", "--config", str(two_champions), "--reason", "x"]) == 2
    assert "error: cannot roll back to a: its weights are gone" in capsys.readouterr().err
