"""The Prefect run forms: typed parameters from the registry and the catalog, validated before any work.

The schema here is the one ``prefect deploy`` sends the server (``Flow.to_deployment``), read without a
server; tests/test_deploy.py reads it back from a real server after ``prefect deploy --all``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evals.catalog import SUITES
from flows.cli import main
from flows.merge_eval import merge_and_evaluate
from flows.nightly import nightly
from scf.methods.registry import METHODS
from tasks.config import REQUEST_NAME, request_config
from tasks.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"base": "zoo:math", "secondary": ["zoo:strings"], "reference": "zoo:base"}
BAD_KEY = (
    "the run's parameters: invalid config: method 'scf_rkl': invalid params: params.alpah: unknown "
    "parameter (did you mean 'alpha'?); known: eps, q_low, q_center, q_high, alpha"
)


def _schema(flow) -> dict:
    """The parameter schema a deployment of ``flow`` carries: what the Prefect UI renders as the form."""
    deployment = flow.to_deployment(name="form")
    return deployment._parameter_openapi_schema.model_dump(exclude_unset=True)  # as RunnerDeployment sends it


def _choices(field: dict) -> list[str]:
    """The dropdown of an optional enum field (``anyOf: [{enum}, {null}]``)."""
    [options] = [variant["enum"] for variant in field["anyOf"] if "enum" in variant]
    return options


def test_the_run_form_offers_every_registered_method_and_suite() -> None:
    schema = _schema(merge_and_evaluate)
    fields = schema["properties"]

    assert _choices(fields["method"]) == list(METHODS)
    suite = schema["definitions"]["EvalChoice"]["properties"]["suite"]
    assert _choices(suite) == list(SUITES)
    assert list(schema["definitions"]["EvalChoice"]["properties"]) == ["suite", "limit", "max_new_tokens"]
    assert schema["definitions"]["Sources"]["required"] == ["base", "secondary"]
    assert schema["definitions"]["Sources"]["properties"]["secondary"]["minItems"] == 1
    assert fields["params"]["anyOf"][0] == {"additionalProperties": True, "type": "object"}
    assert "benchmarks" in schema["definitions"]["GatePolicy"]["properties"]
    # The request first, then the fields of a config's own candidates and of pool runs.
    assert [name for name, _ in sorted(fields.items(), key=lambda item: item[1]["position"])][:9] == [
        "config_path", "sources", "method", "params", "evaluation", "gate", "gate_config", "name", "storage",
    ]
    assert schema.get("required", []) == []  # a config path is optional: the form can describe the whole run


def test_the_nightly_form_exposes_the_night_settings() -> None:
    fields = _schema(nightly)["properties"]

    assert list(fields) == ["config_path", "keep_candidates", "concurrency", "mode", "racing"]
    assert _choices(fields["mode"]) == ["local", "pool"]
    assert [variant.get("type") for variant in fields["racing"]["anyOf"]] == ["boolean", "null"]


def test_a_bad_params_key_fails_before_any_work_with_the_cli_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = {"workdir": str(tmp_path / "work"), "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with pytest.raises(PipelineError) as info:
        merge_and_evaluate.fn(sources=SOURCES, method="scf_rkl", params={"alpah": 1.2}, gate_config="demo",
                              storage=storage)
    assert str(info.value) == BAD_KEY
    assert list(tmp_path.iterdir()) == []  # no workdir, no MLflow store: nothing was started

    code = main(["run", "--base", "zoo:math", "--secondary", "zoo:strings", "--reference", "zoo:base",
                 "--method", "scf_rkl", "--param", "alpah=1.2", "--gate-config", "demo"])
    assert (code, capsys.readouterr().err) == (2, f"error: {BAD_KEY}\n")


def test_form_fields_override_a_base_config() -> None:
    demo = REPO / "configs" / "demo.yaml"
    config = request_config(
        demo,
        sources={"base": "zoo:strings", "secondary": ["zoo:math", "zoo:refusal"]},
        method="linear",
        params={"weight": [0.5, 0.3, 0.2]},
        evaluation={"suite": "toy", "limit": 4, "max_new_tokens": 16},
    )

    assert config.name == "demo" and config.storage.workdir == Path(".scf/demo")  # kept from the base
    assert config.sources.parents() == {"base": "zoo:strings", "secondary_0": "zoo:math",
                                        "secondary_1": "zoo:refusal"}
    assert config.sources.reference is None  # the form's sources replace the base's whole
    [candidate] = config.expand()
    assert (candidate.label, candidate.params) == ("linear", {"weight": [0.5, 0.3, 0.2], "normalize": True})
    assert (config.eval.limit, config.eval.gen.max_new_tokens) == (4, 16)
    assert (config.eval.gen.batch_size, config.eval.device) == (32, "cpu")  # the base's other settings
    assert config.gate == request_config(demo).gate


def test_a_request_without_a_config_is_complete_or_says_what_is_missing() -> None:
    config = request_config(sources=SOURCES, method="scf_rkl", params={"alpha": 1.2}, gate_config="demo",
                            evaluation={"suite": "toy", "limit": 4, "max_new_tokens": 16})
    assert config.name == REQUEST_NAME and config.gate == request_config(REPO / "configs/demo.yaml").gate
    assert config.eval.gen.batch_size == 32  # the toy suite's decoding, then the form's max_new_tokens

    cases = {
        "the run's parameters: invalid config: gate: required key is missing": {},
        "the run's parameters: give gate or gate_config, not both": {
            "gate": {"benchmarks": {"toy_math.exact_match": {}}}, "gate_config": "demo"},
        "the run's parameters: invalid config: method: 'ties' needs sources.reference (the common "
        "ancestor)": {
            "method": "ties", "sources": {**SOURCES, "reference": None}, "gate_config": "demo"},
        "the run's parameters: params needs method (the merge method they are parameters of)": {
            "method": None, "params": {"alpha": 1}},
    }
    for message, changes in cases.items():
        request = {"sources": SOURCES, "method": "scf_rkl", **changes}
        with pytest.raises(PipelineError) as info:
            request_config(**request)
        assert str(info.value) == message


def test_the_night_form_turns_racing_and_the_mode_on_and_off(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["execution"] = {"work_pool": "scf", "max_parallel": 3}
    raw["eval"]["racing"] = {"stages": [0.5, 1.0]}
    path = tmp_path / "night.yaml"
    path.write_text(yaml.safe_dump(raw))

    assert request_config(path).eval.racing.stages == [0.5, 1.0]
    assert request_config(path, racing=False).eval.racing is None
    assert request_config(REPO / "configs" / "demo.yaml", racing=True).eval.racing.stages == [0.25, 0.5, 1.0]
    pool = request_config(path, mode="pool", racing=False, concurrency=3, keep_candidates=True)
    assert (pool.execution.mode, pool.execution.work_pool, pool.execution.max_parallel) == ("pool", "scf", 3)
    assert (pool.concurrency, pool.keep_candidates) == (3, True)
