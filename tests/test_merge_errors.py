"""Every bad input to `scf merge`: exit code 2, `error: ...` naming the culprit, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers_ckpt import finetune, llama_config, llama_state, run_scf, save_checkpoint

from scf.errors import ScfError
from scf.io import check_free_space
from scf.methods.registry import METHODS


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A valid base/secondary pair (the secondary sharded), used as material for broken variants."""
    root = tmp_path_factory.mktemp("good")
    config = llama_config()
    state = llama_state(config, seed=0)
    return {
        "base": save_checkpoint(root / "base", state, config),
        "sec": save_checkpoint(root / "sec", finetune(state, seed=1), config, shard_size=20_000),
        "root": root,
    }


def variant(good: dict[str, Path], tmp_path: Path, *, config: dict | None = None,
            **changes: torch.Tensor | None) -> Path:
    """A copy of the secondary's tensors with some replaced (a tensor) or removed (None)."""
    state = {name: t for name, t in finetune(llama_state(llama_config(), seed=0), seed=1).items()}
    for name, tensor in changes.items():
        name = name.replace("__", ".")
        if tensor is None:
            del state[name]
        else:
            state[name] = tensor
    return save_checkpoint(tmp_path / "variant", state, config or llama_config())


def assert_refused(args: list[str], out: Path, *fragments: str) -> str:
    """Run `scf merge`, expect exit 2 with every fragment in the message and nothing at or next to ``out``."""
    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    code, _, err = run_scf(["merge", *args, "--out", str(out), "--quiet"])
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not out.exists() or out.is_dir() and any(out.iterdir())  # untouched if it existed
    after = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert after - before <= {out} and not [p for p in after if ".scf-tmp-" in p.name]
    return err


def pair_args(base: Path, sec: Path, method: str = "linear") -> list[str]:
    return ["--base", str(base), "--secondary", str(sec), "--method", method]


def test_missing_path(good: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    assert_refused(pair_args(good["base"], missing), tmp_path / "out", str(missing),
                   "no such file or directory")


def test_missing_hub_id(good: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    assert_refused(pair_args(good["base"], Path("someorg/no-model@v2")), tmp_path / "out",
                   "'someorg/no-model@v2'", "hub repo 'someorg/no-model' at revision 'v2' was not found")


def test_dir_without_safetensors(good: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(llama_config()))
    assert_refused(pair_args(good["base"], empty), tmp_path / "out", f"{empty}: no model weights found")


def test_pickle_only_refused(good: dict[str, Path], tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(llama_state(llama_config(), seed=0), pickled / "pytorch_model.bin")
    assert_refused(pair_args(good["base"], pickled), tmp_path / "out", str(pickled), "pytorch_model.bin",
                   "--allow-pickle")


def test_corrupted_and_truncated(good: dict[str, Path], tmp_path: Path) -> None:
    broken = shutil.copytree(good["base"], tmp_path / "corrupt")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"#" * 40 + data[48:])
    assert_refused(pair_args(broken, good["sec"]), tmp_path / "out1", str(weights),
                   "corrupted safetensors header")
    weights.write_bytes(data[: len(data) // 2])
    assert_refused(pair_args(broken, good["sec"]), tmp_path / "out2", str(weights), "truncated safetensors")


def test_index_names_missing_shard(good: dict[str, Path], tmp_path: Path) -> None:
    broken = shutil.copytree(good["sec"], tmp_path / "sharded")
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert_refused(pair_args(good["base"], broken), tmp_path / "out", "model.safetensors.index.json",
                   f"names shard '{shard.name}', which does not exist")


def test_tensor_in_one_model_only(good: dict[str, Path], tmp_path: Path) -> None:
    fewer = variant(good, tmp_path, model__layers__1__mlp__up_proj__weight=None)
    assert_refused(pair_args(good["base"], fewer), tmp_path / "out", "'model.layers.1.mlp.up_proj.weight'",
                   "present in base", "not in secondary[0]")
    shutil.rmtree(fewer)
    extra = variant(good, tmp_path, model__extra__weight=torch.zeros(3))
    assert_refused(pair_args(good["base"], extra), tmp_path / "out", "'model.extra.weight'",
                   "present in secondary[0]", "not in base")


def test_shape_mismatch(good: dict[str, Path], tmp_path: Path) -> None:
    wrong = variant(good, tmp_path, model__norm__weight=torch.ones(31))
    assert_refused(pair_args(good["base"], wrong), tmp_path / "out", "'model.norm.weight'", "shape mismatch",
                   "base has [32]", "secondary[0] has [31]")


def test_different_architectures(good: dict[str, Path], tmp_path: Path) -> None:
    other = variant(good, tmp_path, config=llama_config(model_type="mistral"))
    assert_refused(pair_args(good["base"], other), tmp_path / "out", "different architectures", "model_type",
                   "'llama'", "'mistral'", str(other / "config.json"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_input_aborts_and_leaves_nothing(good: dict[str, Path], tmp_path: Path,
                                                    bad: float) -> None:
    weight = finetune(llama_state(llama_config(), seed=0), seed=1)["model.norm.weight"].clone()
    weight[5] = bad
    poisoned = variant(good, tmp_path, model__norm__weight=weight)  # the last tensor: shards already written
    assert_refused([*pair_args(good["base"], poisoned), "--shard-size", "10KB"], tmp_path / "out",
                   "'model.norm.weight'", "secondary[0]", str(poisoned / "model.safetensors"), "1 NaN/Inf")


def test_unknown_method(good: dict[str, Path], tmp_path: Path) -> None:
    assert_refused(pair_args(good["base"], good["sec"], method="linaer"), tmp_path / "out",
                   "unknown merge method 'linaer'", "did you mean 'linear'")


def test_unknown_param(good: dict[str, Path], tmp_path: Path) -> None:
    assert_refused([*pair_args(good["base"], good["sec"]), "--set", "wieght=0.5"], tmp_path / "out",
                   "params.wieght", "unknown parameter")


def test_param_out_of_range(good: dict[str, Path], tmp_path: Path) -> None:
    assert_refused([*pair_args(good["base"], good["sec"]), "--set", "weight=[1.0, -1.0]"], tmp_path / "out",
                   "method 'linear'", "weight", "sum to 0")
    assert_refused([*pair_args(good["base"], good["sec"]), "--set", "weight=[1, 2, 3]"], tmp_path / "out",
                   "params.weight has 3 values but there are 2 models")


@pytest.mark.skipif("scf_rkl" not in METHODS, reason="scf_rkl not registered yet")
@pytest.mark.parametrize(("setting", "key"), [("alpha=-0.5", "alpha"), ("q_low=1.5", "q_low"),
                                              ("q_low=0.9", "q_low")])
def test_scf_rkl_params_out_of_range(good: dict[str, Path], tmp_path: Path, setting: str, key: str) -> None:
    assert_refused([*pair_args(good["base"], good["sec"], method="scf_rkl"), "--set", setting],
                   tmp_path / "out", "scf_rkl", key)


@pytest.mark.skipif("task_arithmetic" not in METHODS, reason="task_arithmetic not registered yet")
def test_task_vector_method_without_reference(good: dict[str, Path], tmp_path: Path) -> None:
    assert_refused(pair_args(good["base"], good["sec"], method="task_arithmetic"), tmp_path / "out",
                   "'task_arithmetic'", "needs a reference model", "--reference")


def test_output_exists(good: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(pair_args(good["base"], good["sec"]), out, f"output directory {out} already exists",
                   "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_not_enough_disk_space(tmp_path: Path) -> None:
    with pytest.raises(ScfError, match=f"not enough free disk space in {tmp_path}: the output needs about"):
        check_free_space(tmp_path, 10**18)
    check_free_space(tmp_path, 1024)  # a KB fits


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(good: dict[str, Path], tmp_path: Path) -> None:
    assert_refused([*pair_args(good["base"], good["sec"]), "--device", "cuda"], tmp_path / "out",
                   "device: 'cuda'", "no CUDA device")


def test_bad_set_and_config(good: dict[str, Path], tmp_path: Path) -> None:
    assert_refused([*pair_args(good["base"], good["sec"]), "--set", "alpha"], tmp_path / "out",
                   "--set 'alpha'", "KEY=VALUE")
    config = tmp_path / "merge.yaml"
    config.write_text(f"base: {good['base']}\nsecondary: [{good['sec']}]\nmethod: linear\nshard_sise: 1GB\n")
    assert_refused(["--config", str(config)], tmp_path / "out", str(config), "shard_sise: unknown key")
    config.write_text(f"base: {good['base']}\nsecondary: [{good['sec']}]\nshard_size: lots\n")
    assert_refused(["--config", str(config)], tmp_path / "out", "shard_size", "'lots' is not a size")
    assert_refused(["--config", str(tmp_path / "absent.yaml")], tmp_path / "out", "absent.yaml: no such file")
    assert_refused(["--base", str(good["base"])], tmp_path / "out", "base and secondary are required")
