"""The streaming engine end to end on real safetensors checkpoints: outputs, report, atomicity."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers_ckpt import finetune, llama_config, llama_state, make_pair, save_checkpoint
from helpers_methods import n_secondaries, runnable_params, takes_reference
from safetensors import safe_open

from scf import diagnostics as diag
from scf.io import INDEX_NAME, BackgroundWriter, OutputTensor, ShardedWriter, open_checkpoint
from scf.merge import fraction_from, merge, merge_fingerprint, tensor_seed
from scf.methods.base import TensorInputs
from scf.methods.registry import METHODS, get_method, validate_params
from scf.sources import resolve_source
from scf.spec import MergeSpec

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A sharded float32 base with two fine-tuned secondaries."""
    return make_pair(tmp_path_factory.mktemp("pair"), shard_size=20_000, n_secondaries=2)


@pytest.fixture(scope="module")
def reference(pair: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A common ancestor of the pair (for task-vector methods)."""
    base = open_checkpoint(pair[0])
    state = {name: base.load(name) for name in base.tensors}
    return save_checkpoint(tmp_path_factory.mktemp("ref") / "ref", finetune(state, seed=77), llama_config())


def load_output(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merged model, read back through its index with safetensors."""
    checkpoint = open_checkpoint(out)
    return {name: checkpoint.load(name) for name in checkpoint.tensors}


def expected_output(spec: MergeSpec, name: str) -> torch.Tensor:
    """What the method function gives for one tensor when called directly on the inputs."""
    refs = [spec.base, *spec.secondary] + ([spec.reference] if spec.reference else [])
    tensors = [open_checkpoint(Path(r)).load(name).float() for r in refs]
    n_models = 1 + len(spec.secondary)
    generator = torch.Generator().manual_seed(tensor_seed(spec.seed, name))
    reference = tensors[n_models] if spec.reference else None
    inputs = TensorInputs(name, tensors[0], tensors[1:n_models], reference, generator)
    method = get_method(spec.method)
    return method.fn(inputs, validate_params(spec.method, spec.params, n_models))


def test_round_trip_sharded(pair: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, secs = pair
    spec = MergeSpec(base=str(base), secondary=[str(secs[0])], method="linear",
                     params={"weight": [0.3, 0.7]}, shard_size="30KB")
    report = merge(spec, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in load_output(out).values())
    for shard in shards:  # each shard holds at most shard_size bytes of data (one tensor may exceed it)
        with safe_open(str(out / shard), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118 (safe_open API)
            assert f.metadata()["format"] == "pt"
        assert sum(math.prod(s) * 4 for s in sizes) <= 30_000 or len(sizes) == 1
    merged = load_output(out)
    base_names = open_checkpoint(base).tensors
    assert list(merged) == list(base_names)
    for name, tensor in merged.items():
        assert tensor.shape == base_names[name].shape and tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all()
        assert torch.equal(tensor, expected_output(spec, name)), name
    for aux in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / aux).read_bytes() == (base / aux).read_bytes()
    assert report["totals"]["n_tensors"] == len(merged)


def test_output_loads_with_transformers(pair: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, secs = pair
    spec = MergeSpec(base=str(base), secondary=[str(secs[0])], method="linear", dtype="bfloat16")
    merge(spec, tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    weight = model.model.layers[1].mlp.down_proj.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, expected_output(spec, "model.layers.1.mlp.down_proj.weight").bfloat16())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_matches_its_function(method: str, pair: tuple[Path, list[Path]], reference: Path,
                                           tmp_path: Path) -> None:
    base, secs = pair
    secondaries = secs[: n_secondaries(method, len(secs))]
    spec = MergeSpec(base=str(base), secondary=[str(s) for s in secondaries], method=method, seed=3,
                     reference=str(reference) if takes_reference(method) else None,
                     params=runnable_params(method))
    report = merge(spec, tmp_path / "out", progress=False)
    merged = load_output(tmp_path / "out")
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.equal(merged[name], expected_output(spec, name)), name
    shares = report["totals"]["fraction_from"]
    assert set(shares) == {"base", "neither"} | {f"secondary_{i}" for i in range(len(secondaries))}
    assert sum(shares.values()) == pytest.approx(1.0)
    if method.startswith("scf_"):  # discrete composition: every value is one parent's
        assert shares["neither"] == 0.0 and 0.0 < shares["secondary_0"] < 0.5


def test_dtype_cast_and_integer_passthrough(tmp_path: Path) -> None:
    config = llama_config(n_layers=1)
    state = llama_state(config, seed=1, dtype=torch.bfloat16)
    state["model.position_ids"] = torch.arange(16)
    base = save_checkpoint(tmp_path / "base", state, config)
    tuned = finetune({k: v for k, v in state.items() if v.is_floating_point()}, seed=2)
    sec = save_checkpoint(tmp_path / "sec", tuned | {"model.position_ids": torch.arange(16) * 2}, config)
    spec = MergeSpec(base=str(base), secondary=[str(sec)], method="linear")
    report = merge(spec, tmp_path / "auto", progress=False)
    merged = load_output(tmp_path / "auto")
    assert merged["model.norm.weight"].dtype == torch.bfloat16  # auto keeps the base dtype
    assert torch.equal(merged["model.norm.weight"], expected_output(spec, "model.norm.weight").bfloat16())
    assert torch.equal(merged["model.position_ids"], state["model.position_ids"])  # not merged: base's
    by_name = {r["name"]: r for r in report["tensors"]}
    assert by_name["model.position_ids"]["fraction_from"]["base"] == 1.0
    merge(spec.model_copy(update={"dtype": "float16"}), tmp_path / "f16", progress=False)
    converted = load_output(tmp_path / "f16")
    assert converted["model.norm.weight"].dtype == torch.float16
    assert converted["model.position_ids"].dtype == torch.int64


def test_fraction_from_counts_each_element_once() -> None:
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    sec0 = torch.tensor([1.0, 9.0, 3.5, 4.5, 5.0, 6.5, 7.5, 8.5])
    sec1 = torch.tensor([0.0, 9.0, 3.7, 4.7, 5.0, 6.7, 7.7, 8.7])
    fused = torch.tensor([1.0, 9.0, 3.5, 4.7, 5.0, 6.7, 0.0, 8.5])
    # base: 0 and 4 (4 also equals both secondaries); sec0: 1 (also sec1's), 2, 7; sec1: 3, 5; neither: 6
    assert fraction_from(fused, [base, sec0, sec1]) == {
        "base": 2 / 8, "secondary_0": 3 / 8, "secondary_1": 2 / 8, "neither": 1 / 8}


def test_fraction_from_compares_bits_after_rounding_to_the_output_dtype() -> None:
    base = torch.tensor([0.0, 1.0, 1.0 + 2**-12, 3.0], dtype=torch.float32)
    sec = torch.tensor([5.0, 2.0, 7.0, 3.0], dtype=torch.bfloat16)
    fused = torch.tensor([-0.0, 2.0, 1.0, 3.0], dtype=torch.bfloat16)
    # -0.0 was not taken from the base's +0.0; 1 + 2**-12 rounds to 1.0 in bf16, so it was.
    assert fraction_from(fused, [base, sec]) == {"base": 2 / 4, "secondary_0": 1 / 4, "neither": 1 / 4}
    widened = fused.float()  # a float32 output holds the bf16 values exactly
    assert fraction_from(widened, [base.bfloat16(), sec]) == fraction_from(fused, [base, sec])


def test_report_and_resolved_config_reproduce_the_merge(pair: tuple[Path, list[Path]],
                                                        tmp_path: Path) -> None:
    base, secs = pair
    spec = MergeSpec(base=str(base), secondary=[str(secs[1])], method="linear", params={"weight": [1.0, 0.0]})
    report = merge(spec, tmp_path / "a", progress=False)
    on_disk = json.loads((tmp_path / "a" / "merge_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(report) >= {"method", "params", "inputs", "scf_version", "device", "dtype", "totals",
                           "tensors", "timings", "peak_rss_bytes"}
    assert report["params"] == {"weight": [1.0, 0.0], "normalize": True}
    assert report["inputs"]["base"] == resolve_source(str(base)).as_report()
    assert report["inputs"]["secondaries"][0]["fingerprint"] == resolve_source(str(secs[1])).fingerprint
    assert report["inputs"]["reference"] is None
    # weight [1, 0] returns the base exactly: every element comes from it, nothing is sparse-merged
    assert report["totals"]["fraction_from"] == {"base": 1.0, "secondary_0": 0.0, "neither": 0.0}
    assert report["totals"]["sparsity"] == 1.0
    assert report["totals"]["n_params"] == sum(math.prod(r["shape"]) for r in report["tensors"])
    assert all(r["seconds"] >= 0 and r["sparsity"] == 1.0 for r in report["tensors"])
    assert set(report["timings"]) == {"total_seconds", "read_seconds", "compute_seconds", "write_seconds"}
    assert report["peak_rss_bytes"] > 50 * 2**20 and report["device"] == "cpu"
    resolved = yaml.safe_load((tmp_path / "a" / "merge_config.yaml").read_text())
    assert resolved["params"] == {"weight": [1.0, 0.0], "normalize": True}
    merge(MergeSpec.model_validate(resolved), tmp_path / "b", progress=False)
    for shard in (tmp_path / "a").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def test_overwrite_replaces_the_whole_directory(pair: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, secs = pair
    out = tmp_path / "out"
    spec = MergeSpec(base=str(base), secondary=[str(secs[0])], method="linear")
    merge(spec, out, progress=False)  # an earlier merge output (it has merge_report.json) ...
    (out / "stale.txt").write_text("old")  # ... with a file added since
    merge(spec.model_copy(update={"params": {"weight": [0.3, 0.7]}}), out, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "merge_report.json").read_text())["params"]["weight"] == [0.3, 0.7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp siblings or lock files left


def test_pickled_input_with_allow_pickle(pair: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, secs = pair
    sec = open_checkpoint(secs[0])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({name: sec.load(name) for name in sec.tensors}, pickled / "pytorch_model.bin")
    spec = MergeSpec(base=str(base), secondary=[str(pickled)], method="linear", allow_pickle=True)
    merge(spec, tmp_path / "from_pickle", progress=False)
    merge(spec.model_copy(update={"secondary": [str(secs[0])]}), tmp_path / "from_st", progress=False)
    for shard in (tmp_path / "from_st").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "from_pickle" / shard.name).read_bytes()


def test_tensor_seed_is_sha256_of_seed_and_name() -> None:
    digest = hashlib.sha256(b"7\0model.norm.weight").digest()
    assert tensor_seed(7, "model.norm.weight") == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert len({tensor_seed(s, n) for s in (0, 1) for n in ("a", "b")}) == 4


def test_merge_fingerprint(pair: tuple[Path, list[Path]]) -> None:
    base, secs = pair
    spec = MergeSpec(base=str(base), secondary=[str(secs[0])], method="linear")
    key = merge_fingerprint(spec)
    assert key == merge_fingerprint(spec.model_copy(update={"shard_size": "1GB", "device": "cpu"}))
    assert key == merge_fingerprint(spec.model_copy(update={"params": {"weight": 1.0}}))  # the default
    for change in ({"params": {"weight": [1.0, 2.0]}}, {"seed": 1}, {"dtype": "bfloat16"},
                   {"secondary": [str(secs[1])]}):
        assert merge_fingerprint(spec.model_copy(update=change)) != key, change


def test_diagnostics_match_an_independent_computation(pair: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, secs = pair
    spec = MergeSpec(base=str(base), secondary=[str(secs[0])], method="linear", diagnostics=True)
    report = merge(spec, tmp_path / "out", progress=False)["diagnostics"]
    chosen = set(report["spectral_shift"])
    names = load_output(tmp_path / "out")
    assert chosen == {n for n in names if ".layers." in n and n.endswith("proj.weight")}
    name = "model.layers.1.mlp.down_proj.weight"
    b = open_checkpoint(base).load(name).double().numpy()
    f = load_output(tmp_path / "out")[name].double().numpy()
    ub, sb, _ = np.linalg.svd(b, full_matrices=False)
    uf, sf, _ = np.linalg.svd(f, full_matrices=False)
    shift = np.linalg.norm(sf - sb) / np.linalg.norm(sb)
    assert report["spectral_shift"][name] == pytest.approx(shift, rel=1e-9)
    cos = np.linalg.svd(ub[:, :16].T @ uf[:, :16], compute_uv=False)
    assert report["principal_angle_deg"][name] == pytest.approx(np.degrees(np.arccos(min(cos.min(), 1.0))),
                                                                abs=1e-6)
    assert report["per_layer_sparsity"] == {"0": 0.0, "1": 0.0, "other": 0.0}  # linear touches everything
    only = merge(spec.model_copy(update={"diagnostic_layers": ["*.mlp.up_proj.*"]}), tmp_path / "glob",
                 progress=False)["diagnostics"]
    assert set(only["spectral_shift"]) == {f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)}


def test_default_diagnostic_layers_are_evenly_spaced() -> None:
    shapes = {f"model.layers.{i}.{kind}.weight": (8, 8) for i in range(10) for kind in ("self_attn.q_proj",
                                                                                        "mlp.up_proj")}
    shapes |= {"model.layers.0.input_layernorm.weight": (8,), "model.embed_tokens.weight": (32, 8)}
    chosen = diag.select_matrices(shapes, [])
    assert {diag.layer_index(n) for n in chosen} in ({0, 4, 9}, {0, 5, 9})
    assert len(chosen) == 6 and "model.embed_tokens.weight" not in chosen


def test_killed_mid_merge_leaves_no_destination_and_rerun_succeeds(tmp_path: Path) -> None:
    base, secs = make_pair(tmp_path / "in", n_layers=3, hidden=256, intermediate=512, vocab=512)
    out = tmp_path / "out" / "merged"
    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
              "from pathlib import Path\nfrom scf.merge import merge\nfrom scf.spec import MergeSpec\n"
              f"merge(MergeSpec(base={str(base)!r}, secondary=[{str(secs[0])!r}], method='linear', "
              f"shard_size='1MB'), Path({str(out)!r}), progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".merged.scf-tmp-*/model-*.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, "merge ended before a shard appeared"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert len(list(out.parent.glob(".merged.scf-tmp-*"))) == 1  # the dead process's partial output
    merge(MergeSpec(base=str(base), secondary=[str(secs[0])], method="linear"), out, progress=False)
    assert (out / "merge_report.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]  # stale temp dir cleaned


def test_background_writer_raises_a_write_error_and_stops(tmp_path: Path) -> None:
    tensors = [OutputTensor("a", (2,), torch.float32), OutputTensor("b", (2,), torch.float32)]
    writer = BackgroundWriter(ShardedWriter(tmp_path, tensors, 2**20, {}))
    writer.write("b", torch.zeros(2))  # out of the planned order: the thread's write fails
    with pytest.raises(RuntimeError, match="writer expected"):
        writer.finish()
    writer.abort()  # after a failure: closes the shard, no hang
    (tmp_path / "ok").mkdir()
    ok = BackgroundWriter(ShardedWriter(tmp_path / "ok", tensors, 2**20, {}))
    ok.write("a", torch.ones(2))
    ok.write("b", torch.full((2,), 2.0))
    ok.finish()
    assert ok.busy_seconds > 0
    loaded = open_checkpoint(tmp_path / "ok")
    assert torch.equal(loaded.load("b"), torch.full((2,), 2.0))
