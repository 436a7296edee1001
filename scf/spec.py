"""`MergeSpec`: what to merge and how. The one schema behind `scf merge --config` and the CLI flags."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from scf.errors import ScfError, short_repr
from scf.yamlsafe import load_yaml

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``"5GB"`` (decimal units) or ``"512MiB"`` (binary units).

    Args:
        text: an integer number of bytes, or a number followed by B, KB, MB, GB, TB, KiB, MiB,
            GiB or TiB (case-insensitive).

    Returns:
        The size in bytes (at least 1).

    Raises:
        ValueError: the text is not a size; the message says what is accepted.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _SIZE_RE.match(text) if isinstance(text, str) else None
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"{short_repr(text)} is not a size; write e.g. 5GB, 500MB, 2GiB or a number "
                             f"of bytes")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise ValueError(f"{short_repr(text)} must be at least 1 byte")
    return size


class EngineSettings(BaseModel):
    """How a merge runs and what it writes, independent of its inputs and method.

    The one definition of these settings: `MergeSpec` extends it, and so does the pipeline config's
    ``merge:`` section (``tasks.config.MergeSettings``), so both validate them the same way.

    Attributes:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dtype: output dtype; ``auto`` keeps each tensor's base dtype.
        seed: seeds the per-tensor generators of sampling methods (DARE); any integer (it is hashed
            with the tensor name).
        shard_size: largest output shard, e.g. ``5GB`` or ``500MiB``; at least 1 byte.
    """

    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    seed: int = 0
    shard_size: str = "5GB"

    @field_validator("shard_size", mode="before")
    @classmethod
    def _valid_size(cls, value: Any) -> str:
        parse_size(value)
        return str(value)

    @property
    def shard_size_bytes(self) -> int:
        """``shard_size`` in bytes."""
        return parse_size(self.shard_size)


class LayerSlice(BaseModel):
    """One run of layers of one input model, for ``passthrough``'s ``slices``.

    Attributes:
        model: the input (the same string as ``base`` or one of ``secondary``).
        layer_range: ``[start, end)``, layer numbers of that model.
        params: parameters for this slice's tensors (any per-tensor form), before the spec's ``params``.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    layer_range: tuple[int, int]
    params: dict[str, Any] = {}

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class MergeSpec(EngineSettings):
    """One merge: inputs, method, parameters and output settings (the `EngineSettings` fields too).

    Attributes:
        base: the base model: a local directory, a ``.safetensors`` file, or a hub id
            ``org/name[@revision]``. Its dtype, config and tokenizer go to the output.
        secondary: one or more models fused into the base (same sources as ``base``).
        reference: the common ancestor, required by task-vector methods (mergekit's ``base_model``).
        method: a name from ``scf methods``.
        params: the method's parameters; missing ones take the method's defaults.
        diagnostics: compute spectral shift and principal angles for ``diagnostic_layers``.
        diagnostic_layers: glob patterns of 2-D tensor names to diagnose; empty picks a few
            evenly spaced layers' attention and MLP weights.
        allow_pickle: accept pickled ``.bin`` weights (loaded with ``weights_only=True``).
        tokenizer_source: mergekit's key for inputs whose vocabularies differ: ``base``, ``union``
            (only when one vocabulary extends the others) or an input as written (or its path). The
            embedding and LM head are merged over the rows every model has; the other rows, the
            tokenizer files and the generation config come from that input. None: mismatched
            vocabularies are an error.
        slices: ``passthrough`` only: the output's layers, in order, each a range of layers of one
            input (``base`` or a ``secondary``), renumbered from 0; the embeddings come from the
            first slice's model, the final norm and LM head from the last one's (mergekit's rule).
    """

    base: str
    secondary: list[str] = []
    reference: str | None = None
    method: str = "scf_rkl"
    params: dict[str, Any] = {}
    diagnostics: bool = False
    diagnostic_layers: list[str] = []
    allow_pickle: bool = False
    tokenizer_source: str | None = None
    slices: list[LayerSlice] = []

    @model_validator(mode="after")
    def _slices_name_inputs(self) -> MergeSpec:
        if self.slices and self.method != "passthrough":
            raise ValueError(f"slices: only method passthrough stacks layer slices "
                             f"(method is {self.method!r})")
        inputs = [self.base, *self.secondary]
        for i, layer_slice in enumerate(self.slices):
            if layer_slice.model not in inputs:
                raise ValueError(f"slices.{i}.model: {layer_slice.model!r} is neither base nor a secondary")
        return self


def spec_from_mapping(data: Mapping[str, Any], origin: str) -> MergeSpec:
    """Validate a mapping as a `MergeSpec`, turning pydantic errors into one `ScfError`.

    Args:
        data: the fields (from YAML and/or CLI flags).
        origin: where they came from, for the message (a file name or ``"command line"``).

    Returns:
        The validated spec.

    Raises:
        ScfError: a missing, unknown or invalid key; the message names the key and ``origin``.
    """
    try:
        return MergeSpec.model_validate(dict(data))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"]) or "(top level)"
            message = err["msg"].removeprefix("Value error, ")
            what = "unknown key" if err["type"] == "extra_forbidden" else message
            problems.append(f"{key}: {what}")
        raise ScfError(f"merge spec from {origin}: " + "; ".join(problems)) from None


def load_spec_file(path: Path) -> dict[str, Any]:
    """Read a merge YAML file into a plain mapping (validated later, after CLI overrides).

    Args:
        path: a YAML file holding `MergeSpec` fields.

    Returns:
        The mapping.

    Raises:
        ScfError: the file is missing, not YAML, or not a mapping.
    """
    if not path.is_file():
        raise ScfError(f"merge config {path}: no such file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScfError(f"merge config {path}: cannot read it ({exc})") from None
    data = load_yaml(text, f"merge config {path}")
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ScfError(f"merge config {path}: expected a mapping of MergeSpec fields, got {kind}")
    return data
