"""The pipeline config: errors name the file, key and allowed values; grids expand; ids are content hashes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.config import Candidate, MergeSettings, candidate_id, load_config
from tasks.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
GOOD = {
    "name": "unit",
    "sources": {"base": "zoo:base", "secondary": "zoo:math"},
    "candidates": [{"method": "linear", "params": {"normalize": True}, "grid": {"weight": [0.3, 0.5]}}],
    "gate": {"benchmarks": {"math.exact_match": {"tolerance": 0.05}}},
}


def _write(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **changes}))
    return path


def _error(tmp_path: Path, **changes: object) -> str:
    with pytest.raises(PipelineError) as info:
        load_config(_write(tmp_path, **changes))
    return str(info.value)


def test_a_grid_expands_to_its_cartesian_product(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path))
    candidates = config.expand()
    assert [c.label for c in candidates] == ["linear-weight=0.3", "linear-weight=0.5"]
    assert candidates[0].params == {"weight": 0.3, "normalize": True}  # fixed params merged in
    assert config.sources.secondary == ["zoo:math"]  # a single string is a list of one


def test_defaults_put_every_store_under_the_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(_write(tmp_path))
    assert config.workdir == tmp_path / ".scf" / "unit"
    assert config.duckdb_path == tmp_path / ".scf" / "unit" / "results.duckdb"
    assert config.mlflow_uri == f"sqlite:///{tmp_path}/.scf/unit/mlflow.db"
    assert config.keep_candidates is False


def test_mlflow_tracking_uri_from_the_environment_is_respected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert load_config(_write(tmp_path)).mlflow_uri == "http://mlflow:5000"


def test_an_unknown_key_lists_the_allowed_keys(tmp_path: Path) -> None:
    message = _error(tmp_path, storage={"work_dir": "x"})
    assert "pipeline.yaml: invalid config" in message
    assert "storage.work_dir: unknown key; allowed: workdir, mlflow_uri, duckdb" in message


def test_an_unknown_key_in_a_list_entry_is_located(tmp_path: Path) -> None:
    message = _error(tmp_path, candidates=[{"method": "linear", "grids": {}}])
    assert "candidates.0.grids: unknown key; allowed: method, params, grid" in message


def test_a_bad_choice_names_the_allowed_values(tmp_path: Path) -> None:
    message = _error(tmp_path, merge={"device": "tpu"})
    assert "merge.device: Input should be 'auto', 'cpu' or 'cuda'" in message


def test_a_missing_section_is_named(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({key: value for key, value in GOOD.items() if key != "gate"}))
    with pytest.raises(PipelineError, match="gate: required key is missing"):
        load_config(path)


def test_an_unknown_method_suggests_the_closest(tmp_path: Path) -> None:
    message = _error(tmp_path, candidates=[{"method": "linaer"}])
    assert "candidates.0: unknown merge method 'linaer'; did you mean 'linear'" in message


def test_bad_method_params_are_caught_at_load_time(tmp_path: Path) -> None:
    message = _error(tmp_path, candidates=[{"method": "linear", "grid": {"wieght": [0.5]}}])
    assert "candidates.0: method 'linear': invalid params: params.wieght: unknown parameter" in message


def test_an_empty_grid_list_is_an_error(tmp_path: Path) -> None:
    assert "candidates.0.grid: grid.weight is an empty list" in _error(
        tmp_path, candidates=[{"method": "linear", "grid": {"weight": []}}]
    )


def test_eval_settings_are_an_evals_spec(tmp_path: Path) -> None:
    assert "eval.limit: Input should be greater than or equal to 1" in _error(tmp_path, eval={"limit": 0})


def test_gate_objective_must_be_a_gated_benchmark(tmp_path: Path) -> None:
    message = _error(tmp_path, gate={"benchmarks": {"math.exact_match": {}}, "objective": "gsm8k.acc"})
    assert "gate: objective 'gsm8k.acc' is not one of ['mean', 'math.exact_match']" in message


def test_an_unreadable_or_malformed_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"cannot read config .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(PipelineError, match=r"bad.yaml: invalid YAML"):
        load_config(bad)


def test_overrides_replace_top_level_keys(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path), keep_candidates=True, concurrency=None).keep_candidates is True


def test_candidate_id_is_a_content_hash() -> None:
    candidate = Candidate(method="linear", params={"weight": 0.5})
    fingerprints = {"base": "a" * 64, "secondary_0": "b" * 64}
    first = candidate_id(fingerprints, candidate, MergeSettings())
    assert first == candidate_id(
        dict(fingerprints), Candidate(method="linear", params={"weight": 0.5}), MergeSettings(device="cuda")
    )  # device does not change the weights
    assert first != candidate_id({**fingerprints, "secondary_0": "c" * 64}, candidate, MergeSettings())
    assert first != candidate_id(
        fingerprints, Candidate(method="linear", params={"weight": 0.6}), MergeSettings()
    )
    assert first != candidate_id(fingerprints, candidate, MergeSettings(dtype="bfloat16"))
    assert len(first) == 16


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.expand(), f"{path} defines no candidates"


def test_labels_name_what_differs_between_candidates_of_a_method(tmp_path: Path) -> None:
    entries = [
        {"method": "linear", "params": {"weight": 0.3}},
        {"method": "linear", "params": {"weight": 0.5}},
        {"method": "linear", "params": {"weight": 0.5}},  # a duplicate is run once
    ]
    config = load_config(_write(tmp_path, candidates=entries))
    assert [c.label for c in config.expand()] == ["linear-weight=0.3", "linear-weight=0.5"]
    single = load_config(_write(tmp_path, candidates=[{"method": "linear"}]))
    assert [c.label for c in single.expand()] == ["linear"]


@pytest.mark.parametrize("command", ["nightly", "run"])
def test_the_cli_rejects_a_bad_config_before_running_anything(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, merge={"device": "tpu"})
    assert main([command, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "merge.device: Input should be 'auto', 'cpu' or 'cuda'" in err
    assert not (tmp_path / ".scf").exists()


def test_scf_results_needs_a_config_or_a_database(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    assert main(["results"]) == 2
    assert "error: scf results needs --config" in capsys.readouterr().err


def test_tokenizer_source_names_a_source_and_changes_the_candidate_id(tmp_path: Path) -> None:
    from flows.merge_eval import _tokenizer_source
    from tasks.results_db import Source

    sources = {"base": "zoo:base", "secondary": ["zoo:math"], "reference": "hub:org/ancestor"}
    resolved = {role: Source(role=role, ref=ref, revision=None, path=f"/models/{role}", fingerprint=role)
                for role, ref in {"base": "zoo:base", "secondary_0": "zoo:math",
                                  "reference": "hub:org/ancestor"}.items()}
    expected = {"base": "base", "zoo:base": "base", "union": "union", "secondary_0": "/models/secondary_0",
                "zoo:math": "/models/secondary_0", "hub:org/ancestor": "/models/reference"}
    for choice, spec_value in expected.items():
        config = load_config(_write(tmp_path, sources=sources, merge={"tokenizer_source": choice}))
        assert _tokenizer_source(config, resolved) == spec_value, choice
    assert _tokenizer_source(load_config(_write(tmp_path, sources=sources)), resolved) is None
    assert _error(tmp_path, sources=sources, merge={"tokenizer_source": "math"}) == (
        f"{tmp_path / 'pipeline.yaml'}: invalid config: merge.tokenizer_source: 'math' is none of base, "
        "union, secondary_0, reference nor a source as written under sources:"
    )
    candidate, fingerprints = Candidate(method="linear", params={"weight": 0.5}), {"base": "a" * 64}
    assert candidate_id(fingerprints, candidate, MergeSettings()) != candidate_id(
        fingerprints, candidate, MergeSettings(tokenizer_source="base"))


def test_seeds_give_one_candidate_per_seed_with_its_own_id(tmp_path: Path) -> None:
    entries = [{"method": "dare_ties", "params": {"density": 0.5}, "seeds": [0, 2]}, {"method": "ties"}]
    sources = {**GOOD["sources"], "reference": "zoo:base"}
    config = load_config(_write(tmp_path, candidates=entries, sources=sources))
    candidates = config.expand()
    assert [c.label for c in candidates] == ["dare_ties-seed=0", "dare_ties-seed=2", "ties"]
    assert [c.seed for c in candidates] == [0, 2, None]
    fingerprints = {"base": "a" * 64, "secondary_0": "b" * 64}
    ids = [candidate_id(fingerprints, c, config.merge) for c in candidates[:2]]
    assert ids[0] != ids[1]
    # seed 0 given per candidate is merge.seed 0: the same merge, the same id
    unseeded = Candidate(method="dare_ties", params=candidates[0].params)
    assert ids[0] == candidate_id(fingerprints, unseeded, MergeSettings(seed=0))
    twice = [{"method": "linear", "seeds": [1, 1]}]
    assert "candidates.0.seeds: must be distinct" in _error(tmp_path, candidates=twice)


def test_diagnostics_change_the_merge_cache_key_not_the_candidate_id() -> None:
    from tasks.steps import merge_key

    on = MergeSettings(diagnostics=True)
    assert MergeSettings().report_settings() is None
    assert on.report_settings() == {"diagnostics": True, "diagnostic_layers": []}
    assert merge_key("abc", None) == merge_key("abc")
    assert merge_key("abc", on.report_settings()) != merge_key("abc")
    candidate = Candidate(method="linear", params={"weight": 0.5})
    fingerprints = {"base": "a" * 64, "secondary_0": "b" * 64}
    assert candidate_id(fingerprints, candidate, on) == candidate_id(fingerprints, candidate, MergeSettings())
    assert on.engine_settings()["diagnostics"] is True  # handed to the MergeSpec
