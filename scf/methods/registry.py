"""The one registry of merge methods, written out by hand.

Adding a method: write its pure function in its own module under ``scf/methods/`` and its pydantic
parameter model in ``scf/methods/params.py``, then add one ``MethodSpec`` entry to ``METHODS``
below. Nothing registers itself on import, and this module imports no torch: each entry names its
function as ``"module:function"``, imported on first use (``MethodSpec.fn``), so listing methods
and validating parameters stay fast (as lm-eval's ``MODEL_MAPPING`` names its backends).

``passthrough`` copies one input tensor per output tensor (optionally scaled); with the spec's
``slices`` the engine maps each output layer to a layer of one input (frankenmerges). (A candidate
for later: directional alignment, arXiv 2512.00391, once its algorithm is specified in enough
detail to implement.)

Example:
    >>> spec = get_method("linear")
    >>> params = validate_params("linear", {"weight": [0.7, 0.3]}, n_models=2)
    >>> fused = spec.fn(inputs, params)  # inputs: a TensorInputs
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from scf.errors import ScfError
from scf.methods import params as p

if TYPE_CHECKING:
    import torch

    from scf.methods.base import TensorInputs

MethodFn = Callable[["TensorInputs", BaseModel], "torch.Tensor"]


@dataclass(frozen=True)
class MethodSpec:
    """A merge method as the engine sees it.

    Attributes:
        name: the name users write (``method:`` in configs, ``--method`` on the CLI).
        function: the pure function ``fn(TensorInputs, params) -> Tensor``, as ``"module:function"``
            (imported on first use) or the function itself.
        params: the pydantic model of its parameters (defaults, bounds, unknown keys rejected).
        needs_reference: True for task-vector methods (they need the common ancestor).
        per_model_params: parameter names that may be a list, one value per model
            ``[base, *secondaries]``.
        reference_url: the paper or source defining the method.
        summary: one or two sentences for ``--help`` and docs.
        stored_dtype: True when ``fn`` takes the inputs in their stored dtype (bf16, fp16 or fp32)
            and converts what it needs to float32 a chunk at a time; otherwise the engine hands it
            float32 copies (memory and time for a full upcast of every input).
        optional_reference: the method works without ``reference`` and uses it when given (its
            inputs then become task vectors against it, as mergekit does with an optional
            ``base_model``).
        secondaries: the fewest and most secondaries the method merges (None: no limit).
    """

    name: str
    function: str | MethodFn
    params: type[BaseModel]
    needs_reference: bool
    per_model_params: tuple[str, ...]
    reference_url: str
    summary: str
    stored_dtype: bool = False
    optional_reference: bool = False
    secondaries: tuple[int, int | None] = (1, None)

    @property
    def fn(self) -> MethodFn:
        """The method's function (its module is imported on first use)."""
        return self.function if callable(self.function) else _resolve(self.function)


@cache
def _resolve(path: str) -> MethodFn:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


_GTA = ("weight", "density")  # the per-model parameters of the generalized task-arithmetic presets

METHODS: dict[str, MethodSpec] = {
    "scf_rkl": MethodSpec(
        name="scf_rkl",
        function="scf.methods.scf:scf_rkl",
        params=p.ScfParams,
        needs_reference=False,
        per_model_params=(),
        reference_url=(
            # The paper ("Beyond Parameter Arithmetic: Sparse Complementary Fusion for Distribution-Aware
            # Model Merging", Lin et al., 2026); its arXiv id is not in our copy, so this is a title search.
            "https://arxiv.org/search/?searchtype=title&query="
            "Sparse+Complementary+Fusion+for+Distribution-Aware+Model+Merging"
        ),
        summary=(
            "Sparse complementary fusion with reverse KL (Algorithm 1 of 'Beyond Parameter Arithmetic'): "
            "take a secondary's value where |s-b| * KL(q_base||p_secondary) of its row is an outlier "
            "(>= median + alpha * IQR, exact quantiles), else keep the base's."
        ),
        stored_dtype=True,
    ),
    "scf_kl": MethodSpec(
        name="scf_kl",
        function="scf.methods.scf:scf_kl",
        params=p.ScfParams,
        needs_reference=False,
        per_model_params=(),
        reference_url=(
            "https://arxiv.org/search/?searchtype=title&query="
            "Sparse+Complementary+Fusion+for+Distribution-Aware+Model+Merging"
        ),
        summary=(
            "SCF with forward KL (the paper's ablation). mergekit's `arcee_fusion` is this method "
            "with subsampled, approximate quantiles (and rows over the last dimension); this one is exact."
        ),
        stored_dtype=True,
    ),
    "linear": MethodSpec(
        name="linear",
        function="scf.methods.linear:linear",
        params=p.LinearParams,
        needs_reference=False,
        per_model_params=("weight",),
        reference_url="https://arxiv.org/abs/2203.05482",
        summary="Weighted average of base and secondaries (model soup); mergekit `linear`.",
        stored_dtype=True,
    ),
    "slerp": MethodSpec(
        name="slerp",
        function="scf.methods.slerp:slerp",
        params=p.SlerpParams,
        needs_reference=False,
        per_model_params=(),
        reference_url="https://en.wikipedia.org/wiki/Slerp",
        summary=(
            "Spherical interpolation from the base (t=0) to the one secondary (t=1) along the arc "
            "between the two flattened tensors; linear where they are nearly parallel. mergekit "
            "`slerp` with our base as its base_model."
        ),
        stored_dtype=True,
        secondaries=(1, 1),
    ),
    "nuslerp": MethodSpec(
        name="nuslerp",
        function="scf.methods.slerp:nuslerp",
        params=p.NuslerpParams,
        needs_reference=False,
        per_model_params=("weight",),
        reference_url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        summary=(
            "SLERP of base and secondary with t = w1 / (w0 + w1), over the whole tensor or row by "
            "row; with a reference, of their task vectors. mergekit `nuslerp` (its base_model is "
            "our reference)."
        ),
        stored_dtype=True,
        optional_reference=True,
        secondaries=(1, 1),
    ),
    "multislerp": MethodSpec(
        name="multislerp",
        function="scf.methods.slerp:multislerp",
        params=p.MultislerpParams,
        needs_reference=False,
        per_model_params=("weight",),
        reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        summary=(
            "Weighted interpolation of any number of models on the hypersphere (tangent space at "
            "their weighted mean direction); with a reference, of their task vectors. mergekit "
            "`multislerp` (its base_model is our reference)."
        ),
        stored_dtype=True,
        optional_reference=True,
    ),
    "nearswap": MethodSpec(
        name="nearswap",
        function="scf.methods.nearswap:nearswap",
        params=p.NearswapParams,
        needs_reference=False,
        per_model_params=(),
        reference_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        summary=(
            "Move each base element towards the secondary where the two are close: by "
            "min(1, t / |b - s|). mergekit `nearswap` with our base as its base_model."
        ),
        stored_dtype=True,
        secondaries=(1, 1),
    ),
    "model_stock": MethodSpec(
        name="model_stock",
        function="scf.methods.model_stock:model_stock",
        params=p.ModelStockParams,
        needs_reference=True,
        per_model_params=(),
        reference_url="https://arxiv.org/abs/2403.19522",
        summary=(
            "Model Stock: interpolate between the reference and the models' average by a ratio from "
            "the mean cosine between their task vectors, per tensor or per row. mergekit `model_stock`."
        ),
        stored_dtype=True,
    ),
    "task_arithmetic": MethodSpec(
        name="task_arithmetic",
        function="scf.methods.task_arithmetic:task_arithmetic",
        params=p.TaskArithmeticParams,
        needs_reference=True,
        per_model_params=_GTA,
        reference_url="https://arxiv.org/abs/2212.04089",
        summary="reference + lambda * weighted sum of task vectors (model - reference); mergekit preset.",
        stored_dtype=True,
    ),
    "ties": MethodSpec(
        name="ties",
        function="scf.methods.task_arithmetic:ties",
        params=p.TiesParams,
        needs_reference=True,
        per_model_params=_GTA,
        reference_url="https://arxiv.org/abs/2306.01708",
        summary="TIES: trim task vectors to top-density magnitudes, elect signs, disjoint weighted mean.",
        stored_dtype=True,
    ),
    "dare_linear": MethodSpec(
        name="dare_linear",
        function="scf.methods.task_arithmetic:dare_linear",
        params=p.DareParams,
        needs_reference=True,
        per_model_params=_GTA,
        reference_url="https://arxiv.org/abs/2311.03099",
        summary="DARE: drop task-vector entries at random (seeded), rescale by 1/density, weighted sum.",
        stored_dtype=True,
    ),
    "dare_ties": MethodSpec(
        name="dare_ties",
        function="scf.methods.task_arithmetic:dare_ties",
        params=p.DareParams,
        needs_reference=True,
        per_model_params=_GTA,
        reference_url="https://arxiv.org/abs/2311.03099",
        summary="DARE drop and rescale, then TIES sign election.",
        stored_dtype=True,
    ),
    "breadcrumbs": MethodSpec(
        name="breadcrumbs",
        function="scf.methods.task_arithmetic:breadcrumbs",
        params=p.BreadcrumbsParams,
        needs_reference=True,
        per_model_params=(*_GTA, "gamma"),
        reference_url="https://arxiv.org/abs/2312.06795",
        summary=(
            "Model Breadcrumbs: cut each task vector's largest magnitudes (gamma) and its smallest "
            "(down to density), weighted sum; mergekit preset."
        ),
        stored_dtype=True,
    ),
    "breadcrumbs_ties": MethodSpec(
        name="breadcrumbs_ties",
        function="scf.methods.task_arithmetic:breadcrumbs_ties",
        params=p.BreadcrumbsParams,
        needs_reference=True,
        per_model_params=(*_GTA, "gamma"),
        reference_url="https://arxiv.org/abs/2312.06795",
        summary="Breadcrumbs' two-sided magnitude cut, then TIES sign election; mergekit preset.",
        stored_dtype=True,
    ),
    "della": MethodSpec(
        name="della",
        function="scf.methods.task_arithmetic:della",
        params=p.DellaParams,
        needs_reference=True,
        per_model_params=(*_GTA, "epsilon"),
        reference_url="https://arxiv.org/abs/2406.11617",
        summary=(
            "DELLA: drop task-vector entries at random (seeded) with keep probabilities rising with "
            "their magnitude's rank in the row (density +- epsilon), restore the L1 norm, TIES sign "
            "election; mergekit preset."
        ),
        stored_dtype=True,
    ),
    "della_linear": MethodSpec(
        name="della_linear",
        function="scf.methods.task_arithmetic:della_linear",
        params=p.DellaLinearParams,
        needs_reference=True,
        per_model_params=(*_GTA, "epsilon"),
        reference_url="https://arxiv.org/abs/2406.11617",
        summary="DELLA's rank-based random drop and L1 rescale, then a weighted sum; mergekit preset.",
        stored_dtype=True,
    ),
    "sce": MethodSpec(
        name="sce",
        function="scf.methods.task_arithmetic:sce",
        params=p.SceParams,
        needs_reference=True,
        per_model_params=(),
        reference_url="https://arxiv.org/abs/2408.07990",
        summary="SCE: select high-variance entries, weight task vectors by mean square, erase minority signs",
        stored_dtype=True,
    ),
    "passthrough": MethodSpec(
        name="passthrough",
        function="scf.methods.passthrough:passthrough",
        params=p.PassthroughParams,
        needs_reference=False,
        per_model_params=(),
        reference_url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        summary=(
            "Copy each tensor from one input, times `scale` if given; with `slices`, stack layer "
            "ranges of the inputs into a new model (frankenmerge), layers renumbered. mergekit "
            "`passthrough`."
        ),
        stored_dtype=True,
        secondaries=(0, 0),  # the other inputs of `slices` are layer sources, not secondaries
    ),
}


def get_method(name: str) -> MethodSpec:
    """Look up a merge method by name.

    Args:
        name: a key of ``METHODS``.

    Returns:
        Its ``MethodSpec``.

    Raises:
        ScfError: unknown name; the message suggests the closest names and lists all of them.
    """
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(name, METHODS, n=3, cutoff=0.5)
    hint = f" did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ScfError(f"unknown merge method {name!r};{hint} available: {', '.join(sorted(METHODS))}")


def validate_params(name: str, params: Mapping, n_models: int) -> BaseModel:
    """Validate a method's parameters once, before any tensor is touched.

    Args:
        name: the method name.
        params: user parameters (missing keys take the method's defaults).
        n_models: number of contributing models, ``1 + number of secondaries``; per-model
            parameters given as lists must have exactly this length.

    Returns:
        The method's parameter model instance, defaults filled in.

    Raises:
        ScfError: unknown method, unknown key, out-of-range value, wrong list length, or a number
            of models the method does not merge; the message names the method and the key.
    """
    spec = get_method(name)
    _check_model_count(spec, n_models)
    try:
        validated = spec.params.model_validate(dict(params))
    except ValidationError as exc:
        problems = "; ".join(_describe(err, spec.params) for err in _relevant(exc.errors()))
        raise ScfError(f"method {name!r}: invalid params: {problems}") from None
    for key in spec.per_model_params:
        value = getattr(validated, key)
        if isinstance(value, list) and len(value) != n_models:
            raise ScfError(
                f"method {name!r}: params.{key} has {len(value)} values but there are {n_models} "
                f"models ([base, *secondaries]); give one value per model or a single number"
            )
    return validated


def _check_model_count(spec: MethodSpec, n_models: int) -> None:
    """ScfError unless the method merges ``n_models - 1`` secondaries (slerp: exactly one)."""
    fewest, most = spec.secondaries
    n_secondaries = n_models - 1
    if fewest <= n_secondaries and (most is None or n_secondaries <= most):
        return
    if most == 0:
        raise ScfError(f"method {spec.name!r} copies the base alone (no secondaries; passthrough stacks the "
                       f"layers of several models with slices), got {n_secondaries} secondaries")
    if most == fewest:
        wanted = f"exactly {fewest} secondar{'y' if fewest == 1 else 'ies'}"
    elif most is None:
        wanted = f"at least {fewest} secondar{'y' if fewest == 1 else 'ies'}"
    else:
        wanted = f"{fewest} to {most} secondaries"
    raise ScfError(f"method {spec.name!r} merges the base with {wanted}, got {n_secondaries}")


def _relevant(errors: list) -> list:
    """Keep, per key, the errors that help: drop a scalar-or-list parameter's wrong-branch ones.

    For ``density: 1.7`` pydantic reports both the scalar's range error and "should be a valid
    list"; only the first helps. A key whose errors are all type mismatches keeps the deepest one
    (``density.1`` for ``[0.5, "x"]``).
    """
    branch_mismatch = {"list_type", "float_type", "float_parsing"}
    by_key: dict[tuple, list] = {}
    for err in errors:
        by_key.setdefault(tuple(err["loc"][:1]), []).append(err)
    kept = []
    for group in by_key.values():
        specific = [err for err in group if err["type"] not in branch_mismatch]
        kept += specific or [max(group, key=lambda err: len(err["loc"]))]
    return kept


def _describe(err: Mapping, params_model: type[BaseModel]) -> str:
    """One pydantic error as ``params.<key>: <message> (got <value>)``."""
    # Drop pydantic's union-branch labels ("float", "list[float]") so the path is the user's key.
    loc = [str(part) for part in err["loc"] if not str(part).startswith(("float", "list[", "int", "bool"))]
    message = str(err["msg"]).removeprefix("Value error, ")
    if not loc:  # a check across several keys: its message names them
        return f"params: {message}"
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        known = [field.alias or name for name, field in params_model.model_fields.items()]
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"params.{key}: unknown parameter{hint}; known: {', '.join(known)}"
    if err["type"] == "value_error":  # our validators already quote the offending value
        return f"params.{key}: {message}"
    if err["type"] == "missing":
        return f"params.{key}: required (the method has no default for it)"
    return f"params.{key}: {message} (got {err.get('input')!r})"
