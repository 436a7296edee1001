"""Racing on the tiny zoo: a candidate whose first stage already proves it fails is stopped there, with
the reason; the eventual winner is never stopped; stages are cached, so a rerun evaluates nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness
from test_pipeline_e2e import write_config  # tests/ is on sys.path

from tasks import results_db
from tasks.config import load_config

pytestmark = pytest.mark.slow
CANDIDATES = [
    {"method": "scf_rkl", "params": {"alpha": 0.5}},  # keeps both skills: the winner
    {"method": "ties", "params": {"density": 0.5}},  # loses the strings skill: hopeless at 25%
]
GATE = {  # the demo's gate: keep at least 40% of each specialist's skill, with 95% confidence
    "benchmarks": {"toy_math.exact_match": {"tolerance": 0.6}, "toy_strings.exact_match": {"tolerance": 0.6}},
    "min_items": 50,
    "max_repetition_rate": 0.1,
    "max_refusal_drop": 0.2,
}


@pytest.fixture(scope="module")
def race(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from flows.nightly import nightly

    root = tmp_path_factory.mktemp("racing")
    evaluation = {"suite": "toy", "device": "cpu", "gen": {"max_new_tokens": 48, "batch_size": 32},
                  "racing": {"stages": [0.25, 0.5, 1.0]}}
    path = write_config(root, name="racing", candidates=CANDIDATES, gate=GATE, eval=evaluation)
    with prefect_test_harness(server_startup_timeout=120):
        first = nightly(config_path=str(path))
        second = nightly(config_path=str(path))
    return {"config": load_config(path), "first": first, "second": second}


def test_a_hopeless_candidate_is_stopped_at_the_first_stage(race: dict) -> None:
    ties = next(c for c in race["first"]["candidates"] if c["label"] == "ties")
    assert ties["decision"] == "rejected"
    assert ties["reasons"] and all(r.startswith("stopped at 25%: ") for r in ties["reasons"])
    assert any(r.startswith("stopped at 25%: toy_strings.exact_match: -") and r.endswith(": fails")
               for r in ties["reasons"])
    items = results_db.with_retry(race["config"].duckdb_path, lambda con: dict(con.execute(
        "SELECT benchmark, count(*) FROM samples WHERE model_id = ? AND metric = 'exact_match' GROUP BY 1",
        [ties["id"]]).fetchall()), read_only=True)
    assert items == {"toy_math": 25, "toy_strings": 30}  # its first quarter only: 100 and 120 items


def test_the_winner_runs_every_stage_and_is_promoted(race: dict) -> None:
    winner = next(c for c in race["first"]["candidates"] if c["label"] == "scf_rkl")
    assert winner["decision"] == "promoted" and race["first"]["promoted"] == winner["id"]
    items = results_db.with_retry(race["config"].duckdb_path, lambda con: dict(con.execute(
        "SELECT benchmark, count(*) FROM samples WHERE model_id = ? AND metric = 'exact_match' GROUP BY 1",
        [winner["id"]]).fetchall()), read_only=True)
    assert items == {"toy_math": 100, "toy_strings": 120}


def test_a_rerun_reuses_every_stage(race: dict) -> None:
    assert [(c["label"], c["eval_cached"], c["decision"]) for c in race["second"]["candidates"]] == [
        ("scf_rkl", True, "passed"), ("ties", True, "rejected")]
