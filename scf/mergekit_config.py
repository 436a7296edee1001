"""Read a mergekit YAML config (mergekit 0.1.5's format) as our `MergeSpec` fields, exactly or not at all.

Everything a mergekit config says either maps onto a MergeSpec field or is an error naming the key
and what is supported; nothing is dropped silently. What the mapping decides:

- Roles. mergekit's ``base_model`` is our ``reference`` for the task-vector methods (their task
  vectors are ``model - base_model``; the base_model's own parameters are unused, as in mergekit),
  our ``base`` for ``slerp`` (its ``t = 0`` end), ``nearswap``, ``arcee_fusion`` and the SCF methods,
  an optional ``reference`` for ``nuslerp`` and ``multislerp``, and the first of the averaged
  models for ``linear``. The other ``models`` are, in their order, our base (when base_model is not)
  and secondaries.
- Parameters. mergekit looks a per-model parameter (``weight``, ``density``, ``gamma``,
  ``epsilon``) up in the model's ``parameters``, then the slice's, then the top-level ones, and the
  others at the top level only; each may be a scalar, a gradient (a list of numbers) or a list of
  ``{filter, value}`` conditions. They become our per-model lists and per-tensor forms
  (`scf.methods.resolve`), with the lookup order kept by appending the fallbacks' conditions.
- ``slices``. For the merge methods, one slice whose sources each cover their whole model
  (``layer_range: [0, num_hidden_layers]``), as common slerp configs write it; for ``passthrough``,
  any slices of one source each (a frankenmerge).
- ``dtype`` (mergekit's compute dtype) and ``out_dtype`` become our output ``dtype`` (we always
  compute in float32: the report says so when it matters), ``tokenizer_source`` and
  ``tokenizer: {source: ...}`` our ``tokenizer_source``.

Torch-free: ``scf convert-config`` imports it without the merge engine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scf.errors import ScfError, short_repr
from scf.methods.registry import METHODS, get_method
from scf.methods.resolve import compose

TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer")
_NOT_SUPPORTED = {
    "modules": "multi-module merges (modules:) are not supported; merge each module with models: or slices:",
    "chat_template": "not supported yet: the output keeps the chat template of the tokenizer "
                     "source (the base unless tokenizer_source names another input); remove the key",
}
_BASE, _REFERENCE, _OPTIONAL_REFERENCE = "base", "reference", "optional"
_FIRST, _PASSTHROUGH = "first", "passthrough"
ROLES: dict[str, str] = {
    "linear": _FIRST,
    "slerp": _BASE, "nearswap": _BASE, "arcee_fusion": _BASE, "scf_rkl": _BASE, "scf_kl": _BASE,
    "nuslerp": _OPTIONAL_REFERENCE, "multislerp": _OPTIONAL_REFERENCE,
    "task_arithmetic": _REFERENCE, "ties": _REFERENCE, "dare_ties": _REFERENCE, "dare_linear": _REFERENCE,
    "breadcrumbs": _REFERENCE, "breadcrumbs_ties": _REFERENCE, "della": _REFERENCE,
    "della_linear": _REFERENCE, "sce": _REFERENCE, "model_stock": _REFERENCE,
    "passthrough": _PASSTHROUGH,
}
_RENAMED = {"arcee_fusion": "scf_kl"}
ARCEE_FUSION_WARNING = (
    "merge_method arcee_fusion runs as scf_kl, its exact form: mergekit's arcee_fusion takes its "
    "quantiles from a random subsample of at most 1,000,000 importance scores (no interpolation) and "
    "computes the softmax and KL in the inputs' dtype (bfloat16 by default), so its outputs differ "
    "from these")
_DTYPES = ("float32", "float16", "bfloat16")
_MEMORY_ONLY = {"int8_mask": "int8_mask only changes how mergekit stores its masks, not the result"}

LayersOf = Callable[[str], "int | None"]


@dataclass
class Translation:
    """A mergekit config as MergeSpec fields, and the notes the merge report must carry."""

    spec: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def is_mergekit(data: Mapping[str, Any]) -> bool:
    """Whether a config mapping is in mergekit's format (our format has none of these keys)."""
    return any(key in data for key in ("merge_method", "models", "base_model", "out_dtype"))


def translate(data: Mapping[str, Any], origin: str, layers_of: LayersOf) -> Translation:
    """Turn a mergekit config into MergeSpec fields.

    Args:
        data: the parsed YAML mapping.
        origin: where it came from (a file name), for messages.
        layers_of: a model reference's number of layers (config.json ``num_hidden_layers``), or
            None when it cannot be known; used to check that ``slices`` cover whole models.

    Returns:
        The fields (validate them with `scf.spec.spec_from_mapping`) and the report's warnings.

    Raises:
        ScfError: an unknown or unsupported key or value; the message names it and ``origin``.
    """
    try:
        return _Translator(data, layers_of).run()
    except ScfError as exc:
        raise ScfError(f"mergekit config {origin}: {exc}") from None


class _Translator:
    def __init__(self, data: Mapping[str, Any], layers_of: LayersOf) -> None:
        self.data = data
        self.layers_of = layers_of
        self.warnings: list[str] = []

    def run(self) -> Translation:
        self._check_keys()
        name = self.data.get("merge_method")
        if not isinstance(name, str):
            raise ScfError("merge_method: required, one of " + ", ".join(sorted(ROLES)))
        if name not in ROLES:
            raise ScfError(f"merge_method: {name!r} is not supported; supported: {', '.join(sorted(ROLES))}")
        method = _RENAMED.get(name, name)
        if name == "arcee_fusion":
            self.warnings.append(ARCEE_FUSION_WARNING)
        base_model = _model_ref(self.data.get("base_model"), "base_model")
        top = _params(self.data.get("parameters"), "parameters")
        if ROLES[name] == _PASSTHROUGH:
            spec = self._passthrough(base_model, top)
        else:
            entries, slice_params = self._entries()
            spec = self._merge(name, method, base_model, entries, compose_all(slice_params, top))
        spec |= self._dtype() | self._tokenizer(spec, base_model, ROLES[name])
        return Translation(spec, self.warnings)

    def _check_keys(self) -> None:
        for key in self.data:
            if key in _NOT_SUPPORTED:
                raise ScfError(f"{key}: {_NOT_SUPPORTED[key]}")
            if key not in TOP_LEVEL_KEYS:
                raise ScfError(f"unknown key {key!r}; supported mergekit keys: {', '.join(TOP_LEVEL_KEYS)}")
        if ("models" in self.data) == ("slices" in self.data):
            raise ScfError("give exactly one of models: or slices:")

    # ------------------------------------------------------------------------------- the inputs

    def _entries(self) -> tuple[list[tuple[str, dict[str, Any], str]], dict[str, Any]]:
        """``(model, parameters, where)`` of every input, from ``models:`` or one whole-model slice,
        and that slice's parameters (looked up before the top-level ones, as in mergekit)."""
        if "models" in self.data:
            models = self.data["models"]
            if not isinstance(models, list) or not models:
                raise ScfError("models: must be a non-empty list of {model: ..., parameters: ...}")
            return [self._model_entry(item, f"models[{i}]") for i, item in enumerate(models)], {}
        slices = self._slices()
        if len(slices) != 1:
            raise ScfError(f"slices: the merge methods take one slice covering whole models (got "
                           f"{len(slices)}); several slices are supported for passthrough only")
        layer_slice, where = slices[0], "slices[0]"
        extra = set(layer_slice) - {"sources", "parameters"}
        if extra:
            raise ScfError(f"{where}.{sorted(extra)[0]}: not supported; a slice has sources and parameters")
        entries = []
        for i, source in enumerate(self._sources(layer_slice, where)):
            entry = self._model_entry(source, f"{where}.sources[{i}]", layer_range=True)
            self._check_whole_model(entry[0], source["layer_range"], entry[2])
            entries.append(entry)
        return entries, _params(layer_slice.get("parameters"), f"{where}.parameters")

    def _slices(self) -> list[Mapping[str, Any]]:
        slices = self.data["slices"]
        if not isinstance(slices, list) or not slices or not all(isinstance(s, Mapping) for s in slices):
            raise ScfError("slices: must be a non-empty list of {sources: [...]}")
        return slices

    @staticmethod
    def _sources(layer_slice: Mapping[str, Any], where: str) -> list[Mapping[str, Any]]:
        sources = layer_slice.get("sources")
        if not isinstance(sources, list) or not sources:
            raise ScfError(f"{where}.sources: must be a non-empty list of "
                           f"{{model: ..., layer_range: [start, end]}}")
        return sources

    @staticmethod
    def _model_entry(item: Any, where: str, layer_range: bool = False) -> tuple[str, dict[str, Any], str]:
        if not isinstance(item, Mapping):
            raise ScfError(f"{where}: must be a mapping {{model: ..., parameters: ...}}, "
                           f"got {short_repr(item)}")
        allowed = {"model", "parameters"} | ({"layer_range"} if layer_range else set())
        extra = set(item) - allowed
        if extra:
            raise ScfError(f"{where}.{sorted(extra)[0]}: not supported; an entry has "
                           f"{', '.join(sorted(allowed))}")
        if layer_range and "layer_range" not in item:
            raise ScfError(f"{where}.layer_range: required ([start, end])")
        return _model_ref(item.get("model"), f"{where}.model"), _params(item.get("parameters"),
                                                                       f"{where}.parameters"), where

    def _check_whole_model(self, model: str, layer_range: Any, where: str) -> None:
        start, end = _layer_range(layer_range, f"{where}.layer_range")
        n_layers = self.layers_of(model)
        if n_layers is None:
            raise ScfError(f"{where}.layer_range: cannot check that [{start}, {end}] covers every layer "
                           f"of {model}: its config.json is not available locally (download it, or "
                           f"write models: instead of slices:)")
        if (start, end) != (0, n_layers):
            raise ScfError(f"{where}.layer_range: [{start}, {end}] is not the whole model ({model} has "
                           f"{n_layers} layers: [0, {n_layers}]); the merge methods take whole-model slices "
                           f"only, passthrough takes any")

    # ---------------------------------------------------------------------------- merge methods

    def _merge(self, name: str, method: str, base_model: str | None, entries: list, top: dict) -> dict:
        role = ROLES[name]
        models = [model for model, _, _ in entries]
        for i, model in enumerate(models):
            if model in models[:i]:
                raise ScfError(f"{entries[i][2]}.model: {model!r} is listed twice")
        if role in (_BASE, _REFERENCE) and base_model is None:
            what = ("the t=0 end and the output's base" if role == _BASE
                    else "the common ancestor of the task vectors")
            raise ScfError(f"base_model: required by {name} ({what})")
        if role == _FIRST and base_model is not None and base_model not in models:
            raise ScfError(f"base_model: {base_model!r} is not one of models: {name} averages the models "
                           f"listed (mergekit adds an unlisted base_model without a weight)")
        ordered = [e for e in entries if e[0] == base_model] if role in (_BASE, _FIRST) else []
        others = [e for e in entries if e[0] != base_model]
        for model, params, where in entries:
            if model == base_model and role in (_REFERENCE, _OPTIONAL_REFERENCE) and params:
                self.warnings.append(f"{where}.parameters: unused, as in mergekit: the base_model {model} "
                                     f"is the reference of {name}'s task vectors")
        if role == _BASE and not ordered:
            ordered = [(base_model, {}, "base_model")]
        contributors = ordered + others
        if not contributors or (role != _FIRST and not others):
            raise ScfError(f"models: {name} needs at least one model besides base_model")
        spec: dict[str, Any] = {"base": contributors[0][0], "secondary": [e[0] for e in contributors[1:]],
                                "method": method}
        if role in (_REFERENCE, _OPTIONAL_REFERENCE) and base_model is not None:
            spec["reference"] = base_model
        spec["params"] = self._method_params(method, contributors, top)
        return spec

    def _method_params(self, method: str, contributors: list, top: dict) -> dict[str, Any]:
        registry = get_method(method)
        per_model = set(registry.per_model_params)
        known = {field.alias or name for name, field in registry.params.model_fields.items()}
        params: dict[str, Any] = {}
        for key, value in top.items():
            if key in _MEMORY_ONLY:
                self.warnings.append(f"parameters.{key}: ignored ({_MEMORY_ONLY[key]})")
            elif key not in known:  # mergekit reads only the parameters its method declares
                self.warnings.append(f"parameters.{key}: ignored, as mergekit ignores it: {method} takes "
                                     f"{', '.join(sorted(known)) or 'no parameters'}")
            elif key not in per_model:
                params[key] = value
        for _, model_params, where in contributors:
            for key in [k for k in model_params if k not in per_model]:
                # mergekit reads these at the slice and top level only, so it never sees this one
                listed = ", ".join(sorted(per_model)) or "none"
                self.warnings.append(f"{where}.parameters.{key}: ignored, as mergekit ignores it: not a "
                                     f"per-model parameter of {method} (those are: {listed}); put it under "
                                     f"the top-level parameters:")
        for key in sorted(per_model & ({k for _, p, _ in contributors for k in p} | set(top))):
            entries = [_compose_optional(p.get(key), top.get(key)) for _, p, _ in contributors]
            params[key] = _per_model_value(registry, key, entries, [w for _, _, w in contributors])
        return params

    # ----------------------------------------------------------------------------- passthrough

    def _passthrough(self, base_model: str | None, top: dict) -> dict:
        if base_model is not None:
            raise ScfError("base_model: passthrough takes none (each slice names its model)")
        for key in top:
            if key in _MEMORY_ONLY:
                raise ScfError(f"parameters.{key}: not a passthrough parameter")
        if "models" in self.data:
            models = self.data["models"] if isinstance(self.data["models"], list) else []
            entries = [self._model_entry(item, f"models[{i}]") for i, item in enumerate(models)]
            if len(entries) != 1:
                raise ScfError(f"models: passthrough copies one model (got {len(entries)}); stack layers of "
                               f"several with slices:")
            model, params, _ = entries[0]
            return {"base": model, "secondary": [], "method": "passthrough",
                    "params": compose_all(params, top)}
        slices, refs = [], []
        for i, layer_slice in enumerate(self._slices()):
            where = f"slices[{i}]"
            extra = set(layer_slice) - {"sources", "parameters"}
            if extra:
                raise ScfError(f"{where}.{sorted(extra)[0]}: not supported; a slice has sources and "
                               f"parameters")
            sources = self._sources(layer_slice, where)
            if len(sources) != 1:
                raise ScfError(f"{where}.sources: passthrough takes one source per slice "
                               f"(got {len(sources)})")
            model, params, at = self._model_entry(sources[0], f"{where}.sources[0]", layer_range=True)
            start, end = _layer_range(sources[0]["layer_range"], f"{at}.layer_range")
            slice_params = _params(layer_slice.get("parameters"), f"{where}.parameters")
            slices.append({"model": model, "layer_range": [start, end],
                           "params": compose_all(params, slice_params)})
            if model not in refs:
                refs.append(model)
        return {"base": refs[0], "secondary": refs[1:], "method": "passthrough", "params": top,
                "slices": slices}

    # ------------------------------------------------------------------------ dtype, tokenizer

    def _dtype(self) -> dict[str, Any]:
        compute, out = (_dtype(self.data.get(key), key) for key in ("dtype", "out_dtype"))
        if compute is not None and compute != "float32":
            self.warnings.append(f"dtype: mergekit computes in {compute}; scf computes in float32 and writes "
                                 f"{out or compute}, rounding once (values may differ from mergekit's by "
                                 f"{compute} rounding)")
        chosen = out or compute
        return {"dtype": chosen} if chosen else {}

    def _tokenizer(self, spec: dict, base_model: str | None, role: str) -> dict[str, Any]:
        source = self.data.get("tokenizer_source")
        if "tokenizer" in self.data:
            if "tokenizer_source" in self.data:
                raise ScfError("tokenizer: give tokenizer_source or tokenizer, not both (as mergekit)")
            tokenizer = self.data["tokenizer"]
            if not isinstance(tokenizer, Mapping) or set(tokenizer) - {"source"}:
                keys = sorted(set(tokenizer) - {"source"}) if isinstance(tokenizer, Mapping) else []
                what = f"tokenizer.{keys[0]}" if keys else "tokenizer"
                raise ScfError(f"{what}: not supported yet; tokenizer: takes only source:")
            source = tokenizer.get("source")
        if source is None:
            return {}
        if not isinstance(source, str):
            raise ScfError(f"tokenizer_source: must be base, union or a model, got {short_repr(source)}")
        if source == "base" and role not in (_BASE, _FIRST):
            source = base_model or spec["base"]  # mergekit's base_model, which is not our base here
        if source == spec["base"]:
            source = "base"
        return {"tokenizer_source": source}


# ----------------------------------------------------------------------------------- the values


def _model_ref(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ScfError(f"{where}: must be a model name or path (a string), got {short_repr(value)}")
    if "+" in value:
        raise ScfError(f"{where}: {value!r}: LoRA adapters (model+lora) are not supported; merge the adapter "
                       f"into its model first")
    return value


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)
            and 0 <= value[0] < value[1]):
        raise ScfError(f"{where}: must be [start, end] with 0 <= start < end, got {short_repr(value)}")
    return value[0], value[1]


def _dtype(value: Any, key: str) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in _DTYPES:
        raise ScfError(f"{key}: {short_repr(value)} is not supported; supported: {', '.join(_DTYPES)}")
    return name


def _params(value: Any, where: str) -> dict[str, Any]:
    """A mergekit ``parameters`` mapping with each setting in our per-tensor forms."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ScfError(f"{where}: must be a mapping of parameter names to values")
    return {str(key): convert_setting(setting, f"{where}.{key}") for key, setting in value.items()}


def convert_setting(value: Any, where: str) -> Any:
    """One mergekit parameter setting in our forms: a scalar stays, a list of numbers (or of strings)
    becomes ``{gradient: [...]}``, a list of ``{filter, value}`` conditions a filter list."""
    if isinstance(value, int | float | str | bool):
        return value
    if isinstance(value, Mapping):
        raise ScfError(f"{where}: a single {{filter, value}} mapping is not a mergekit setting; write a list "
                       f"of them, ending with a default ({{value: ...}})")
    if not isinstance(value, list) or not value:
        raise ScfError(f"{where}: must be a number, a list of numbers (a gradient) or a list of "
                       f"{{filter, value}}, got {short_repr(value)}")
    if all(isinstance(v, int | float | str | bool) for v in value):
        return {"gradient": list(value)}
    conditions = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or "value" not in item or set(item) - {"filter", "value"}:
            raise ScfError(f"{where}[{i}]: a condition is {{filter: <substring of the tensor name>, "
                           f"value: ...}} (no filter: every tensor), got {short_repr(item)}")
        inner = item["value"]
        if isinstance(inner, list | Mapping):
            inner = convert_setting(inner, f"{where}[{i}].value")
            if not isinstance(inner, Mapping):
                raise ScfError(f"{where}[{i}].value: must be a number or a gradient, not conditions")
        filter_ = item.get("filter")
        conditions.append({"filter": filter_, "value": inner} if filter_ is not None else {"value": inner})
    return conditions


def _compose_optional(first: Any, fallback: Any) -> Any:
    if first is None:
        return fallback
    return first if fallback is None else compose(first, fallback)


def compose_all(first: Mapping[str, Any], fallback: Mapping[str, Any]) -> dict[str, Any]:
    """``first``'s settings over ``fallback``'s (mergekit's lookup order), key by key."""
    return {key: _compose_optional(first.get(key), fallback.get(key)) for key in {**fallback, **first}}


def _per_model_value(registry: Any, key: str, entries: list, where: list[str]) -> Any:
    """One value shared by every model when they agree, else one per model; a model without one
    takes the parameter's default (mergekit requires ``weight``; ours defaults it to 1.0)."""
    fields = {f.alias or n: f for n, f in registry.params.model_fields.items()}
    filled = []
    for entry, at in zip(entries, where, strict=True):
        if entry is None:
            if fields[key].is_required():
                raise ScfError(f"{at}.parameters.{key}: required by {registry.name}")
            entry = fields[key].get_default(call_default_factory=True)
        filled.append(entry)
    if all(json.dumps(e, sort_keys=True) == json.dumps(filled[0], sort_keys=True) for e in filled):
        return filled[0]
    return filled


# ---------------------------------------------------------------------------------- layer counts


def local_layer_count(ref: str) -> int | None:
    """``num_hidden_layers`` from a local model directory's config.json, or from the Hugging Face
    cache for a hub id (``org/name[@revision]``); None when neither has it. Never downloads."""
    path = Path(ref).expanduser()
    config_path: Path | None = path / "config.json" if path.is_dir() else None
    if config_path is None and not path.exists():
        repo, _, revision = ref.partition("@")
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(repo, "config.json", revision=revision or None)
        except Exception:  # a malformed repo id: no cached config
            cached = None
        config_path = Path(cached) if isinstance(cached, str) else None
    return layer_count_of(config_path)


def layer_count_of(config_path: Path | None) -> int | None:
    """``num_hidden_layers`` of a config.json file, or None."""
    if config_path is None or not config_path.is_file():
        return None
    try:
        count = json.loads(config_path.read_text()).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def supported_methods() -> list[str]:
    """The mergekit ``merge_method`` names we run (every one maps onto a registry method)."""
    assert all(_RENAMED.get(name, name) in METHODS for name in ROLES)
    return sorted(ROLES)
