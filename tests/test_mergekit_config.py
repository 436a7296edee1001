"""mergekit configs run unchanged: `scf merge --config mergekit.yml` and `scf convert-config`.

Each example in tests/data/mergekit/ (written here in mergekit's format) runs through the real CLI on
tiny 4-layer checkpoints and must give, bit for bit, the merge we expect it to mean written in our
own format; per-tensor parameters are checked against values computed by hand from mergekit's rule.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flows.cli import main
from scf.errors import ScfError
from scf.merge import merge
from scf.mergekit_config import ARCEE_FUSION_WARNING, local_layer_count, translate
from scf.methods.registry import get_method, validate_params
from scf.methods.resolve import ParamResolver, tensor_position
from scf.spec import MergeSpec
from tests.helpers_ckpt import finetune, llama_config, llama_state, save_checkpoint

DATA = Path(__file__).parent / "data" / "mergekit"
N_LAYERS = 4


def _zoo(root: Path, n_layers: int) -> Path:
    """ancestor, math and code (tiny relatives with ``n_layers`` layers) and the example configs."""
    config = llama_config(n_layers=n_layers, hidden=16, intermediate=32, vocab=64)
    ancestor = llama_state(config, seed=0)
    save_checkpoint(root / "ancestor", ancestor, config)
    save_checkpoint(root / "math", finetune(ancestor, seed=1), config)
    save_checkpoint(root / "code", finetune(ancestor, seed=2), config)
    for path in DATA.glob("*.yml"):
        shutil.copy(path, root / path.name)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4-layer models, for the configs that name layers (slerp's gradients, passthrough's slices)."""
    return _zoo(tmp_path_factory.mktemp("mergekit4"), N_LAYERS)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1-layer models (12 tensors: a third of the time per merge) for the layer-agnostic configs."""
    return _zoo(tmp_path_factory.mktemp("mergekit1"), 1)


def load_output(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors |= load_file(str(shard))
    return tensors


def run_cli(models: Path, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.chdir(models)  # the configs name the models by their directories
    return main(list(argv))


def merged_config(models: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """``scf merge --config <name>.yml`` once per module (several tests read the same output)."""
    out = models / f"mk_{name}"
    if not out.exists():
        code = run_cli(models, monkeypatch, "merge", "--config", f"{name}.yml", "--out", out.name, "--quiet")
        assert code == 0
    return out


def merge_ours(models: Path, out: str, monkeypatch: pytest.MonkeyPatch, **fields) -> dict:
    monkeypatch.chdir(models)
    return merge(MergeSpec(**fields), models / out, progress=False)


# What each example means in our format: roles (base_model is our reference for task vectors), the
# per-model lists in [base, *secondaries] order, dtype from dtype/out_dtype.
OURS: dict[str, dict] = {
    "linear": dict(base="math", secondary=["code"], method="linear", params={"weight": [0.7, 0.3]},
                   dtype="float32"),
    "task_arithmetic": dict(base="math", secondary=["code"], reference="ancestor", method="task_arithmetic",
                            params={"weight": [1.0, 0.5], "lambda": 0.8}),
    "ties": dict(base="math", secondary=["code"], reference="ancestor", method="ties", dtype="bfloat16",
                 params={"weight": [0.6, 0.4], "density": [0.5, 0.7], "normalize": True}),
    "dare_ties": dict(base="math", secondary=["code"], reference="ancestor", method="dare_ties",
                      params={"density": [0.6, 0.8],
                              "weight": [{"filter": "mlp", "value": 0.6}, {"value": 0.4}]}),
    "dare_linear": dict(base="math", secondary=["code"], reference="ancestor", method="dare_linear",
                        params={"weight": 0.5, "density": 0.7, "rescale": False}),
    "della": dict(base="math", secondary=["code"], reference="ancestor", method="della",
                  params={"weight": [0.6, 0.4], "density": [0.5, 0.6], "epsilon": [0.1, 0.2], "lambda": 1.1}),
    "breadcrumbs": dict(base="math", secondary=["code"], reference="ancestor", method="breadcrumbs",
                        params={"weight": 0.5, "density": 0.8, "gamma": 0.05}),
    "model_stock": dict(base="math", secondary=["code"], reference="ancestor", method="model_stock",
                        params={"filter_wise": True}),
    "nearswap": dict(base="math", secondary=["code"], method="nearswap", params={"t": 0.002}),
    "nuslerp": dict(base="math", secondary=["code"], method="nuslerp",
                    params={"weight": [0.3, 0.7], "nuslerp_flatten": False}),
    "arcee_fusion": dict(base="math", secondary=["code"], method="scf_kl"),
    "multislerp": dict(base="math", secondary=["code"], reference="ancestor", method="multislerp",
                       params={"weight": [2.0, 1.0]}),
    "breadcrumbs_ties": dict(base="math", secondary=["code"], reference="ancestor", method="breadcrumbs_ties",
                             params={"weight": [0.7, 0.3], "density": [0.9, 0.7], "gamma": 0.02}),
    "della_linear": dict(base="math", secondary=["code"], reference="ancestor", method="della_linear",
                         params={"weight": 0.5, "density": 0.5, "epsilon": 0.05, "lambda": 0.9}),
    "sce": dict(base="math", secondary=["code"], reference="ancestor", method="sce",
                params={"select_topk": 0.6}),
}


@pytest.mark.parametrize("name", sorted(OURS))
def test_each_example_config_gives_the_merge_it_means(name: str, small: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    models = small
    merged_config(models, monkeypatch, name)
    expected = merge_ours(models, f"ours_{name}", monkeypatch, **OURS[name])
    got, want = load_output(models / f"mk_{name}"), load_output(models / f"ours_{name}")
    assert list(got) == list(want)
    for tensor in got:
        assert torch.equal(got[tensor], want[tensor]), tensor
    report = json.loads((models / f"mk_{name}" / "merge_report.json").read_text())
    assert report["method"] == OURS[name]["method"] and report["params"] == expected["params"]


def test_the_warnings_reach_the_report(small: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    models = small
    arcee = json.loads((merged_config(models, monkeypatch, "arcee_fusion") / "merge_report.json").read_text())
    ties = json.loads((merged_config(models, monkeypatch, "ties") / "merge_report.json").read_text())
    assert arcee["warnings"] == [ARCEE_FUSION_WARNING]
    card = (models / "mk_arcee_fusion" / "README.md").read_text()
    assert card.endswith(f"## Warnings\n\n- {ARCEE_FUSION_WARNING}\n")
    assert ties["warnings"] == [
        "parameters.int8_mask: ignored (int8_mask only changes how mergekit stores its masks, not the "
        "result)",
        "dtype: mergekit computes in bfloat16; scf computes in float32 and writes bfloat16, rounding once "
        "(values may differ from mergekit's by bfloat16 rounding)",
    ]
    (models / "bf16.yml").write_text("merge_method: linear\nmodels: [{model: math}, {model: code}]\n"
                                     "dtype: bfloat16\n")
    capsys.readouterr()
    assert run_cli(models, monkeypatch, "merge", "--config", "bf16.yml", "--out", "bf16", "--quiet") == 0
    assert capsys.readouterr().err == f"warning: {ties['warnings'][1]}\n"


# ------------------------------------------------------------------------- per-tensor parameters

# mergekit's rule by hand for the 5-value gradients over 4 layers: layer i sits at t = i/3, i.e. at
# position 4i/3 in the list: 0, 1 + 1/3, 2 + 2/3, 4. So layer 1 of [0, 0.5, 0.3, 0.7, 1] is
# 2/3 * 0.5 + 1/3 * 0.3 = 0.4333..., layer 2 is 1/3 * 0.3 + 2/3 * 0.7 = 0.5666...; the floats are
# what mergekit's float64 arithmetic gives (frac = 4 * (2/3) - 2 = 0.6666666666666665, ...).
ATTN = {0: 0.0, 1: 0.43333333333333335, 2: 0.5666666666666665, 3: 1.0}
MLP = {0: 1.0, 1: 0.5666666666666667, 2: 0.43333333333333335, 3: 0.0}


def expected_t(name: str) -> float:
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
    if layer is not None and "self_attn" in name:
        return ATTN[layer]
    if layer is not None and ".mlp." in name:
        return MLP[layer]
    return 0.5  # norms, embeddings, the head: the default entry


def test_gradient_positions_and_values_are_mergekits() -> None:
    positions = [tensor_position(f"model.layers.{i}.mlp.up_proj.weight", 4) for i in range(4)]
    assert positions == [0, 1 / 3, 2 / 3, 1]
    assert tensor_position("model.embed_tokens.weight", 4) == 0.0  # before the layers
    assert tensor_position("model.norm.weight", 4) == tensor_position("lm_head.weight", 4) == 1.0
    assert tensor_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0  # a single layer: t = 1
    gradient = {"t": [{"filter": "self_attn", "value": {"gradient": [0, 0.5, 0.3, 0.7, 1]}},
                      {"filter": "mlp", "value": {"gradient": [1, 0.5, 0.7, 0.3, 0]}}, {"value": 0.5}]}
    resolver = ParamResolver("slerp", gradient, 2)
    t_of = {name: resolver.for_tensor(name, tensor_position(name, 4)).t for name in (
        "model.layers.1.self_attn.q_proj.weight", "model.layers.2.self_attn.o_proj.weight",
        "model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.gate_proj.weight",
        "model.layers.3.self_attn.k_proj.weight", "model.layers.3.mlp.up_proj.weight",
        "model.layers.2.input_layernorm.weight", "lm_head.weight")}
    assert t_of == {
        "model.layers.1.self_attn.q_proj.weight": 0.43333333333333335,
        "model.layers.2.self_attn.o_proj.weight": 0.5666666666666665,
        "model.layers.1.mlp.down_proj.weight": 0.5666666666666667,
        "model.layers.2.mlp.gate_proj.weight": 0.43333333333333335,
        "model.layers.3.self_attn.k_proj.weight": 1.0,
        "model.layers.3.mlp.up_proj.weight": 0.0,
        "model.layers.2.input_layernorm.weight": 0.5,
        "lm_head.weight": 0.5,
    }
    assert ParamResolver("slerp", {"t": {"gradient": [0.2, 0.9]}}, 2).for_tensor("x", 0.5).t == 0.55
    strings = ParamResolver("slerp", {"t": 0.5}, 2)
    assert strings.uniform is not None and strings.for_tensor("anything", 0.3).t == 0.5


def test_slerp_gradients_resolve_per_tensor_in_the_merge(models: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = merged_config(models, monkeypatch, "slerp")
    report = json.loads((out / "merge_report.json").read_text())
    got = {record["name"]: record["params"]["t"] for record in report["tensors"]}
    assert got == {name: expected_t(name) for name in got}  # exactly, for every tensor
    assert ATTN[2] == pytest.approx(1 / 3 * 0.3 + 2 / 3 * 0.7, abs=1e-15)
    merged = load_output(out)
    math_, code = load_output(models / "math"), load_output(models / "code")
    slerp = get_method("slerp").fn
    from scf.methods.base import TensorInputs
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight",
                 "model.norm.weight"):
        params = validate_params("slerp", {"t": expected_t(name)}, 2)
        assert torch.equal(merged[name], slerp(TensorInputs(name, math_[name], [code[name]]), params)), name


def test_a_filter_picks_each_tensors_weight(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = small
    report = json.loads((merged_config(models, monkeypatch, "dare_ties") / "merge_report.json").read_text())
    weights = {record["name"]: record["params"]["weight"] for record in report["tensors"]}
    assert weights["model.layers.0.mlp.up_proj.weight"] == 0.6
    assert weights["model.layers.0.self_attn.q_proj.weight"] == 0.4
    assert weights["lm_head.weight"] == 0.4
    assert report["params"]["weight"] == [{"filter": "mlp", "value": 0.6}, {"value": 0.4}]


def test_per_model_filters_fall_back_to_the_top_level_as_in_mergekit(tmp_path: Path) -> None:
    config = {"merge_method": "ties", "base_model": "a",
              "models": [{"model": "b", "parameters": {"weight": [{"filter": "mlp", "value": 2.0}]}},
                         {"model": "c"}],
              "parameters": {"weight": 0.25, "density": [0.2, 0.4]}}
    spec = translate(config, "x.yml", lambda ref: 4).spec
    assert spec["params"] == {"weight": [[{"filter": "mlp", "value": 2.0}, {"value": 0.25}], 0.25],
                              "density": {"gradient": [0.2, 0.4]}}
    resolver = ParamResolver("ties", spec["params"], 2)
    up = resolver.for_tensor("model.layers.3.mlp.up_proj.weight", 1.0)
    q = resolver.for_tensor("model.layers.0.self_attn.q_proj.weight", 0.0)
    assert (up.weight, up.density, q.weight, q.density) == ([2.0, 0.25], 0.4, [0.25, 0.25], 0.2)


# ---------------------------------------------------------------------------------- passthrough


def test_passthrough_stacks_slices_into_a_new_model(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frank = merged_config(models, monkeypatch, "passthrough")
    out = load_output(frank)
    math_, code = load_output(models / "math"), load_output(models / "code")
    assert json.loads((frank / "config.json").read_text())["num_hidden_layers"] == 6
    layers = sorted({int(n.split(".")[2]) for n in out if n.startswith("model.layers.")})
    assert layers == [0, 1, 2, 3, 4, 5]
    assert torch.equal(out["model.embed_tokens.weight"], math_["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], code["lm_head.weight"])
    assert torch.equal(out["model.norm.weight"], code["model.norm.weight"])
    for out_layer, (source, layer) in enumerate([(math_, 0), (math_, 1), (math_, 2), (code, 1), (code, 2),
                                                 (code, 3)]):
        for part in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            name = f"model.layers.{out_layer}.{part}"
            assert torch.equal(out[name], source[f"model.layers.{layer}.{part}"]), name
        o_proj = source[f"model.layers.{layer}.self_attn.o_proj.weight"]
        scale = 0.5 if out_layer >= 3 else 1.0
        assert torch.equal(out[f"model.layers.{out_layer}.self_attn.o_proj.weight"], o_proj * scale)
    assert len(out) == 3 + 6 * 9
    report = json.loads((frank / "merge_report.json").read_text())
    record = next(r for r in report["tensors"] if r["name"] == "model.layers.3.mlp.up_proj.weight")
    assert record["source"] == {"model": "secondary[0]", "tensor": "model.layers.1.mlp.up_proj.weight"}
    assert record["fraction_from"] == {"base": 0.0, "secondary_0": 1.0, "neither": 0.0}
    # the resolved spec it wrote (pinned inputs, slices) reruns to the same bytes
    assert run_cli(models, monkeypatch, "merge", "--config", str(frank / "merge_config.yaml"), "--out",
                   "frank_again", "--quiet") == 0
    again = load_output(models / "frank_again")
    assert list(again) == list(out) and all(torch.equal(again[k], out[k]) for k in out)


def test_passthrough_and_per_tensor_refusals_name_the_tensor_or_slice(
        models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(models)

    def refusal(**fields) -> str:
        with pytest.raises(ScfError) as info:
            merge(MergeSpec(**fields), models / "refused", progress=False)
        assert not (models / "refused").exists()
        return str(info.value)

    beyond = [{"model": "math", "layer_range": [2, 6]}]
    assert refusal(base="math", method="passthrough", slices=beyond) == (
        "slices.0.layer_range: [2, 6] goes beyond the 4 layers of base (math)")
    assert refusal(base="math", secondary=["code"], method="passthrough", slices=beyond,
                   tokenizer_source="union") == (
        "tokenizer_source: 'union' cannot be combined with slices: passthrough's stacked layers keep the "
        "base's tokenizer (leave it unset or 'base')")
    assert refusal(base="math", secondary=["code"], method="passthrough") == (
        "method 'passthrough' copies one model: without slices it takes only the base (got 1 secondaries); "
        "give slices to stack layers of several")
    no_default = {"t": [{"filter": "mlp", "value": 0.5}]}
    assert refusal(base="math", secondary=["code"], method="slerp", params=no_default) == (
        "tensor 'lm_head.weight': method 'slerp': invalid params: params.t: required (the "
        "method has no default for it)")
    with pytest.raises(ValueError, match=r"slices\.0\.model: 'other' is neither base nor a secondary"):
        MergeSpec(base="math", method="passthrough", slices=[{"model": "other", "layer_range": [0, 1]}])


# ------------------------------------------------------------------------------- convert-config


@pytest.mark.parametrize(("name", "zoo"), [("slerp", "models"), ("dare_ties", "small"),
                                         ("passthrough", "models")])
def test_convert_config_round_trips(name: str, zoo: str, request: pytest.FixtureRequest,
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    models = request.getfixturevalue(zoo)
    capsys.readouterr()
    assert run_cli(models, monkeypatch, "convert-config", f"{name}.yml") == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"# scf merge config, converted from the mergekit config {name}.yml\n")
    (models / f"converted_{name}.yml").write_text(printed)
    assert "merge_method" not in yaml.safe_load(printed)
    run_cli(models, monkeypatch, "merge", "--config", f"converted_{name}.yml", "--out", f"rt_{name}",
            "--quiet")
    got, want = load_output(models / f"rt_{name}"), load_output(merged_config(models, monkeypatch, name))
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in got)


def test_convert_config_prints_the_spec_and_imports_no_torch(models: Path) -> None:
    probe = ("import sys; from flows.cli import main; code = main(['convert-config', 'slerp.yml']); "
             "print('torch' in sys.modules, code)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=models,
                            check=True, env=env)
    *spec, last = result.stdout.splitlines()
    assert last == "False 0"
    assert yaml.safe_load("\n".join(spec)) == {
        "base": "math", "secondary": ["code"], "method": "slerp",
        "params": {"t": [{"filter": "self_attn", "value": {"gradient": [0, 0.5, 0.3, 0.7, 1]}},
                         {"filter": "mlp", "value": {"gradient": [1, 0.5, 0.7, 0.3, 0]}}, {"value": 0.5}]},
        "dtype": "float32"}


# ---------------------------------------------------------------------------------------- errors


def refused(config: dict, layers: int | None = 4) -> str:
    with pytest.raises(ScfError) as info:
        translate(config, "m.yml", lambda ref: layers)
    return str(info.value)


MODELS = [{"model": "a"}, {"model": "b"}]


def test_unsupported_keys_and_values_are_errors_that_name_them() -> None:
    assert refused({"merge_method": "karcher", "models": MODELS}) == (
        "mergekit config m.yml: merge_method: 'karcher' is not supported; supported: arcee_fusion, "
        "breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, linear, model_stock, "
        "multislerp, nearswap, nuslerp, passthrough, sce, scf_kl, scf_rkl, slerp, task_arithmetic, ties")
    assert refused({"merge_method": "linear", "models": MODELS, "chat_template": "chatml"}) == (
        "mergekit config m.yml: chat_template: not supported yet: the output keeps the chat template of the "
        "tokenizer source (the base unless tokenizer_source names another input); remove the key")
    assert refused({"merge_method": "linear", "models": MODELS, "name": "x"}) == (
        "mergekit config m.yml: unknown key 'name'; supported mergekit keys: merge_method, base_model, "
        "models, slices, parameters, dtype, out_dtype, tokenizer_source, tokenizer")
    assert refused({"merge_method": "linear", "modules": {}}).startswith(
        "mergekit config m.yml: modules: multi-module merges (modules:) are not supported")
    assert refused({"merge_method": "linear", "models": MODELS, "out_dtype": "int8"}) == (
        "mergekit config m.yml: out_dtype: 'int8' is not supported; supported: float32, float16, bfloat16")
    assert refused({"merge_method": "ties", "models": MODELS}) == (
        "mergekit config m.yml: base_model: required by ties (the common ancestor of the task vectors)")
    assert refused({"merge_method": "slerp", "base_model": "a", "models": MODELS,
                    "parameters": {"t": {"filter": "mlp", "value": 0.3}}}) == (
        "mergekit config m.yml: parameters.t: a single {filter, value} mapping is not a mergekit setting; "
        "write a list of them, ending with a default ({value: ...})")
    ignored = translate({"merge_method": "sce", "base_model": "a",
                         "parameters": {"select_topk": 0.5, "normalize": True},
                         "models": [{"model": "b", "parameters": {"weight": 0.5}}, {"model": "c"}]},
                        "m.yml", lambda ref: 4)
    assert ignored.spec["params"] == {"select_topk": 0.5}
    assert ignored.warnings == [
        "parameters.normalize: ignored, as mergekit ignores it: sce takes select_topk",
        "models[0].parameters.weight: ignored, as mergekit ignores it: not a per-model parameter of sce "
        "(those are: none); put it under the top-level parameters:"]
    assert refused({"merge_method": "linear", "models": [{"model": "a+lora"}]}) == (
        "mergekit config m.yml: models[0].model: 'a+lora': LoRA adapters (model+lora) are not supported; "
        "merge the adapter into its model first")
    assert refused({"merge_method": "linear", "models": MODELS, "tokenizer": {"source": "base",
                                                                              "tokens": {}}}) == (
        "mergekit config m.yml: tokenizer.tokens: not supported yet; tokenizer: takes only source:")


def test_slices_other_than_whole_models_are_errors_for_merge_methods() -> None:
    def slerp_slices(*ranges: list[int]) -> dict:
        return {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5},
                "slices": [{"sources": [{"model": m, "layer_range": r} for m in ("a", "b")]} for r in ranges]}

    assert translate(slerp_slices([0, 4]), "m.yml", lambda ref: 4).spec == {
        "base": "a", "secondary": ["b"], "method": "slerp", "params": {"t": 0.5}}
    assert refused(slerp_slices([0, 2])) == (
        "mergekit config m.yml: slices[0].sources[0].layer_range: [0, 2] is not the whole model (a has 4 "
        "layers: [0, 4]); the merge methods take whole-model slices only, passthrough takes any")
    assert refused(slerp_slices([0, 2], [2, 4])) == (
        "mergekit config m.yml: slices: the merge methods take one slice covering whole models (got 2); "
        "several slices are supported for passthrough only")
    assert refused(slerp_slices([0, 4]), layers=None).startswith(
        "mergekit config m.yml: slices[0].sources[0].layer_range: cannot check that [0, 4] covers every "
        "layer of a: its config.json is not available locally")


def test_roles_and_tokenizer_source_map_exactly() -> None:
    ties = translate({"merge_method": "ties", "base_model": "anc", "models": [{"model": "anc"}, *MODELS],
                      "tokenizer_source": "base"}, "m.yml", lambda ref: 4).spec
    roles = (ties["base"], ties["secondary"], ties["reference"], ties["tokenizer_source"])
    assert roles == ("a", ["b"], "anc", "anc")  # mergekit's "base" tokenizer is its base_model's
    slerp = translate({"merge_method": "slerp", "base_model": "b", "models": MODELS, "parameters": {"t": 0.1},
                       "tokenizer": {"source": "base"}}, "m.yml", lambda ref: 4).spec
    assert (slerp["base"], slerp["secondary"], slerp["tokenizer_source"]) == ("b", ["a"], "base")
    linear = translate({"merge_method": "linear", "base_model": "b", "models": MODELS,
                        "tokenizer_source": "union"}, "m.yml", lambda ref: 4).spec
    assert (linear["base"], linear["secondary"], linear["tokenizer_source"]) == ("b", ["a"], "union")


def test_a_tokenizer_source_runs_the_vocabulary_policy(small: Path, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """ties' mergekit ``tokenizer_source: base`` is its base_model (our reference) with two more rows:
    the rows every model has are merged as without a policy, the two extra rows copied from it."""
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    config = json.loads((small / "ancestor" / "config.json").read_text()) | {"vocab_size": 66}
    wide = load_output(small / "ancestor")
    gen = torch.Generator().manual_seed(9)
    for name in (embed, head):
        wide[name] = torch.cat([wide[name], torch.randn(2, 16, generator=gen)])
    save_checkpoint(tmp_path / "wide", wide, config)
    ties = yaml.safe_load((DATA / "ties.yml").read_text())
    ties["models"][0]["model"] = ties["base_model"] = str(tmp_path / "wide")
    (tmp_path / "wide.yml").write_text(yaml.safe_dump(ties | {"tokenizer_source": "base"}))
    assert run_cli(small, monkeypatch, "merge", "--config", str(tmp_path / "wide.yml"), "--out",
                   str(tmp_path / "out"), "--quiet") == 0
    got, usual = load_output(tmp_path / "out"), load_output(merged_config(small, monkeypatch, "ties"))
    assert list(got) == list(usual)
    for name in got:
        rows = 64 if name in (embed, head) else None
        assert torch.equal(got[name][:rows], usual[name]), name
    for name in (embed, head):
        assert torch.equal(got[name][64:], wide[name][64:].bfloat16()), name
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert (report["vocabulary"]["tokenizer_source"], report["vocabulary"]["source"]) == (
        str(tmp_path / "wide"), "reference")
    assert report["files_from"]["tokenizer"] == "reference"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 66


def test_local_layer_count_reads_config_json(models: Path) -> None:
    assert local_layer_count(str(models / "math")) == N_LAYERS
    assert local_layer_count(str(models / "nowhere")) is None


def test_passthrough_keeps_config_layer_types_in_step(tmp_path: Path) -> None:
    config = llama_config(n_layers=2, hidden=8, intermediate=16, vocab=32)
    config["layer_types"] = ["sliding_attention", "full_attention"]
    model = save_checkpoint(tmp_path / "m", llama_state(config, seed=3), config)
    slices = [{"model": str(model), "layer_range": [0, 2]}, {"model": str(model), "layer_range": [1, 2]}]
    merge(MergeSpec(base=str(model), method="passthrough", slices=slices), tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 3
    assert written["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]
    assert torch.equal(load_output(tmp_path / "out")["model.layers.2.mlp.up_proj.weight"],
                       load_output(model)["model.layers.1.mlp.up_proj.weight"])


def test_passthrough_refuses_layers_of_another_shape(tmp_path: Path) -> None:
    def model(name: str, hidden: int) -> Path:
        config = llama_config(n_layers=1, hidden=hidden, intermediate=16, vocab=32)
        return save_checkpoint(tmp_path / name, llama_state(config, seed=1), config)

    narrow, wide = model("narrow", 8), model("wide", 16)
    slices = [{"model": str(narrow), "layer_range": [0, 1]}, {"model": str(wide), "layer_range": [0, 1]}]
    spec = MergeSpec(base=str(narrow), secondary=[str(wide)], method="passthrough", slices=slices)
    with pytest.raises(ScfError) as info:
        merge(spec, tmp_path / "out", progress=False)
    assert str(info.value) == (
        "slices.1: tensor 'model.layers.0.input_layernorm.weight' of secondary[0] has shape [16], but the "
        "layers stacked before it have [8]: the sliced models must have the same shapes")
    assert not (tmp_path / "out").exists()
