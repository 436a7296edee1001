"""Methods registered with ``stored_dtype`` take bf16/fp16 inputs as stored and give exactly what
they give on float32 upcasts of them (the engine no longer makes full float32 copies for them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_ckpt import finetune, llama_config, llama_state, save_checkpoint
from helpers_methods import n_secondaries, takes_reference

import scf.divergence
import scf.methods.base
import scf.methods.linear
import scf.methods.scf
from scf.io import open_checkpoint
from scf.merge import merge
from scf.methods.base import TensorInputs, Workspace
from scf.methods.registry import METHODS, validate_params
from scf.spec import MergeSpec

STREAMING = sorted(name for name, spec in METHODS.items() if spec.stored_dtype)


def _stored_pair(dtype: torch.dtype, shape: tuple[int, ...], n_secondaries: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    base = (0.02 * torch.randn(shape, generator=gen)).to(dtype)
    deltas = [1e-3 * torch.randn(shape, generator=gen) * torch.randn(shape, generator=gen)
              for _ in range(n_secondaries)]
    return [base, *((base.float() + d).to(dtype) for d in deltas)]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few rows/elements, so every tensor below spans many of them."""
    monkeypatch.setattr(scf.divergence, "_CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(scf.methods.scf, "_SELECT_CHUNK", 777)
    monkeypatch.setattr(scf.methods.linear, "_CHUNK", 999)
    monkeypatch.setattr(scf.methods.base, "CHUNK_ELEMENTS", 555)


def test_every_method_streams_from_the_stored_dtype() -> None:
    assert sorted(METHODS) == STREAMING


PARAMS = {"linear": {"weight": [0.3, 0.5, 0.2]}, "ties": {"density": 0.5}, "dare_linear": {"density": 0.6},
          "dare_ties": {"density": 0.6}, "sce": {"select_topk": 0.5}, "slerp": {"t": 0.3},
          "nearswap": {"t": 1e-3}, "nuslerp": {"weight": [0.3, 0.5]},
          "multislerp": {"weight": [0.3, 0.5, 0.2]},
          "breadcrumbs": {"density": 0.6, "gamma": 0.1, "rescale": True},
          "breadcrumbs_ties": {"density": 0.6, "gamma": 0.1}, "della": {"density": 0.6},
          "della_linear": {"density": 0.5, "epsilon": 0.2}, "model_stock": {"filter_wise": True}}


@pytest.mark.parametrize("method", STREAMING)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 53), (5, 6, 7), (301,)])
def test_stored_dtype_equals_float32_upcast(method: str, dtype: torch.dtype, shape: tuple[int, ...],
                                            small_chunks: None) -> None:
    spec = METHODS[method]
    n_models = 1 + n_secondaries(method, 1 if method.startswith("scf") else 2)
    stored = _stored_pair(dtype, shape, n_secondaries=n_models)  # a reference and the models
    models, reference = stored[1:], (stored[0] if takes_reference(method) else None)
    params = validate_params(method, PARAMS.get(method, {}), len(models))

    def run(tensors: list[torch.Tensor], ref: torch.Tensor | None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(5)  # DARE's drop: the same draw both times
        return spec.fn(TensorInputs("w", tensors[0], tensors[1:], ref, generator), params)

    from_stored = run(models, reference)
    from_float32 = run([t.float() for t in models], None if reference is None else reference.float())
    # SCF and passthrough copy values, so they may keep the stored dtype; the others compute in float32.
    copies = method.startswith("scf") or method == "passthrough"
    assert from_stored.dtype == (dtype if copies else torch.float32)
    assert torch.equal(from_stored.float(), from_float32)
    fresh = _stored_pair(dtype, shape, len(stored) - 1)
    assert all(torch.equal(a, b) for a, b in zip(stored, fresh, strict=True))  # inputs untouched


def test_scf_of_mixed_dtypes_keeps_each_value_exact() -> None:
    base, secondary = _stored_pair(torch.bfloat16, (40, 30))
    secondary = secondary.float() + 1e-4 * torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    fused = METHODS["scf_rkl"].fn(TensorInputs("w", base, [secondary]), validate_params("scf_rkl", {}, 2))
    assert fused.dtype == torch.float32
    from_base = fused == base.float()
    assert torch.equal(fused[~from_base], secondary[~from_base])
    assert 0 < int((~from_base).sum()) < fused.numel()


def test_bf16_checkpoints_merge_to_the_same_values(tmp_path: Path, small_chunks: None) -> None:
    config = llama_config(n_layers=1)
    state = llama_state(config, seed=4, dtype=torch.bfloat16)
    tuned = {name: tensor.to(torch.bfloat16) for name, tensor in finetune(state, seed=5).items()}
    base = save_checkpoint(tmp_path / "base", state, config)
    sec = save_checkpoint(tmp_path / "sec", tuned, config)
    report = merge(MergeSpec(base=str(base), secondary=[str(sec)], method="scf_rkl"), tmp_path / "out",
                   progress=False)
    merged = open_checkpoint(tmp_path / "out")
    params = validate_params("scf_rkl", {}, 2)
    for name in merged.tensors:
        written = merged.load(name)
        assert written.dtype == torch.bfloat16
        upcast = TensorInputs(name, state[name].float(), [tuned[name].float()])
        expected = METHODS["scf_rkl"].fn(upcast, params)
        assert torch.equal(written.float(), expected), name
    assert report["totals"]["fraction_from"]["neither"] == 0.0


def test_workspace_reuses_a_buffer_until_it_must_grow() -> None:
    workspace = Workspace()
    first = workspace.get("k", (4, 5), torch.float32, torch.device("cpu"))
    smaller = workspace.get("k", (3, 2), torch.float32, torch.device("cpu"))
    assert smaller.data_ptr() == first.data_ptr() and smaller.shape == (3, 2)
    other_key = workspace.get("other", (3, 2), torch.float32, torch.device("cpu"))
    assert other_key.data_ptr() != first.data_ptr()
    grown = workspace.get("k", (50,), torch.float32, torch.device("cpu"))
    assert grown.numel() == 50
    assert workspace.get("k", (2,), torch.bfloat16, torch.device("cpu")).dtype == torch.bfloat16


@pytest.mark.parametrize("n_secondaries", [1, 2])
def test_scf_with_a_workspace_returns_a_tensor_of_its_own(n_secondaries: int) -> None:
    # The engine hands the fused tensor to a writer thread while the next tensor is merged in
    # the same workspace: the result must never be a view of a workspace buffer.
    stored = _stored_pair(torch.float32, (40, 30), n_secondaries)
    params = validate_params("scf_rkl", {}, len(stored))
    workspace = Workspace()
    fused = METHODS["scf_rkl"].fn(TensorInputs("w", stored[0], stored[1:], workspace=workspace), params)
    kept = fused.clone()
    assert torch.equal(fused, METHODS["scf_rkl"].fn(TensorInputs("w", stored[0], stored[1:]), params))
    again = _stored_pair(torch.float32, (40, 30), n_secondaries)
    METHODS["scf_rkl"].fn(TensorInputs("v", again[1], again[:1], workspace=workspace), params)
    assert torch.equal(fused, kept)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_rounds_each_chunk_as_the_engine_rounds_the_whole(out_dtype: torch.dtype,
                                                                 small_chunks: None) -> None:
    stored = _stored_pair(torch.bfloat16, (61, 47), n_secondaries=2)
    params = validate_params("linear", {"weight": [0.2, 0.7, 0.4]}, 3)
    direct = METHODS["linear"].fn(TensorInputs("w", stored[0], stored[1:], out_dtype=out_dtype), params)
    in_float32 = METHODS["linear"].fn(TensorInputs("w", stored[0], stored[1:]), params)
    assert direct.dtype == out_dtype and in_float32.dtype == torch.float32
    assert torch.equal(direct, in_float32.to(out_dtype))


def test_a_method_without_stored_dtype_gets_float32_copies(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The easy path for a new method: the engine upcasts every input to float32 before calling it,
    # and rounds what it returns to the output dtype. A probe method records what it is handed.
    import dataclasses

    seen: list[tuple[str, list[torch.dtype]]] = []

    def mean_probe(inputs: TensorInputs, params) -> torch.Tensor:
        models = [inputs.base, *inputs.secondaries]
        seen.append((inputs.name, [t.dtype for t in models]))
        return sum(models) / len(models)

    probe = dataclasses.replace(METHODS["linear"], name="mean_probe", function=mean_probe,
                                stored_dtype=False)
    monkeypatch.setitem(METHODS, "mean_probe", probe)
    config = llama_config(n_layers=1)
    state = llama_state(config, seed=6, dtype=torch.bfloat16)
    tuned = {name: tensor.to(torch.bfloat16) for name, tensor in finetune(state, seed=7).items()}
    base = save_checkpoint(tmp_path / "base", state, config)
    sec = save_checkpoint(tmp_path / "sec", tuned, config)
    spec = MergeSpec(base=str(base), secondary=[str(sec)], method="mean_probe")
    merge(spec, tmp_path / "out", progress=False)

    assert {name for name, _ in seen} == set(state)
    assert all(dtypes == [torch.float32, torch.float32] for _, dtypes in seen)
    merged = open_checkpoint(tmp_path / "out")
    for name in state:
        expected = ((state[name].float() + tuned[name].float()) / 2).to(torch.bfloat16)
        assert torch.equal(merged.load(name), expected), name
