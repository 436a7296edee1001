"""The merge throughput benchmark stays runnable: a tiny synthetic family through the real code path.

Full-size runs live in benchmarks/RESULTS.md; here the same functions run on a ``tiny`` shape so the
script cannot rot while the engine changes under it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark_module(name: str):
    """Import benchmarks/<name>.py by path (benchmarks/ is scripts, not a package)."""
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the class is created
    spec.loader.exec_module(module)
    return module


mt = _load_benchmark_module("merge_throughput")


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory) -> mt.SyntheticFamily:
    return mt.build_family(mt.SHAPES["tiny"], tmp_path_factory.mktemp("bench"), seed=0, progress=False)


@pytest.mark.parametrize("shape_name", ["qwen2.5-0.5b", "qwen2.5-1.5b"])
def test_layout_is_exactly_qwen2_for_causal_lm(shape_name):
    """Names, order and shapes equal transformers' own Qwen2 state dict (lm_head is tied, not saved)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = mt.SHAPES[shape_name]
    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2ForCausalLM(Qwen2Config(**mt.qwen2_config(shape)))
    expected = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if k != "lm_head.weight"]
    assert mt.tensor_layout(shape) == expected


def test_published_dimensions_of_qwen25_15b():
    layout = dict(mt.tensor_layout(mt.SHAPES["qwen2.5-1.5b"]))
    assert layout["model.embed_tokens.weight"] == (151936, 1536)
    assert layout["model.layers.27.mlp.down_proj.weight"] == (1536, 8960)
    assert layout["model.layers.0.self_attn.k_proj.weight"] == (256, 1536)  # 2 kv heads x 128
    assert sum(torch.Size(s).numel() for s in layout.values()) == 1_543_714_304
    assert mt.largest_tensor_fp32_bytes(mt.SHAPES["qwen2.5-1.5b"]) == 151936 * 1536 * 4


def test_family_is_sharded_bf16_finetune_chain_and_cached(tiny_family):
    base_dir = tiny_family.base
    index = json.loads((base_dir / mt.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2  # really sharded
    assert json.loads((base_dir / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    family_dirs = (tiny_family.reference, base_dir, tiny_family.secondary)
    ref, base, sec = (load_file(str(p / shards[0])) for p in family_dirs)
    embed = "model.embed_tokens.weight"
    assert base[embed].dtype == torch.bfloat16
    # secondary = base + a small delta, base = reference + a small delta: most values moved a little
    rel = (sec[embed].float() - base[embed].float()).abs().mean() / base[embed].float().abs().mean()
    assert 0.01 < rel < 0.2
    assert (base[embed] != ref[embed]).float().mean() > 0.5

    mtime = (base_dir / shards[0]).stat().st_mtime_ns
    again = mt.build_family(mt.SHAPES["tiny"], base_dir.parents[2], seed=0, progress=False)
    assert again == tiny_family and (base_dir / shards[0]).stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_bf16_ulp_distance_counts_representable_steps():
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    next_up = torch.tensor([1.0 + 2**-7], dtype=torch.bfloat16)  # bf16 keeps 7 mantissa bits
    assert mt.bf16_ulp_distance(one, next_up).item() == 1
    assert mt.bf16_ulp_distance(torch.tensor([0.0]).bfloat16(), torch.tensor([-0.0]).bfloat16()).item() == 0
    tiny = torch.tensor([2**-133], dtype=torch.bfloat16)  # the smallest positive subnormal
    assert mt.bf16_ulp_distance(tiny, -tiny).item() == 2


def test_compare_outputs_reports_ulps_and_values_from_neither_parent(tiny_family, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    tensors = {}
    weight_map = json.loads((tiny_family.base / mt.INDEX_NAME).read_text())["weight_map"]
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(str(tiny_family.base / shard)))
    embed = tensors["model.embed_tokens.weight"]
    bits = embed.view(torch.int16)
    bits[0, 0] += 3 if bits[0, 0] >= 0 else -3  # 3 ulps away from the base's value, same sign
    save_file(tensors, str(theirs / "model.safetensors"))  # single file, as mergekit writes

    cmp = mt.compare_outputs(tiny_family.base, theirs, tiny_family, progress=False)
    n_total = sum(t.numel() for t in tensors.values())
    assert cmp.missing == []
    assert cmp.max_ulp == 3 and cmp.tensors_over_1ulp == 1
    assert cmp.frac_elements_differ == pytest.approx(1 / n_total)
    assert cmp.frac_neither == pytest.approx(1 / n_total)  # the nudged value is nobody's


def test_mergekit_config_uses_reference_as_base_model_and_float32_compute(tiny_family):
    config = mt.mergekit_config("ties", tiny_family, {"weight": 0.5, "density": 0.5}, ("weight", "density"))
    assert config["base_model"] == str(tiny_family.reference)
    assert [m["model"] for m in config["models"]] == [str(tiny_family.base), str(tiny_family.secondary)]
    assert config["models"][0]["parameters"] == {"weight": 0.5, "density": 0.5}
    assert (config["dtype"], config["out_dtype"]) == ("float32", "bfloat16")
    fusion = mt.mergekit_config("arcee_fusion", tiny_family, {}, ())
    assert fusion["base_model"] == str(tiny_family.base)


def test_tiny_run_measures_floor_time_and_rss_per_method(tiny_family, tmp_path, capsys):
    workdir = tiny_family.base.parents[2]
    out_json = tmp_path / "results.json"
    argv = ["--shape", "tiny", "--methods", "scf_rkl,task_arithmetic", "--workdir", str(workdir)]
    assert mt.main([*argv, "--json", str(out_json)]) == 0

    results = json.loads(out_json.read_text())
    assert all(t > 0 for times in results["floors_s"].values() for t in times)
    assert [row["method"] for row in results["rows"]] == ["scf_rkl", "task_arithmetic"]
    assert [row["n_inputs"] for row in results["rows"]] == [2, 3]
    for row in results["rows"]:
        assert row["ours"]["error"] is None
        assert row["ours"]["wall_s"] > 0
        assert row["ours"]["peak_rss_bytes"] > 50e6  # a real process with torch loaded
        assert 0 < row["ours"]["extra"]["peak_anon_bytes"] <= row["ours"]["peak_rss_bytes"]
    table = capsys.readouterr().out
    assert "| scf_rkl | 2 |" in table and "| task_arithmetic | 3 |" in table
    assert not (workdir / "out" / "scf_rkl").exists()  # outputs removed unless --keep-outputs


def test_stage_profile_times_the_engines_own_scf_rkl_path(tmp_path, capsys):
    """benchmarks/scf_stages.py: its stages compose to exactly scf_rkl's output, and it reports
    every stage, the floor and the primitives as positive per-element costs."""
    from scf.methods.base import TensorInputs
    from scf.methods.scf import ScfParams, scf_rkl

    stages = _load_benchmark_module("scf_stages")
    base, secondary = stages.synthetic_pair(48, 80, seed=3)
    assert base.dtype == secondary.dtype == torch.bfloat16
    assert 0 < (base != secondary).double().mean() < 1  # fine-tuning-like: most, not all, elements move

    callables = stages.stage_callables(base, secondary)
    fused = callables["select where(I >= tau)"]()
    assert torch.equal(fused, scf_rkl(TensorInputs("w", base, [secondary]), ScfParams()))

    out_json = tmp_path / "stages.json"
    assert stages.main(["--rows", "48", "--width", "80", "--repeats", "1", "--json", str(out_json)]) == 0
    results = json.loads(out_json.read_text())
    assert set(results["stages_ns"]) == set(callables)
    assert all(
        v > 0
        for v in [results["floor_ns"], *results["stages_ns"].values(), *results["primitives_ns"].values()]
    )
    pass_1 = results["stages_ns"]["quantiles: pass 1 (high 16 bits)"]  # inside "both passes"
    everything = sum(results["stages_ns"].values())
    assert stages.compute_ns(results["stages_ns"]) == pytest.approx(everything - pass_1)
    printed = capsys.readouterr().out
    assert "compute, all stages" in printed and "3x allows at most" in printed


def test_gpu_check_runs_cpu_against_cpu_and_catches_differences(tiny_zoo, tmp_path, capsys):
    """benchmarks/gpu_check.py, the same code as on a GPU machine, with the CPU as the device under
    test: every step's children run, outputs of separate processes are compared, and the comparisons
    do report an output that differs."""
    check = _load_benchmark_module("gpu_check")
    out = tmp_path / "check"
    argv = ["--device", "cpu", "--shape", "tiny", "--bench-methods", "scf_rkl", "--zoo", str(tiny_zoo)]
    argv += ["--identity-methods", "scf_rkl,linear,dare_ties", "--prompts-per-task", "2", "--out", str(out)]
    assert check.main(argv) == 0

    rows = {row["step"]: row for row in json.loads((out / "gpu_check.json").read_text())}
    assert (out / "gpu_check.md").read_text().strip() == capsys.readouterr().out.strip()  # printed = file
    assert "x the I/O floor" in rows["benchmark scf_rkl"]["detail"]
    assert (
        rows["identity scf_rkl"]["result"] == "PASS" and "mask: 0 of " in rows["identity scf_rkl"]["detail"]
    )
    assert rows["identity linear"]["result"] == "PASS"
    assert "seeded method" in rows["identity dare_ties"]["detail"]  # found to draw random numbers
    assert "seeded method" not in rows["identity linear"]["detail"]
    assert rows["greedy generation"] == {
        "step": "greedy generation",
        "result": "PASS",
        "detail": "zoo math, float32: 6 of 6 prompts with equal token ids (cpu vs cpu)",
        "gpu_mib_after": None,
    }
    assert rows["GPU memory after each child"]["detail"] == "not probed (--device cpu)"

    # The comparisons are real: change one element of the tested scf_rkl output, one token id.
    identity = out / "work" / "identity"
    reference, tested = (
        identity / "reference-cpu" / "scf_rkl-seed0-run0",
        identity / "tested-cpu" / "scf_rkl-seed0-run0",
    )
    assert check.bit_identical(reference, tested)
    base = identity / "models" / "tiny-seed0" / "base"
    shard = next(tested.glob("*.safetensors"))
    tensors = load_file(str(shard))
    name = "model.embed_tokens.weight"
    base_value = mt._Checkpoint(base).get(name)
    kept = (tensors[name].view(torch.int16) == base_value.view(torch.int16)).flatten().nonzero()[0, 0]
    tensors[name].view(torch.int16).view(-1)[kept] ^= 1  # one bit of one element the mask left at base
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert not check.bit_identical(reference, tested)
    assert check.mask_difference(base, reference, tested)[0] == 1
    generations = out / "work" / "generations-tested-cpu.json"
    rows = json.loads(generations.read_text())
    rows[0]["token_ids"] = rows[0]["token_ids"][:-1]
    generations.write_text(json.dumps(rows))
    assert check.compare_generations(out / "work" / "generations-reference-cpu.json", generations) == (5, 6)
