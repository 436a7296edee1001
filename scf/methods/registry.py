"""The one registry of merge methods, written out by hand.

Adding a method: write its pure function and pydantic parameter model in its own module under
``scf/methods/``, then add one ``MethodSpec`` entry to ``METHODS`` below. Nothing registers itself
on import. (Next candidate: directional alignment, arXiv 2512.00391, once its algorithm is
specified in enough detail to implement.)

Example:
    >>> spec = get_method("linear")
    >>> params = validate_params("linear", {"weight": [0.7, 0.3]}, n_models=2)
    >>> fused = spec.fn(inputs, params)  # inputs: a TensorInputs
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ValidationError

from scf.errors import ScfError
from scf.methods.base import TensorInputs
from scf.methods.linear import LINEAR_URL, LinearParams, linear
from scf.methods.scf import SCF_RKL_URL, ScfParams, scf_kl, scf_rkl
from scf.methods.task_arithmetic import (
    DARE_URL,
    SCE_URL,
    TASK_ARITHMETIC_URL,
    TIES_URL,
    DareParams,
    SceParams,
    TaskArithmeticParams,
    TiesParams,
    dare_linear,
    dare_ties,
    sce,
    task_arithmetic,
    ties,
)


@dataclass(frozen=True)
class MethodSpec:
    """A merge method as the engine sees it.

    Attributes:
        name: the name users write (``method:`` in configs, ``--method`` on the CLI).
        fn: the pure function ``fn(TensorInputs, params) -> Tensor``.
        params: the pydantic model of its parameters (defaults, bounds, unknown keys rejected).
        needs_reference: True for task-vector methods (they need the common ancestor).
        per_model_params: parameter names that may be a list, one value per model
            ``[base, *secondaries]``.
        reference_url: the paper or source defining the method.
        summary: one or two sentences for ``--help`` and docs.
        stored_dtype: True when ``fn`` takes the inputs in their stored dtype (bf16, fp16 or fp32)
            and converts what it needs to float32 a chunk at a time; otherwise the engine hands it
            float32 copies (memory and time for a full upcast of every input).
    """

    name: str
    fn: Callable[[TensorInputs, BaseModel], torch.Tensor]
    params: type[BaseModel]
    needs_reference: bool
    per_model_params: tuple[str, ...]
    reference_url: str
    summary: str
    stored_dtype: bool = False


METHODS: dict[str, MethodSpec] = {
    "scf_rkl": MethodSpec(
        name="scf_rkl",
        fn=scf_rkl,
        params=ScfParams,
        needs_reference=False,
        per_model_params=(),
        reference_url=SCF_RKL_URL,
        summary=(
            "Sparse complementary fusion with reverse KL (Algorithm 1 of 'Beyond Parameter Arithmetic'): "
            "take a secondary's value where |s-b| * KL(q_base||p_secondary) of its row is an outlier "
            "(>= median + alpha * IQR, exact quantiles), else keep the base's."
        ),
        stored_dtype=True,
    ),
    "scf_kl": MethodSpec(
        name="scf_kl",
        fn=scf_kl,
        params=ScfParams,
        needs_reference=False,
        per_model_params=(),
        reference_url=SCF_RKL_URL,
        summary=(
            "SCF with forward KL (the paper's ablation). mergekit's `arcee_fusion` is this method "
            "with subsampled, approximate quantiles (and rows over the last dimension); this one is exact."
        ),
        stored_dtype=True,
    ),
    "linear": MethodSpec(
        name="linear",
        fn=linear,
        params=LinearParams,
        needs_reference=False,
        per_model_params=("weight",),
        reference_url=LINEAR_URL,
        summary="Weighted average of base and secondaries (model soup); mergekit `linear`.",
        stored_dtype=True,
    ),
    "task_arithmetic": MethodSpec(
        name="task_arithmetic",
        fn=task_arithmetic,
        params=TaskArithmeticParams,
        needs_reference=True,
        per_model_params=("weight", "density"),
        reference_url=TASK_ARITHMETIC_URL,
        summary="reference + lambda * weighted sum of task vectors (model - reference); mergekit preset.",
        stored_dtype=True,
    ),
    "ties": MethodSpec(
        name="ties",
        fn=ties,
        params=TiesParams,
        needs_reference=True,
        per_model_params=("weight", "density"),
        reference_url=TIES_URL,
        summary="TIES: trim task vectors to top-density magnitudes, elect signs, disjoint weighted mean.",
        stored_dtype=True,
    ),
    "dare_linear": MethodSpec(
        name="dare_linear",
        fn=dare_linear,
        params=DareParams,
        needs_reference=True,
        per_model_params=("weight", "density"),
        reference_url=DARE_URL,
        summary="DARE: drop task-vector entries at random (seeded), rescale by 1/density, weighted sum.",
        stored_dtype=True,
    ),
    "dare_ties": MethodSpec(
        name="dare_ties",
        fn=dare_ties,
        params=DareParams,
        needs_reference=True,
        per_model_params=("weight", "density"),
        reference_url=DARE_URL,
        summary="DARE drop and rescale, then TIES sign election.",
        stored_dtype=True,
    ),
    "sce": MethodSpec(
        name="sce",
        fn=sce,
        params=SceParams,
        needs_reference=True,
        per_model_params=(),
        reference_url=SCE_URL,
        summary="SCE: select high-variance entries, weight task vectors by mean square, erase minority signs",
        stored_dtype=True,
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
        ScfError: unknown method, unknown key, out-of-range value or wrong list length; the
            message names the method and the key.
    """
    spec = get_method(name)
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
    return f"params.{key}: {message} (got {err.get('input')!r})"
