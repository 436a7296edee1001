"""The method registry: lookup with suggestions, parameter validation that names the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from scf.errors import ScfError
from scf.methods.base import TensorInputs
from scf.methods.registry import METHODS, MethodSpec, get_method, validate_params

EXPECTED = {"scf_rkl", "scf_kl", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "sce",
            "slerp", "nuslerp", "multislerp", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties",
            "model_stock", "nearswap", "passthrough"}
NO_REFERENCE = {"scf_rkl", "scf_kl", "linear", "slerp", "nuslerp", "multislerp", "nearswap", "passthrough"}


def test_every_method_is_registered_with_a_complete_spec() -> None:
    assert set(METHODS) == EXPECTED
    for name, spec in METHODS.items():
        assert isinstance(spec, MethodSpec) and spec.name == name
        assert spec.reference_url.startswith("https://") and spec.summary
        assert set(spec.per_model_params) <= set(spec.params.model_fields)
        assert spec.needs_reference == (name not in NO_REFERENCE)
        assert callable(spec.fn) and spec.fn.__name__ == name  # the lazy "module:function" resolves
        for field_name, field in spec.params.model_fields.items():
            assert field.description, f"{name}.{field_name} has no description for `scf methods`"


def test_the_registry_imports_no_torch() -> None:
    # `scf methods` and config validation list and check methods without paying for torch
    probe = "import sys, scf.methods.registry; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(("name", "n_models", "message"), [
    ("slerp", 3, r"method 'slerp' merges the base with exactly 1 secondary, got 2"),
    ("nearswap", 3, r"method 'nearswap' merges the base with exactly 1 secondary, got 2"),
    ("nuslerp", 1, r"method 'nuslerp' merges the base with exactly 1 secondary, got 0"),
    ("model_stock", 1, r"method 'model_stock' merges the base with at least 1 secondary, got 0"),
])
def test_the_number_of_models_is_checked_before_merging(name: str, n_models: int, message: str) -> None:
    with pytest.raises(ScfError, match=message):
        validate_params(name, {"t": 0.5} if name in ("slerp", "nearswap") else {}, n_models)


def test_get_method_suggests_close_names() -> None:
    assert get_method("scf_rkl") is METHODS["scf_rkl"]
    suggestion = r"unknown merge method 'scf-rkl'; did you mean 'scf_rkl'.*available: "
    with pytest.raises(ScfError, match=suggestion):
        get_method("scf-rkl")
    with pytest.raises(ScfError, match=r"unknown merge method 'qqq'; available: breadcrumbs, breadcrumbs_"):
        get_method("qqq")


def test_defaults_are_mergekits_and_the_papers() -> None:
    assert validate_params("scf_rkl", {}, 2).model_dump() == {
        "eps": 1e-8, "q_low": 0.25, "q_center": 0.5, "q_high": 0.75, "alpha": 1.5,
    }  # fmt: skip
    ties = validate_params("ties", {}, 2)
    assert (ties.normalize, ties.rescale, ties.density, ties.lambda_) == (True, False, 1.0, 1.0)
    dare = validate_params("dare_ties", {}, 2)
    assert (dare.normalize, dare.rescale) == (False, True)
    task = validate_params("task_arithmetic", {"lambda": 0.5}, 2)
    assert (task.normalize, task.lambda_) == (False, 0.5)
    assert task.model_dump()["lambda"] == 0.5  # reported under the config key
    assert validate_params("sce", {}, 2).select_topk == 1.0
    assert validate_params("linear", {}, 3).normalize is True
    # the methods ported from mergekit 0.1.5, with its defaults
    della = validate_params("della", {}, 2)
    assert (della.normalize, della.rescale, della.density, della.epsilon) == (True, True, 1.0, 0.15)
    della_linear = validate_params("della_linear", {}, 2)
    assert (della_linear.normalize, della_linear.rescale) == (False, True)
    crumbs = validate_params("breadcrumbs_ties", {}, 2)
    assert (crumbs.normalize, crumbs.rescale, crumbs.density, crumbs.gamma) == (False, False, 1.0, 0.01)
    nuslerp = validate_params("nuslerp", {}, 2)
    assert (nuslerp.nuslerp_flatten, nuslerp.nuslerp_row_wise) == (True, False)
    multislerp = validate_params("multislerp", {}, 3)
    assert (multislerp.normalize_weights, multislerp.eps) == (True, 1e-8)
    assert validate_params("model_stock", {}, 2).filter_wise is False


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("scf_rkl", {"alpha": -1}, r"params\.alpha: Input should be greater than or equal to 0"),
        ("scf_rkl", {"q_low": 0.8, "q_high": 0.6}, r"q_low <= q_center <= q_high.*q_low=0\.8"),
        ("scf_rkl", {"q_high": 1.5}, r"params\.q_high: Input should be less than or equal to 1"),
        ("scf_rkl", {"eps": 0}, r"params\.eps: Input should be greater than 0"),
        ("ties", {"density": 1.7}, r"params\.density: must be a finite number in \(0\.0, 1\.0\], got 1\.7$"),
        ("dare_linear", {"density": [0.5, -0.1]}, r"params\.density: must be .* got -0\.1"),
        ("sce", {"select_topk": 0}, r"params\.select_topk: Input should be greater than 0"),
        ("scf_rkl", {"apha": 2}, r"params\.apha: unknown parameter \(did you mean 'alpha'\?\)"),
        ("linear", {"weight": [1, -1]}, r"weights sum to 0"),
        ("ties", {"lambda": "big"}, r"params\.lambda: Input should be a valid number"),
        ("linear", {"weight": float("nan")}, r"params\.weight: Input should be a finite number \(got nan\)$"),
        ("ties", {"density": [0.5, "x"]}, r"params\.density\.1: Input should be a valid number.*got .x.\)$"),
        ("linear", {"weight": "heavy"}, r"params\.weight: Input should be a valid number.*\(got 'heavy'\)$"),
        ("slerp", {}, r"params\.t: required \(the method has no default for it\)$"),
        ("nearswap", {"t": -0.1}, r"params\.t: Input should be greater than or equal to 0"),
        ("della", {"density": 0.1}, r"density - epsilon and density \+ epsilon must lie in \(0, 1\).*"
                                     r"got density=0\.1, epsilon=0\.15"),
        ("della_linear", {"density": [0.5, 0.9], "epsilon": 0.1}, r"got density=0\.9, epsilon=0\.1"),
        ("della", {"epsilon": 1.0}, r"params\.epsilon: must be a finite number in \[0\.0, 1\.0\), got 1\.0"),
        ("breadcrumbs", {"gamma": 1.5}, r"params\.gamma: must be a finite number in \[0\.0, 1\.0\], "
                                        r"got 1\.5"),
        ("multislerp", {"weight": [1, -1]}, r"weights sum to 0"),
    ],
)
def test_bad_params_name_the_method_and_key(name: str, params: dict, message: str) -> None:
    with pytest.raises(ScfError, match=rf"method '{name}': invalid params: .*{message}"):
        validate_params(name, params, n_models=2)


PER_MODEL = [("linear", "weight"), ("ties", "density"), ("dare_ties", "weight"), ("della", "epsilon"),
             ("breadcrumbs", "gamma"), ("multislerp", "weight")]


@pytest.mark.parametrize(("name", "key"), PER_MODEL)
def test_per_model_list_must_have_one_value_per_model(name: str, key: str) -> None:
    value = [0.1, 0.1, 0.1] if key in ("epsilon", "gamma") else [0.5, 0.5, 0.5]
    assert getattr(validate_params(name, {key: value}, n_models=3), key) == value
    wrong_length = rf"method '{name}': params\.{key} has 3 values but there are 2 models"
    with pytest.raises(ScfError, match=wrong_length):
        validate_params(name, {key: value}, n_models=2)


def test_unknown_method_in_validate_params() -> None:
    with pytest.raises(ScfError, match="unknown merge method 'tie'; did you mean 'ties'"):
        validate_params("tie", {}, n_models=2)


def test_validated_params_drive_the_method() -> None:
    # the registry's fn accepts exactly the model validate_params returns
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    inputs = TensorInputs(name="x", base=x, secondaries=[x * 3])
    fused = get_method("linear").fn(inputs, validate_params("linear", {"weight": [3, 1]}, 2))
    assert torch.equal(fused, x * 1.5)
