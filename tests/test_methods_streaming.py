"""The task-vector methods stream over flat chunks: same numbers as a whole-tensor reference.

The reference below is the straightforward float32 formulation (stack the task vectors, trim by a
stable sort, one ``bernoulli_`` per model, sum over the stacked dim). The streamed methods do the
same products and sums in the same order, so every comparison is bit for bit, with chunks much
smaller than the tensors (``CHUNK_ELEMENTS`` monkeypatched), bf16/fp16 inputs, and ties at the
trim threshold that straddle chunk boundaries.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scf.methods.base as methods_base
from scf.errors import ScfError
from scf.methods.base import TensorInputs, Workspace
from scf.methods.registry import METHODS, validate_params
from scf.sparsify import variance_select_count

TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "sce", "breadcrumbs",
                       "breadcrumbs_ties", "della", "della_linear")
SPARSIFIER = {"task_arithmetic": None, "ties": "magnitude", "dare_linear": "random", "dare_ties": "random",
              "breadcrumbs": "outliers", "breadcrumbs_ties": "outliers", "della": "della",
              "della_linear": "della"}
GTA_PRESETS = tuple(SPARSIFIER)
CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Stream in 1000-element chunks: every test tensor spans several, the last one partial."""
    monkeypatch.setattr(methods_base, "CHUNK_ELEMENTS", 1000)
    return 1000


def family(n_models: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    """A reference and fine-tune-like models (heavy-tailed deltas), stored in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    reference = torch.randn(shape, generator=g) * 0.02
    models = [reference + torch.randn(shape, generator=g) * torch.randn(shape, generator=g) * 1e-3
              for _ in range(n_models)]
    return reference.to(dtype), [model.to(dtype) for model in models]


def trimming(name: str) -> dict:
    """Parameters that make each task-vector method trim (select) half of the entries."""
    return {"select_topk": 0.5} if name == "sce" else {"density": 0.5}


def call(name: str, reference, models, seed: int = 3, **params) -> torch.Tensor:
    """Validate params like the engine and call the method on the stored-dtype tensors."""
    validated = validate_params(name, params, n_models=len(models))
    inputs = TensorInputs("w", models[0], list(models[1:]), reference, torch.Generator().manual_seed(seed))
    return METHODS[name].fn(inputs, validated)


# --- the whole-tensor float32 reference ---------------------------------------------------------


def top_k_in_index_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest scores; among equal scores the lower flat index wins (stable sort)."""
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(scores.shape)


def band_in_index_order(scores: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of ascending ranks [start, stop) of a stable sort (breadcrumbs' band, ties by index)."""
    order = torch.argsort(scores.flatten(), stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[start:stop]] = True
    return mask.view(scores.shape)


def della_mask(delta: torch.Tensor, density: float, epsilon: float,
               generator: torch.Generator) -> torch.Tensor:
    """mergekit's della_magprune mask: ranks along dim 1 (a stable sort), one bernoulli over the tensor."""
    rows = delta.abs().reshape(1, -1) if delta.dim() < 2 else delta.abs()
    ranks = torch.argsort(torch.argsort(rows, dim=1, stable=True), dim=1).to(torch.float32) + 1
    length = rows.shape[1]
    rank_norm = (ranks - 1) / (length - 1) if length > 1 else torch.full_like(ranks, 0.5)
    probabilities = (density - epsilon) + rank_norm * 2 * epsilon
    return torch.bernoulli(probabilities, generator=generator).view(delta.shape)


def l1_restored(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """mergekit's L1 rescale with exact (float64) sums rounded to float32."""
    before = delta.abs().double().sum().float()
    after = masked.abs().double().sum().float()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def reference_gta(name: str, reference, models, seed: int = 3, **params) -> torch.Tensor:
    """mergekit's generalized task arithmetic on whole float32 tensors (stacked, as mergekit does)."""
    p = validate_params(name, params, n_models=len(models))
    n = len(models)
    weights = p.weight if isinstance(p.weight, list) else [p.weight] * n
    densities = p.density if isinstance(p.density, list) else [p.density] * n
    per_model = {key: value if isinstance(value, list) else [value] * n
                 for key, value in p.model_dump().items() if key in ("gamma", "epsilon")}
    sparsifier = SPARSIFIER[name]
    reference = reference.float()
    generator = torch.Generator().manual_seed(seed)
    deltas = []
    for i, (model, density) in enumerate(zip(models, densities, strict=True)):
        delta = model.float() - reference
        if sparsifier is None or density >= 1:
            deltas.append(delta)
            continue
        if sparsifier == "magnitude":
            masked = delta * top_k_in_index_order(delta.abs(), max(1, int(density * delta.numel())))
        elif sparsifier == "random":
            masked = torch.empty_like(delta).bernoulli_(density, generator=generator) * delta
        elif sparsifier == "outliers":
            kept, cut = int(density * delta.numel()), int(per_model["gamma"][i] * delta.numel())
            bottom = max(0, delta.numel() - kept - cut)
            masked = delta * band_in_index_order(delta.abs(), bottom, bottom + kept)
        else:
            masked = delta * della_mask(delta, density, per_model["epsilon"][i], generator)
        if p.rescale and sparsifier in ("magnitude", "random"):
            masked = masked / density
        elif p.rescale:
            masked = l1_restored(delta, masked)
        deltas.append(masked)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights).view(-1, *[1] * reference.dim())
    weighted = stacked * w
    if name in CONSENSUS:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = weighted.sign() == elected
        merged = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        merged = weighted.sum(0)
        divisor = w.sum()
        divisor = torch.ones_like(divisor) if divisor.abs() < 1e-8 else divisor
    if p.normalize:
        merged = merged / divisor
    return reference + merged * p.lambda_ if p.lambda_ != 1 else reference + merged


def reference_sce(reference, models, select_topk: float = 1.0) -> torch.Tensor:
    """mergekit's SCE on whole float32 tensors; the mean squares in float64, rounded to float32."""
    reference = reference.float()
    deltas = torch.stack([model.float() - reference for model in models])
    if select_topk < 1:
        variance = torch.var(deltas, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * select_topk)  # a float32 product, as mergekit
        deltas = deltas * top_k_in_index_order(variance, k)
    mean_square = (deltas.double().pow(2).flatten(1).sum(1) / reference.numel()).float()
    weights = mean_square / float(mean_square.sum())
    w = weights.view(-1, *[1] * reference.dim())
    agree = deltas.sign() == torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    merged = (deltas * w * agree).sum(0) / (w * agree).sum(0).clamp(min=1e-6)
    return reference + merged


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    differing = int((actual.view(torch.int32) != expected.view(torch.int32)).sum())
    assert differing == 0, f"{differing} of {actual.numel()} elements differ in their bits"


# --- streamed == whole-tensor reference -----------------------------------------------------------

GTA_PARAMS = [
    {},
    {"weight": 0.3, "density": 0.7},
    {"weight": [0.3, -0.2, 0.7], "density": [0.5, 1.0, 0.9], "lambda": 1.3},
    {"weight": [1.0, 2.0, 0.5], "density": 0.3, "normalize": True, "rescale": True},
    {"density": 0.4, "normalize": False, "rescale": False},
]
EXTRA_PARAMS = {  # each sparsifier's own parameters
    "outliers": [{"density": 0.5, "gamma": 0.05, "rescale": True},
                 {"density": [0.3, 0.9, 0.6], "gamma": [0, 0.2, 0.5]},
                 {"density": 0.9, "gamma": 0.3}],  # the last: the outlier cut shrinks to keep 90%
    "della": [{"density": [0.3, 0.6, 0.8], "epsilon": [0.05, 0.2, 0.15], "rescale": False},
              {"density": 0.5, "epsilon": 0.0}],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", GTA_PRESETS)
def test_streamed_gta_is_bit_identical_to_the_whole_tensor_form(small_chunks, name, dtype) -> None:
    reference, models = family(3, (41, 123), dtype)  # 5043 elements: 5 full chunks and a partial one
    for params in GTA_PARAMS + EXTRA_PARAMS.get(SPARSIFIER[name], []):
        if SPARSIFIER[name] == "della" and "density" in params:  # keep density +- epsilon in (0, 1)
            params = {**params, "epsilon": 0.05}
        expected = reference_gta(name, reference, models, **params)
        assert_bitwise_equal(call(name, reference, models, **params), expected)


@pytest.mark.parametrize("name", ["breadcrumbs", "della"])
@pytest.mark.parametrize("shape", [(301,), (13, 1), ()])
def test_vectors_columns_and_scalars_are_trimmed_like_mergekit(small_chunks, name, shape) -> None:
    # rank-1 tensors are one row for DELLA, rows of one element get probability density
    reference, models = family(2, shape, torch.bfloat16, seed=9)
    params = {"density": 0.6, "epsilon": 0.2} if name == "della" else {"density": 0.6, "gamma": 0.1}
    expected = reference_gta(name, reference, models, **params)
    assert_bitwise_equal(call(name, reference, models, **params), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("select_topk", [1.0, 0.37])
def test_streamed_sce_is_bit_identical_to_the_whole_tensor_form(small_chunks, dtype, select_topk) -> None:
    for n_models in (2, 3):
        reference, models = family(n_models, (41, 123), dtype, seed=n_models)
        expected = reference_sce(reference, models, select_topk)
        assert_bitwise_equal(call("sce", reference, models, select_topk=select_topk), expected)


def test_chunk_size_does_not_change_any_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, models = family(2, (7, 61), torch.bfloat16)
    for name in TASK_VECTOR_METHODS:
        params = trimming(name)
        outputs = []
        for chunk in (1 << 22, 100, 33, 1):
            monkeypatch.setattr(methods_base, "CHUNK_ELEMENTS", chunk)
            outputs.append(call(name, reference, models, **params))
        for output in outputs[1:]:
            assert_bitwise_equal(output, outputs[0])


@pytest.mark.parametrize("name", TASK_VECTOR_METHODS)
def test_out_dtype_and_workspace_give_the_float32_result_rounded(small_chunks, name) -> None:
    params = validate_params(name, trimming(name), 2)
    workspace = Workspace()
    for shape in [(41, 123), (7, 13), (41, 123)]:  # the workspace's buffers outlive each tensor
        reference, models = family(2, shape, torch.bfloat16, seed=shape[1])
        alone = call(name, reference, models, **params.model_dump(by_alias=True))
        for out_dtype in (torch.bfloat16, torch.float32):
            generator = torch.Generator().manual_seed(3)  # call()'s seed
            inputs = TensorInputs("w", models[0], models[1:], reference, generator, workspace, out_dtype)
            fused = METHODS[name].fn(inputs, params)
            assert fused.dtype == out_dtype and fused.shape == shape
            assert torch.equal(fused, alone.to(out_dtype))


# --- ties at the threshold, zero task vectors, tiny tensors ---------------------------------------


def test_ties_at_the_trim_threshold_are_kept_in_flat_index_order_across_chunks(small_chunks) -> None:
    reference = torch.zeros(4000, dtype=torch.bfloat16)
    magnitudes = torch.tensor([0.5, 0.25, 0.125, 0.25]).repeat(1000)  # 2000 elements tie at 0.25
    signs = torch.tensor([1.0, -1.0]).repeat(2000)
    base = (magnitudes * signs).to(torch.bfloat16)
    # density 0.5 keeps 2000: the 1000 at 0.5 and the first 1000 of the 2000 tied at 0.25 (at
    # indices 4j+1 and 4j+3, so the 1000th is index 1999, in the second 1000-element chunk)
    out = call("ties", reference, [base, reference.clone()], density=0.5)
    kept = (out != 0).nonzero().squeeze(1)
    tied = ((magnitudes == 0.25).nonzero().squeeze(1))[:1000]
    expected = torch.cat([(magnitudes == 0.5).nonzero().squeeze(1), tied]).sort().values
    assert torch.equal(kept, expected)
    assert int(tied[-1]) == 1999 and int(kept.numel()) == 2000
    assert torch.equal(out[kept], base.float()[kept])  # one model: its entries pass through unchanged


def test_breadcrumbs_band_edges_keep_ties_as_a_stable_sort_across_chunks(small_chunks) -> None:
    # 4000 magnitudes, 1000 each of 0.125, 0.25, 0.5, 1 (interleaved); density 0.5 and gamma 0.125
    # keep ascending ranks [4000 - 2000 - 500, 4000 - 500) = [1500, 3500): the last 500 of the 0.25s,
    # all 0.5s and the first 500 of the 1s, in flat index order, with chunks of 1000 in between
    magnitudes = torch.tensor([1.0, 0.25, 0.125, 0.5]).repeat(1000)
    base = (magnitudes * torch.tensor([1.0, -1.0]).repeat(2000)).to(torch.bfloat16)
    reference = torch.zeros(4000, dtype=torch.bfloat16)
    out = call("breadcrumbs", reference, [base, reference.clone()], density=0.5, gamma=0.125)
    quarter = (magnitudes == 0.25).nonzero().squeeze(1)
    ones = (magnitudes == 1.0).nonzero().squeeze(1)
    expected = torch.cat([quarter[500:], (magnitudes == 0.5).nonzero().squeeze(1), ones[:500]]).sort().values
    assert torch.equal((out != 0).nonzero().squeeze(1), expected)
    assert torch.equal(out[expected], base.float()[expected])


def test_ties_keeps_at_least_one_entry_of_a_small_tensor_like_mergekit() -> None:
    # int(0.2 * 3) = 0, but a positive density keeps at least one element (mergekit 0.1.5):
    # the largest magnitude, -4, is kept and is the only vote
    out = call("ties", torch.zeros(3), [torch.tensor([1.0, -4.0, 2.0]), torch.zeros(3)], density=0.2)
    assert out.tolist() == [0.0, -4.0, 0.0]


def test_sce_select_count_rounds_like_mergekit() -> None:
    # mergekit's int64-count * fraction is a float32 product: the embedding of the 1.5B bench family
    # has 207,187,957 nonzero variances, and select_topk 0.5 keeps 103,593,976 there, not ...978
    assert variance_select_count(207_187_957, 0.5) == 103_593_976
    assert variance_select_count(3, 0.5) == 1  # small counts are exact: int(1.5)
    assert variance_select_count(2**24 + 1, 1.0) == 2**24  # 2**24 + 1 is not a float32


@pytest.mark.parametrize("name", TASK_VECTOR_METHODS)
def test_all_zero_task_vectors_return_the_reference(small_chunks, name) -> None:
    reference, _ = family(1, (33, 97), torch.bfloat16)
    out = call(name, reference, [reference.clone(), reference.clone(), reference.clone()], **trimming(name))
    assert_bitwise_equal(out, reference.float())


@pytest.mark.parametrize("name", TASK_VECTOR_METHODS)
def test_scalar_tensors_merge_like_one_element(name) -> None:
    reference = torch.tensor(1.0)
    out = call(name, reference, [torch.tensor(3.0), torch.tensor(2.0)])
    assert out.shape == () and out.dtype == torch.float32
    # task vectors 2 and 1: a sum of 3 (task_arithmetic, dare_linear, breadcrumbs(_ties), della_linear
    # at density 1), the disjoint mean 1.5 (ties and della normalize), SCE's weighted mean
    # (4/5 * 2 + 1/5 * 1) / 1 = 1.8
    expected = {"task_arithmetic": 4.0, "ties": 2.5, "dare_linear": 4.0, "dare_ties": 4.0, "sce": 2.8,
                "breadcrumbs": 4.0, "breadcrumbs_ties": 4.0, "della": 2.5, "della_linear": 4.0}[name]
    assert out.item() == pytest.approx(expected, abs=1e-6)


# --- inputs: stored dtype, read-only, never modified ---------------------------------------------


@pytest.mark.parametrize("name", TASK_VECTOR_METHODS)
def test_inputs_are_never_modified(small_chunks, name) -> None:
    reference, models = family(2, (29, 101), torch.bfloat16)
    before = [t.clone() for t in (reference, *models)]
    call(name, reference, models, **trimming(name))
    for original, tensor in zip(before, (reference, *models), strict=True):
        assert torch.equal(original.view(torch.int16), tensor.view(torch.int16))


def test_dare_keeps_the_float32_bernoulli_stream_with_bf16_inputs(small_chunks) -> None:
    reference, models = family(2, (50, 80), torch.bfloat16)
    out = call("dare_linear", reference, models, seed=7, weight=[1.0, 0.0], density=0.3)
    expected_keep = torch.empty(50, 80).bernoulli_(0.3, generator=torch.Generator().manual_seed(7)).bool()
    delta = models[0].float() - reference.float()
    assert torch.equal(out != reference.float(), expected_keep & (delta != 0))


def test_a_non_finite_task_vector_is_named_in_the_error() -> None:
    reference = torch.zeros(8)
    base = torch.ones(8)
    base[3] = float("inf")
    with pytest.raises(ScfError, match=r"tensor 'w': .*inf or NaN"):
        call("ties", reference, [base, torch.ones(8)], density=0.5)


@pytest.mark.parametrize("name", TASK_VECTOR_METHODS)
def test_a_missing_reference_names_the_method(name) -> None:
    inputs = TensorInputs("w", torch.ones(3), [torch.ones(3)], None, torch.Generator())
    with pytest.raises(ScfError, match=f"tensor 'w': method '{name}' needs `reference`"):
        METHODS[name].fn(inputs, validate_params(name, {}, 2))


# --- memory ---------------------------------------------------------------------------------------

# A fresh process holds bf16 inputs of 2**23 elements (16 MiB each); a warm-up call loads every
# code path, then the RSS high-water mark is reset (/proc/self/clear_refs) so VmHWM minus VmRSS
# is the method's own peak growth. Streaming needs the float32 result (32 MiB), DARE's and DELLA's
# bool keep masks (8 MiB per model) and under 24 MiB of chunk-sized buffers (16 of them scf.quantile's);
# the stacked whole-tensor form needed 4x the float32 tensor or more.
MEMORY_PROBE = """
import json, sys
from pathlib import Path
import torch
import scf.methods.base as ta
from scf.methods.base import TensorInputs, Workspace
from scf.methods.registry import METHODS, validate_params

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
ta.CHUNK_ELEMENTS = 1 << 18
name, numel = sys.argv[1], 1 << 23
g = torch.Generator().manual_seed(0)
reference = (torch.randn(numel, generator=g) * 0.02).to(torch.bfloat16)
models = [(reference.float() + torch.randn(numel, generator=g) * 1e-3).to(torch.bfloat16) for _ in range(2)]
params = validate_params(name, {"select_topk": 0.5} if name == "sce" else {"density": 0.5}, 2)
def run(n):
    generator = torch.Generator().manual_seed(0)
    rows = lambda t: t[:n].view(-1, 2048)  # matrices: DELLA ranks within rows
    inputs = TensorInputs("w", rows(models[0]), [rows(models[1])], rows(reference), generator)
    return METHODS[name].fn(inputs, params)
run(4096)
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
out = run(numel)
print(json.dumps({"before": before, "peak": status("VmHWM"), "numel": out.numel()}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc RSS accounting")
@pytest.mark.parametrize("name", ["ties", "dare_ties", "sce", "breadcrumbs", "della"])
def test_peak_memory_is_the_result_plus_small_buffers(name: str) -> None:
    probe = [sys.executable, "-c", MEMORY_PROBE, name]
    result = subprocess.run(probe, capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    float32_tensor = 4 * measured["numel"]
    keep_masks = 2 * measured["numel"] if name.startswith(("dare", "della")) else 0
    growth = measured["peak"] - measured["before"]
    assert growth < float32_tensor + keep_masks + 24 * 2**20, (
        f"{name}: peak RSS grew by {growth / 2**20:.1f} MiB; "
        f"the float32 tensor is {float32_tensor / 2**20:.0f} MiB"
    )
