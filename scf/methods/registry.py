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
    """

    name: str
    fn: Callable[[TensorInputs, BaseModel], torch.Tensor]
    params: type[BaseModel]
    needs_reference: bool
    per_model_params: tuple[str, ...]
    reference_url: str
    summary: str


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        name="linear",
        fn=linear,
        params=LinearParams,
        needs_reference=False,
        per_model_params=("weight",),
        reference_url=LINEAR_URL,
        summary="Weighted average of base and secondaries (model soup); mergekit `linear`.",
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
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ScfError(f"method {name!r}: invalid params: {problems}") from None
    for key in spec.per_model_params:
        value = getattr(validated, key)
        if isinstance(value, list) and len(value) != n_models:
            raise ScfError(
                f"method {name!r}: params.{key} has {len(value)} values but there are {n_models} "
                f"models ([base, *secondaries]); give one value per model or a single number"
            )
    return validated


def _describe(err: Mapping) -> str:
    """One pydantic error as ``params.<key>: <message> (got <value>)``."""
    # Drop pydantic's union-branch labels ("float", "list[float]") so the path is the user's key.
    loc = [str(part) for part in err["loc"] if not str(part).startswith(("float", "list[", "int", "bool"))]
    message = str(err["msg"]).removeprefix("Value error, ")
    if not loc:  # a check across several keys: its message names them
        return f"params: {message}"
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        return f"params.{key}: unknown parameter"
    return f"params.{key}: {message} (got {err.get('input')!r})"
