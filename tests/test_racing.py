"""Racing on the tiny zoo: a candidate whose first stage already proves it fails is stopped there, with
the reason; the eventual winner is never stopped; stages are cached, so a rerun evaluates nothing.

The test after test_pool in file order: it is also the one that hung when test_pool's Prefect
clients outlived their server (helpers_prefect.drain_prefect_clients)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness
from test_pipeline_e2e import write_config  # tests/ is on sys.path

from tasks import results_db
from tasks.config import load_config

pytestmark = pytest.mark.slow
# Candidates whose verdicts hold on any build of the zoo (its training is deterministic on one
# machine, but CPUs with other float kernels train slightly different models): a merge of almost
# only the math parent keeps math; the strings parent alone (weight 0 on math) has lost it.
CANDIDATES = [
    {"method": "linear", "params": {"weight": [0.9, 0.1]}},  # the winner
    {"method": "linear", "params": {"weight": [0.0, 1.0]}},  # hopeless (strings alone): fails at 50%
]
WINNER, HOPELESS = "linear-weight=[0.9,0.1]", "linear-weight=[0.0,1.0]"
LIMIT = 40  # items per benchmark: 20 in the first stage, which already prove the hopeless one fails
GATE = {
    "benchmarks": {"toy_math.exact_match": {"tolerance": 0.3}},
    "min_items": 20,
    "max_repetition_rate": 0.2,
    "max_refusal_drop": 0.2,
}


@pytest.fixture(scope="module")
def race(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from flows.nightly import nightly

    root = tmp_path_factory.mktemp("racing")
    evaluation = {"suite": "toy", "device": "cpu", "limit": LIMIT, "racing": {"stages": [0.5, 1.0]},
                  "gen": {"max_new_tokens": 32, "batch_size": 40}}
    path = write_config(root, name="racing", candidates=CANDIDATES, gate=GATE, eval=evaluation)
    with prefect_test_harness(server_startup_timeout=120):
        first = nightly(config_path=str(path))
        second = nightly(config_path=str(path))
    return {"config": load_config(path), "first": first, "second": second}


def _items(race: dict, model_id: str) -> dict[str, int]:
    return results_db.with_retry(race["config"].duckdb_path, lambda con: dict(con.execute(
        "SELECT benchmark, count(*) FROM samples WHERE model_id = ? AND metric = 'exact_match' GROUP BY 1",
        [model_id]).fetchall()), read_only=True)


def test_a_hopeless_candidate_is_stopped_at_the_first_stage(race: dict) -> None:
    hopeless = next(c for c in race["first"]["candidates"] if c["label"] == HOPELESS)
    assert hopeless["decision"] == "rejected"
    assert hopeless["reasons"] and all(r.startswith("stopped at 50%: ") for r in hopeless["reasons"])
    assert any(r.startswith("stopped at 50%: toy_math.exact_match: -") and r.endswith(": fails")
               for r in hopeless["reasons"]), hopeless["reasons"]
    assert _items(race, hopeless["id"]) == {"toy_math": LIMIT // 2, "toy_strings": LIMIT // 2}


def test_the_winner_runs_every_stage_and_is_promoted(race: dict) -> None:
    winner = next(c for c in race["first"]["candidates"] if c["label"] == WINNER)
    assert winner["decision"] == "promoted" and race["first"]["promoted"] == winner["id"], winner
    assert _items(race, winner["id"]) == {"toy_math": LIMIT, "toy_strings": LIMIT}


def test_a_rerun_reuses_every_stage(race: dict) -> None:
    assert [(c["label"], c["eval_cached"], c["decision"]) for c in race["second"]["candidates"]] == [
        (WINNER, True, "passed"), (HOPELESS, True, "rejected")]
