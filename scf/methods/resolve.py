"""Per-tensor parameters: filters and layer gradients, resolved to one validated params model per tensor.

A method's parameter may be, besides a plain value (or a per-model list of plain values):

- a gradient ``{gradient: [v0, v1, ...]}``: interpolated linearly over the layers;
- a filter list ``[{filter: self_attn, value: ...}, ..., {value: ...}]``: the first entry whose
  ``filter`` is a substring of the tensor name (no ``filter``, or ``"*"``, matches every tensor)
  gives the value, itself a plain value or a gradient; when none matches, the method's default
  applies (and a required parameter is an error naming the tensor);
- for a per-model parameter, a list with one of these forms per model ``[base, *secondaries]``.

These are mergekit's parameter forms (0.1.5, ``evaluate_setting`` in its config module) with the same
arithmetic, so the values are mergekit's to the last bit: a gradient of ``n`` values at position
``t`` in [0, 1] sits at ``t * (n - 1)``, between entries ``floor`` and ``floor + 1`` (the last entry
at ``t = 1``), as ``(1 - frac) * lower + frac * upper``; a gradient of strings takes the entry at
``int(t * (n - 1))``. The position ``t`` of a tensor (`tensor_position`): layer ``i`` of ``N`` is at
``i / (N - 1)`` (``1`` when ``N == 1``); tensors outside the layers sit where mergekit's
architecture tables put them: embeddings before the layers (``t = 0``), the final norm and the LM
head after them (``t = 1``).

Torch-free: the CLI's ``convert-config`` and the planner use it before any tensor is read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from scf.errors import ScfError, short_repr
from scf.methods.registry import get_method, validate_params

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
# Tensors outside the layers that mergekit's architectures list before them ("pre weights").
_BEFORE_LAYERS = ("embed_tokens", "embed_in", "wte", "wpe", "word_embeddings", "embeddings.")
_SCALARS = (int, float, str, bool)


def layer_index(name: str) -> int | None:
    """The layer number in a tensor name (``model.layers.7.mlp.up_proj.weight`` -> 7), else None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def renumber(name: str, layer: int) -> str:
    """``name`` with its layer number replaced by ``layer`` (for stacking layers, passthrough)."""
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"{name!r} is not a layer tensor")
    return name[: match.start(1)] + str(layer) + name[match.end(1):]


def before_layers(name: str) -> bool:
    """Whether a tensor outside the layers comes before them (an embedding) rather than after."""
    return any(part in name for part in _BEFORE_LAYERS)


def tensor_position(name: str, n_layers: int) -> float:
    """A tensor's position ``t`` in [0, 1] for gradients, as mergekit computes it for a whole model.

    Args:
        name: the tensor name.
        n_layers: the model's number of layers (config.json ``num_hidden_layers``).

    Returns:
        ``i / (n_layers - 1)`` for layer ``i`` (1.0 with a single layer), 0.0 for an embedding,
        1.0 for any other tensor outside the layers (final norm, LM head).
    """
    index = layer_index(name)
    if index is None:
        return 0.0 if before_layers(name) else 1.0
    return slice_position(index, n_layers)


def slice_position(offset: int, length: int) -> float:
    """Position of the ``offset``-th layer of a run of ``length`` layers (mergekit's rule)."""
    return offset / (length - 1) if length > 1 else 1.0


# ------------------------------------------------------------------------------------ the forms


def is_gradient(value: Any) -> bool:
    """``{gradient: [...]}``."""
    return isinstance(value, Mapping) and set(value) == {"gradient"}


def is_filter_list(value: Any) -> bool:
    """A non-empty list of mappings that each hold a ``value`` (``[{filter: ..., value: ...}, ...]``)."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(item, Mapping) and "value" in item for item in value))


def is_per_tensor(value: Any) -> bool:
    """Whether a parameter's value (or any entry of a per-model list) depends on the tensor."""
    if is_gradient(value) or is_filter_list(value):
        return True
    return isinstance(value, list) and any(is_gradient(v) or is_filter_list(v) for v in value)


def check_setting(key: str, value: Any) -> None:
    """ScfError unless ``value`` is a plain value, a gradient or a filter list (as described above).

    Args:
        key: the parameter's name, for the message (``params.t``, ``params.weight[1]``).
        value: the setting.
    """
    if is_gradient(value):
        _check_gradient(key, value["gradient"])
    elif is_filter_list(value):
        for i, item in enumerate(value):
            extra = set(item) - {"filter", "value"}
            if extra:
                raise ScfError(f"{key}[{i}]: unknown key {sorted(extra)[0]!r}; a condition has `filter` "
                               f"(a substring of the tensor name) and `value`")
            if item.get("filter") is not None and not isinstance(item["filter"], str):
                raise ScfError(f"{key}[{i}].filter: must be a string, got {short_repr(item['filter'])}")
            inner = item["value"]
            if is_gradient(inner):
                _check_gradient(f"{key}[{i}].value", inner["gradient"])
            elif not isinstance(inner, _SCALARS):
                raise ScfError(f"{key}[{i}].value: must be a number, a boolean, a string or "
                               f"{{gradient: [...]}}, got {short_repr(inner)}")
    elif isinstance(value, Mapping):
        raise ScfError(f"{key}: a mapping must be {{gradient: [v0, v1, ...]}}, got keys {sorted(value)}; "
                       f"per-tensor values are a list of {{filter: ..., value: ...}}")


def _check_gradient(key: str, values: Any) -> None:
    if not isinstance(values, list) or not values:
        raise ScfError(f"{key}.gradient: must be a non-empty list, got {short_repr(values)}")
    numbers = all(isinstance(v, int | float) for v in values)
    strings = all(isinstance(v, _SCALARS) for v in values)
    if not (numbers or strings):
        raise ScfError(f"{key}.gradient: every entry must be a number (or every one a string), "
                       f"got {short_repr(values)}")


def evaluate(value: Any, name: str, t: float) -> Any:
    """The value of one setting for tensor ``name`` at position ``t``; None when no filter matches."""
    if is_gradient(value):
        return _interpolate(value["gradient"], t)
    if is_filter_list(value):
        for item in value:
            pattern = item.get("filter")
            if pattern is None or pattern == "*" or pattern in name:
                return evaluate(item["value"], name, t)
        return None
    return value


def _interpolate(values: list, t: float) -> Any:
    """mergekit's gradient rule (see the module docstring); booleans count as numbers, as there."""
    if not all(isinstance(v, int | float) for v in values):
        return values[int(t * (len(values) - 1))]
    position = t * (len(values) - 1)
    lower = int(position)
    upper = min(len(values) - 1, lower + 1)
    frac = position - lower
    return (1 - frac) * values[lower] + frac * values[upper]


# ---------------------------------------------------------------------------------- the resolver


class ParamResolver:
    """A method's parameters for each tensor, validated once per distinct set of values.

    Args:
        method: the method name.
        params: the user's parameters, in any of the forms above.
        n_models: contributing models, ``1 + number of secondaries``.

    Raises:
        ScfError: a malformed form, a per-model list of the wrong length, or (for parameters that
            do not depend on the tensor) an invalid value; the message names the method and key.
    """

    def __init__(self, method: str, params: Mapping[str, Any], n_models: int) -> None:
        self.method = method
        self.n_models = n_models
        self.params = dict(params)
        per_model = set(get_method(method).per_model_params)
        self.varying = {key for key, value in self.params.items() if is_per_tensor(value)}
        for key in self.varying:
            value = self.params[key]
            if key in per_model and isinstance(value, list) and not is_filter_list(value):
                if len(value) != n_models:
                    raise ScfError(f"method {method!r}: params.{key} has {len(value)} values but there are "
                                   f"{n_models} models ([base, *secondaries]); give one value per model or a "
                                   f"single setting")
                for i, entry in enumerate(value):
                    check_setting(f"method {method!r}: params.{key}[{i}]", entry)
            elif isinstance(value, list) and not is_filter_list(value):
                raise ScfError(f"method {method!r}: params.{key} is not a per-model parameter; give one "
                               f"value, {{gradient: [...]}} or a list of {{filter: ..., value: ...}}")
            else:
                check_setting(f"method {method!r}: params.{key}", value)
        self._per_model = per_model
        self._cache: dict[tuple, BaseModel] = {}
        fixed = {key: value for key, value in self.params.items() if key not in self.varying}
        # Fixed parameters are checked now, with the defaults of the varying ones (when they have one).
        self.uniform: BaseModel | None = None
        if not self.varying:
            self.uniform = validate_params(method, fixed, n_models)

    def values(self, name: str, t: float) -> dict[str, Any]:
        """The plain parameter values for tensor ``name`` at position ``t`` (unset ones omitted)."""
        resolved = {key: value for key, value in self.params.items() if key not in self.varying}
        for key in self.varying:
            value = self.params[key]
            if key in self._per_model and isinstance(value, list) and not is_filter_list(value):
                entries = [evaluate(entry, name, t) for entry in value]
                if any(entry is None for entry in entries):
                    entries = self._fill_defaults(key, entries, name)
                resolved[key] = entries
            else:
                entry = evaluate(value, name, t)
                if entry is not None:
                    resolved[key] = entry
        return resolved

    def _fill_defaults(self, key: str, entries: list, name: str) -> list:
        """Per-model entries whose filters all missed take the parameter's default."""
        field = _field(get_method(self.method).params, key)
        if field is None or field.is_required():
            missing = entries.index(None)
            raise ScfError(f"tensor {name!r}: method {self.method!r}: params.{key}[{missing}]: no filter "
                           f"matches this tensor and the parameter has no default")
        default = field.get_default(call_default_factory=True)
        return [default if entry is None else entry for entry in entries]

    def for_tensor(self, name: str, t: float) -> BaseModel:
        """The validated params model for one tensor (cached per distinct set of values).

        Raises:
            ScfError: the values for this tensor are invalid; the message names the tensor.
        """
        if self.uniform is not None:
            return self.uniform
        values = self.values(name, t)
        key = _freeze(values)
        if key not in self._cache:
            try:
                self._cache[key] = validate_params(self.method, values, self.n_models)
            except ScfError as exc:
                raise ScfError(f"tensor {name!r}: {exc}") from None
        return self._cache[key]

    def describe(self, first: BaseModel) -> dict[str, Any]:
        """The parameters for reports and the reproducing config: ``first``'s values (defaults
        filled) with each tensor-dependent parameter as the user wrote it."""
        dumped = first.model_dump(mode="json")
        return {**dumped, **{key: self.params[key] for key in self.varying}}


def _field(model: type[BaseModel], key: str) -> Any:
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_freeze(v) for v in value)
    return (type(value).__name__, value)


def compose(first: Any, fallback: Any) -> Any:
    """One setting that gives ``first``'s value, or ``fallback``'s where ``first``'s filters all miss
    (mergekit looks a parameter up per model, then per slice, then at the top level)."""
    if not is_filter_list(first) or fallback is None:  # None: unset (the method's default)
        return first
    return [*first, *(fallback if is_filter_list(fallback) else [{"value": fallback}])]


def compose_params(first: Mapping[str, Any], fallback: Mapping[str, Any]) -> dict[str, Any]:
    """``first``'s parameters over ``fallback``'s, key by key (see `compose`)."""
    merged = dict(fallback)
    for key, value in first.items():
        merged[key] = compose(value, fallback[key]) if key in fallback else value
    return merged
