"""The streaming merge engine: check everything, then fuse tensor by tensor into an atomic output.

`merge` first builds a `MergePlan` (method and params validated, sources resolved, architectures,
tensor names and shapes compared, disk space checked) without writing anything. Then, for each
tensor: a background thread reads the next tensor of every input while this one is moved to the
device, upcast to float32, checked for NaN/Inf, fused by the method, cast to the output dtype,
compared with the inputs (``fraction_from``) and appended to its shard. Memory holds the current
and the next tensor set, never the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel
from tqdm import tqdm

import scf
from scf import diagnostics as diag
from scf import faults
from scf.card import CARD_NAME, model_card, shared_license
from scf.errors import ScfError
from scf.io import (
    BackgroundWriter,
    Checkpoint,
    OutputTensor,
    ShardedWriter,
    check_free_space,
    copy_file,
    open_checkpoint,
    write_text,
)
from scf.memory import check_working_memory
from scf.methods.base import TensorInputs, Workspace
from scf.methods.registry import MethodSpec, get_method, validate_params
from scf.methods.resolve import (
    ParamResolver,
    before_layers,
    compose_params,
    layer_index,
    renumber,
    slice_position,
    tensor_position,
)
from scf.outdir import REPORT_NAME, AtomicDir, check_not_an_input, check_output_dir, existing_ancestor
from scf.rss import peak_rss_bytes
from scf.sources import ResolvedSource, resolve_source
from scf.spec import MergeSpec
from scf.vocab import RowPlan, VocabPlan, is_vocab_tensor, plan_vocab, untie_heads, vocab_mismatch_error

CONFIG_NAME = "merge_config.yaml"
_CHUNK = 2**22  # elements per chunk when comparing fused values with the inputs (4 MB masks)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MergePlan:
    """Everything a merge needs, checked, before a byte is written.

    Attributes:
        spec: the user's spec.
        method: the method's registry entry.
        params: its validated parameters (defaults filled) for the first tensor; per-tensor forms
            give each tensor its own (``tensor_params``).
        sources: resolved inputs, ``[base, *secondaries]`` then the reference if any.
        labels: ``base``, ``secondary[i]``, ``reference`` for each source (for messages).
        checkpoints: the opened inputs, same order as ``sources``.
        outputs: output tensors in write order (base's file and offset order).
        device: the compute device.
        diagnosed: names of the matrices to diagnose (empty unless ``spec.diagnostics``).
        dest: the absolute output directory, checked safe to write.
        vocab: which embedding rows are merged or copied, and the tokenizer's source (`scf.vocab`).
        tensor_params: each output tensor's validated parameters.
        loads: each output tensor's inputs as ``(index into checkpoints, input tensor name)``; the
            same name from every input, except for passthrough's slices.
        described_params: the parameters as reports and the reproducing config show them.
        warnings: notes for the report (e.g. from translating a mergekit config).
        config_updates: keys changed in the output's config.json (passthrough: num_hidden_layers).
    """

    spec: MergeSpec
    method: MethodSpec
    params: BaseModel
    sources: list[ResolvedSource]
    labels: list[str]
    checkpoints: list[Checkpoint]
    outputs: list[OutputTensor]
    device: torch.device
    diagnosed: set[str]
    dest: Path
    vocab: VocabPlan
    tensor_params: dict[str, BaseModel]
    loads: dict[str, list[tuple[int, str]]]
    described_params: dict[str, Any]
    warnings: list[str]
    config_updates: dict[str, Any]

    @property
    def passthrough(self) -> bool:
        """Whether each output tensor is one input tensor, copied (possibly scaled)."""
        return self.method.name == "passthrough"

    @property
    def n_secondaries(self) -> int:
        """Number of secondary models."""
        return len(self.spec.secondary)

    @property
    def has_reference(self) -> bool:
        """Whether a reference model is among the inputs."""
        return self.spec.reference is not None


def merge(spec: MergeSpec, out: str | Path, *, overwrite: bool = False,
          progress: bool = True, warnings: list[str] | None = None) -> dict[str, Any]:
    """Merge the spec's models into ``out``, atomically.

    Args:
        spec: what to merge and how.
        out: the output directory; it appears complete (safetensors shards + index, the base's
            config, the tokenizer source's tokenizer files, ``merge_report.json``, ``merge_config.yaml``
            and a ``README.md`` model card) or not at all.
        overwrite: replace an existing ``out`` that is an earlier merge output.
        progress: show a progress bar (one step per tensor) on stderr.
        warnings: notes to record under the report's ``warnings`` (e.g. how a mergekit config's
            method differs from ours).

    Returns:
        The merge report (also written to ``out/merge_report.json``).

    Raises:
        ScfError: bad input (missing or corrupted model, mismatched tensors, dtypes or
            architectures, NaN/Inf in an input or in the output dtype, unknown method or parameter,
            an unsafe or existing output, too little disk space or memory) or a failed write (disk
            full, read-only filesystem); nothing is left at ``out``.

    Example:
        >>> spec = MergeSpec(base="org/base", secondary=["org/math"], method="scf_rkl")
        >>> report = merge(spec, Path("merged"))
        >>> report["totals"]["fraction_from"]
    """
    started = time.perf_counter()
    plan = plan_merge(spec, out, overwrite=overwrite)
    plan.warnings = list(warnings or [])
    try:
        with AtomicDir(plan.dest, overwrite=overwrite) as tmp:
            faults.pause("before_first_shard")
            report = _execute(plan, tmp, progress)
            report["files_from"] = _copy_aux_files(plan, tmp)
            report["timings"]["total_seconds"] = time.perf_counter() - started
            report["peak_rss_bytes"] = peak_rss_bytes()
            write_text(tmp / REPORT_NAME, json.dumps(report, indent=2) + "\n")
            write_text(tmp / CONFIG_NAME, yaml.safe_dump(resolved_spec(plan), sort_keys=False))
            license_id = shared_license([checkpoint.directory for checkpoint in plan.checkpoints])
            write_text(tmp / CARD_NAME, model_card(report, plan.dest.name, license_id))
    finally:
        for checkpoint in plan.checkpoints:
            checkpoint.close()
    return report


def merge_fingerprint(spec: MergeSpec) -> str:
    """A cache key for a merge's output: equal keys give bit-identical weights.

    sha256 of canonical JSON holding the method, its resolved parameters, every input's
    fingerprint, the output dtype, the seed and the scf version. Resolving the inputs may
    download hub snapshots (weights included).

    Args:
        spec: the merge spec.

    Returns:
        A hex sha256.
    """
    params = _fingerprint_params(spec)
    sources = _resolve_all(spec)
    key = {
        "method": spec.method,
        "params": params,
        "inputs": [source.fingerprint for source in sources],
        "has_reference": spec.reference is not None,
        "dtype": spec.dtype,
        "seed": spec.seed,
        "scf_version": scf.__version__,
    }
    if spec.slices:  # only when set: the keys of earlier merges stay valid
        key["slices"] = [s.model_dump(mode="json") for s in spec.slices]
    if spec.tokenizer_source is not None:  # only then: earlier merges keep their keys
        key["tokenizer_source"] = spec.tokenizer_source
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fingerprint_params(spec: MergeSpec) -> Any:
    """The parameters with defaults filled (plain values) or as written (per-tensor forms)."""
    resolver = ParamResolver(spec.method, spec.params, _n_models(spec))
    return resolver.uniform.model_dump(mode="json") if resolver.uniform is not None else spec.params


def plan_merge(spec: MergeSpec, out: str | Path, *, overwrite: bool = False) -> MergePlan:
    """Validate a merge completely without writing anything.

    Args:
        spec: the merge spec.
        out: the output directory.
        overwrite: whether an existing ``out`` may be replaced.

    Returns:
        The checked `MergePlan` (inputs opened; the caller closes them).

    Raises:
        ScfError: see `merge`.
    """
    method = get_method(spec.method)
    if method.needs_reference and spec.reference is None:
        raise ScfError(f"method {spec.method!r} works on task vectors (model - reference) and needs a "
                       f"reference model (the common ancestor, mergekit's base_model): pass --reference")
    _check_inputs_for_method(spec)
    resolver = ParamResolver(spec.method, spec.params, _n_models(spec))
    local_inputs = {label: [Path(ref).expanduser()] for label, ref in _labelled_refs(spec)
                    if Path(ref).expanduser().exists()}
    dest = check_output_dir(out, overwrite=overwrite, inputs=local_inputs)  # before any download
    device = resolve_device(spec.device)
    sources = _resolve_all(spec)
    labels = [label for label, _ in _labelled_refs(spec)]
    checkpoints = []
    try:
        for source in sources:
            checkpoints.append(open_checkpoint(source.path, allow_pickle=spec.allow_pickle))
        check_not_an_input(dest, {label: [source.path, *checkpoint.files] for label, source, checkpoint
                                  in zip(labels, sources, checkpoints, strict=True)})
        _check_architectures(checkpoints, labels)
        if spec.slices:  # inputs may differ in depth; only the tensors taken are read
            _check_no_float8(checkpoints, labels)
            vocab = VocabPlan()  # the base's tokenizer (tokenizer_source is at most 'base' here)
            layout = _slice_layout(spec, checkpoints, labels, resolver)
        else:
            untied = untie_heads(checkpoints, labels)
            _check_tensors(checkpoints, labels, spec.tokenizer_source)
            vocab = plan_vocab(spec.tokenizer_source, checkpoints, sources, labels, untied)
            layout = _whole_model_layout(checkpoints, resolver, spec.dtype, vocab)
        outputs, loads, tensor_params, config_updates = layout
        _check_memory(method, checkpoints, device)
        check_free_space(existing_ancestor(dest), sum(t.nbytes for t in outputs) + 2**20)
    except BaseException:
        for checkpoint in checkpoints:
            checkpoint.close()
        raise
    diagnosed: set[str] = set()
    if spec.diagnostics:
        shapes = {t.name: t.shape for t in outputs if t.dtype.is_floating_point}
        diagnosed = set(diag.select_matrices(shapes, spec.diagnostic_layers))
    first = tensor_params[outputs[0].name] if outputs else validate_params(spec.method, {}, _n_models(spec))
    described = _describe_params(resolver, first)
    return MergePlan(spec, method, first, sources, labels, checkpoints, outputs, device, diagnosed, dest,
                     vocab, tensor_params, loads, described, [], config_updates)


_Layout = tuple[list[OutputTensor], dict[str, list[tuple[int, str]]], dict[str, BaseModel], dict[str, Any]]


def _n_models(spec: MergeSpec) -> int:
    """Contributing models per tensor: passthrough's is one (its slices' inputs take turns)."""
    return 1 if spec.method == "passthrough" else 1 + len(spec.secondary)


def _check_inputs_for_method(spec: MergeSpec) -> None:
    """What only some methods accept: passthrough's inputs, a tokenizer source with its slices."""
    if spec.slices and spec.tokenizer_source not in (None, "base"):
        raise ScfError(f"tokenizer_source: {spec.tokenizer_source!r} cannot be combined with slices: "
                       f"passthrough's stacked layers keep the base's tokenizer (leave it unset or 'base')")
    if spec.method == "passthrough" and spec.secondary and not spec.slices:
        raise ScfError("method 'passthrough' copies one model: without slices it takes only the base "
                       f"(got {len(spec.secondary)} secondaries); give slices to stack layers of several")
    if spec.method == "passthrough" and spec.reference is not None:
        raise ScfError("method 'passthrough' takes no reference")


def _layer_count(checkpoint: Checkpoint) -> int:
    """config.json's num_hidden_layers, else one more than the largest layer number in the names."""
    config = checkpoint.config() or {}
    count = config.get("num_hidden_layers")
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return count
    indices = [layer_index(name) for name in checkpoint.tensors]
    return max((i for i in indices if i is not None), default=0) + 1


def _whole_model_layout(checkpoints: list[Checkpoint], resolver: ParamResolver, dtype: str,
                        vocab: VocabPlan) -> _Layout:
    """Every base tensor (a vocabulary tensor with its planned rows), from the same name of every
    input, with its parameters."""
    n_layers = _layer_count(checkpoints[0])
    outputs, loads, tensor_params = [], {}, {}
    for name, meta in checkpoints[0].tensors.items():  # by key: an untied LM head is its embedding's meta
        shape = _output_shape(name, meta.shape, vocab)
        outputs.append(OutputTensor(name, shape, _output_dtype(meta.dtype, dtype)))
        loads[name] = [(i, name) for i in range(len(checkpoints))]
        tensor_params[name] = resolver.for_tensor(name, tensor_position(name, n_layers))
    return outputs, loads, tensor_params, {}


def _output_shape(name: str, shape: tuple[int, ...], vocab: VocabPlan) -> tuple[int, ...]:
    """The base's shape, with the planned row count for a vocabulary tensor."""
    rows = vocab.tensors.get(name)
    return shape if rows is None else (rows.rows, *shape[1:])


def _slice_layout(spec: MergeSpec, checkpoints: list[Checkpoint], labels: list[str],
                  resolver: ParamResolver) -> _Layout:
    """passthrough's stacked layers: the first slice's embeddings, each slice's layers renumbered
    from 0 in order, the last slice's final norm and LM head (mergekit's layout).

    Each slice's parameters come before the spec's; a layer's position for gradients is its place
    in its slice, the embeddings' 0 and the head's 1, and filters see the input tensor's name (all
    as mergekit evaluates a per-model parameter).
    """
    index_of: dict[str, int] = {}
    for i, ref in enumerate([spec.base, *spec.secondary]):
        index_of.setdefault(ref, i)
    resolvers = [ParamResolver(spec.method, compose_params(s.params, resolver.params), 1)
                 for s in spec.slices]
    outputs: list[OutputTensor] = []
    loads: dict[str, list[tuple[int, str]]] = {}
    tensor_params: dict[str, BaseModel] = {}

    def add(out_name: str, source: int, in_name: str, slice_resolver: ParamResolver, t: float) -> None:
        meta = checkpoints[source].tensors[in_name]
        outputs.append(OutputTensor(out_name, meta.shape, _output_dtype(meta.dtype, spec.dtype)))
        loads[out_name] = [(source, in_name)]
        tensor_params[out_name] = slice_resolver.for_tensor(in_name, t)

    first, last = index_of[spec.slices[0].model], index_of[spec.slices[-1].model]
    for name in checkpoints[first].tensors:
        if layer_index(name) is None and before_layers(name):
            add(name, first, name, resolvers[0], 0.0)
    out_layer = 0
    part_shapes: dict[str, tuple[int, ...]] = {}  # layer-0 name of each part -> the shape it has
    layer_types: list[Any] | None = []  # config.json's per-layer list (sliding or full attention), if any
    for i, (layer_slice, slice_resolver) in enumerate(zip(spec.slices, resolvers, strict=True)):
        source = index_of[layer_slice.model]
        by_layer: dict[int, list[str]] = {}
        for name in checkpoints[source].tensors:
            index = layer_index(name)
            if index is not None:
                by_layer.setdefault(index, []).append(name)
        n_layers = _layer_count(checkpoints[source])
        start, end = layer_slice.layer_range
        if end > n_layers:
            raise ScfError(f"slices.{i}.layer_range: [{start}, {end}] goes beyond the {n_layers} layers of "
                           f"{labels[source]} ({layer_slice.model})")
        types = (checkpoints[source].config() or {}).get("layer_types")
        if layer_types is not None and isinstance(types, list) and len(types) == n_layers:
            layer_types += types[start:end]
        else:
            layer_types = None
        for offset, layer in enumerate(range(start, end)):
            if layer not in by_layer:
                raise ScfError(f"slices.{i}: {labels[source]} ({layer_slice.model}) has no tensors of "
                               f"layer {layer}")
            t = slice_position(offset, end - start)
            for name in by_layer[layer]:
                shape = checkpoints[source].tensors[name].shape
                _check_stackable(part_shapes, name, shape, i, labels[source])
                add(renumber(name, out_layer), source, name, slice_resolver, t)
            out_layer += 1
    for name in checkpoints[last].tensors:
        if layer_index(name) is None and not before_layers(name):
            add(name, last, name, resolvers[-1], 1.0)
    updates: dict[str, Any] = {"num_hidden_layers": out_layer}
    if "layer_types" in (checkpoints[0].config() or {}):  # kept in step with the stacked layers
        if layer_types is None:
            raise ScfError("slices: config.json's layer_types must list every layer of each sliced model "
                           "to be stacked with them")
        updates["layer_types"] = layer_types
    return outputs, loads, tensor_params, updates


def _check_stackable(part_shapes: dict[str, tuple[int, ...]], name: str, shape: tuple[int, ...], index: int,
                     label: str) -> None:
    """Every stacked layer's tensor of one part (``self_attn.q_proj.weight``, ...) has one shape."""
    part = renumber(name, 0)
    expected = part_shapes.setdefault(part, tuple(shape))
    if tuple(shape) != expected:
        raise ScfError(f"slices.{index}: tensor {name!r} of {label} has shape {list(shape)}, but the "
                       f"layers stacked before it have {list(expected)}: the sliced models must have the "
                       f"same shapes")


def _describe_params(resolver: ParamResolver, first: BaseModel) -> dict[str, Any]:
    """Parameters for the report: defaults filled, per-tensor forms as written."""
    if resolver.uniform is not None:
        return resolver.uniform.model_dump(mode="json")
    return resolver.describe(first)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error naming ``device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ScfError("device: 'cuda' was asked for but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from (seed, tensor name), stable across runs and machines (sha256)."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def resolved_spec(plan: MergePlan) -> dict[str, Any]:
    """The spec that reproduces this merge: pinned inputs, parameters with defaults filled."""
    pinned = [s.pinned_ref() for s in plan.sources]
    tokenizer_source = plan.spec.tokenizer_source
    if tokenizer_source not in (None, "base", "union"):  # an input: pinned like the inputs
        tokenizer_source = pinned[plan.vocab.source]
    refs = [plan.spec.base, *plan.spec.secondary]
    resolved = plan.spec.model_copy(update={
        "tokenizer_source": tokenizer_source,
        "base": pinned[0],
        "secondary": pinned[1: 1 + plan.n_secondaries],
        "reference": pinned[-1] if plan.has_reference else None,
        "params": plan.described_params,
        "slices": [s.model_copy(update={"model": pinned[refs.index(s.model)]}) for s in plan.spec.slices],
    }).model_dump(mode="json")
    first = ("base", "secondary", "reference", "method", "params")  # inputs first, for the reader
    return {key: resolved[key] for key in first} | resolved


# ------------------------------------------------------------------------------------ validation


def _labelled_refs(spec: MergeSpec) -> list[tuple[str, str]]:
    """``(label, ref)`` of every input: ``base``, ``secondary[i]``, then ``reference`` if any."""
    refs = [("base", spec.base), *((f"secondary[{i}]", ref) for i, ref in enumerate(spec.secondary))]
    return refs + ([("reference", spec.reference)] if spec.reference is not None else [])


def _resolve_all(spec: MergeSpec) -> list[ResolvedSource]:
    return [resolve_source(ref, allow_pickle=spec.allow_pickle) for _, ref in _labelled_refs(spec)]


def _check_architectures(checkpoints: list[Checkpoint], labels: list[str]) -> None:
    """Inputs whose config.json both exist must agree on model_type and architectures."""
    base_config = checkpoints[0].config()
    if base_config is None:
        return
    for checkpoint, label in zip(checkpoints[1:], labels[1:], strict=True):
        config = checkpoint.config()
        if config is None:
            continue
        for key in ("model_type", "architectures"):
            if key in base_config and key in config and base_config[key] != config[key]:
                raise ScfError(
                    f"different architectures: {key} is {base_config[key]!r} in base "
                    f"({checkpoints[0].root / 'config.json'}) but {config[key]!r} in {label} "
                    f"({checkpoint.root / 'config.json'})")


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "integer"


_FLOAT8 = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _check_tensors(checkpoints: list[Checkpoint], labels: list[str], tokenizer_source: str | None) -> None:
    """Every input must hold exactly the base's tensor names, with the base's shapes and dtype kinds
    (float, integer or bool: a float tensor merged with an integer one would be nonsense; float
    precisions may differ), and no float8 tensor. An embedding or LM head may differ in its row count
    (vocabulary size) only under a ``tokenizer_source`` policy."""
    _check_no_float8(checkpoints, labels)
    base = checkpoints[0]
    for checkpoint, label in zip(checkpoints[1:], labels[1:], strict=True):
        for names, present, absent in (
            (base.tensors.keys() - checkpoint.tensors.keys(), ("base", base), (label, checkpoint)),
            (checkpoint.tensors.keys() - base.tensors.keys(), (label, checkpoint), ("base", base)),
        ):
            if names:
                shown = ", ".join(repr(n) for n in sorted(names)[:3])
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                raise ScfError(f"tensor {shown}{more} present in {present[0]} ({present[1].root}) "
                               f"but not in {absent[0]} ({absent[1].root})")
        for name, meta in base.tensors.items():
            other = checkpoint.tensors[name]
            if other.shape != meta.shape and is_vocab_tensor(name, meta.shape) and \
                    other.shape[1:] == meta.shape[1:]:
                if tokenizer_source is None:
                    raise vocab_mismatch_error(name, meta, other, label)
            elif other.shape != meta.shape:
                raise ScfError(f"tensor {name!r}: shape mismatch: base has {list(meta.shape)}, "
                               f"{label} has {list(other.shape)}")
            if _dtype_kind(other.dtype) != _dtype_kind(meta.dtype):
                raise ScfError(f"tensor {name!r}: dtype mismatch: base has {_dtype_name(meta.dtype)} "
                               f"({_dtype_kind(meta.dtype)}), {label} has {_dtype_name(other.dtype)} "
                               f"({_dtype_kind(other.dtype)}); only float tensors of any precision can be "
                               f"merged with each other")


def _check_no_float8(checkpoints: list[Checkpoint], labels: list[str]) -> None:
    """Float8 weights are quantized (their scales live in other tensors): refused, naming the tensor."""
    for checkpoint, label in zip(checkpoints, labels, strict=True):
        for meta in checkpoint.tensors.values():
            if meta.dtype in _FLOAT8:
                raise ScfError(
                    f"tensor {meta.name!r} of {label} ({meta.file}) is float8 ({_FLOAT8[meta.dtype]}): "
                    f"float8 weights are quantized, with their scales in other tensors, and cannot be merged "
                    f"value by value; dequantize the checkpoint (to bfloat16) first")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_memory(method: MethodSpec, checkpoints: list[Checkpoint], device: torch.device) -> None:
    """The out-of-memory guard (`scf.memory`) for the largest float tensor: integer ones are copied."""
    floats = [m for m in checkpoints[0].tensors.values() if m.dtype.is_floating_point]
    if not floats:
        return
    largest = max(floats, key=lambda m: m.numel)
    moved = sum(c.tensors[largest.name].dtype.itemsize if method.stored_dtype else 4 for c in checkpoints)
    check_working_memory(method.name, largest.name, largest.numel, moved, device)


def _output_dtype(base_dtype: torch.dtype, requested: str) -> torch.dtype:
    """Output dtype: the base's for ``auto`` and for non-float tensors, else the requested one."""
    if requested == "auto" or not base_dtype.is_floating_point:
        return base_dtype
    return _DTYPES[requested]


# ------------------------------------------------------------------------------------- execution


class _Prefetcher:
    """Reads each tensor name from every input in a background thread, ahead of the computation.

    Read-ahead is bounded twice: at most one set beyond the one being computed, and the input
    bytes alive never exceed the largest tensor set's. So small layers stream with reads
    overlapping compute, while the set after a big embedding waits until the embedding is done:
    peak memory stays a small multiple of the largest tensor. The consumer calls `get`,
    processes, drops its references, then calls `release`.
    """

    def __init__(self, checkpoints: list[Checkpoint], loads: list[list[tuple[int, str]]]) -> None:
        self.read_seconds = 0.0
        sizes = [sum(checkpoints[i].tensors[n].nbytes for i, n in load) for load in loads]
        self._budget = max(sizes, default=0)
        self._alive: deque[int] = deque()  # bytes of each set read and not yet released
        self._cond = threading.Condition()
        self._stopped = False
        self._items: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(checkpoints, loads, sizes), daemon=True)
        self._thread.start()

    def _may_read(self, size: int) -> bool:
        alive = sum(self._alive)
        return self._stopped or not self._alive or (len(self._alive) < 2 and alive + size <= self._budget)

    def _run(self, checkpoints: list[Checkpoint], loads: list[list[tuple[int, str]]],
             sizes: list[int]) -> None:
        try:
            for load, size in zip(loads, sizes, strict=True):
                with self._cond:
                    self._cond.wait_for(lambda size=size: self._may_read(size))
                    if self._stopped:
                        return
                    self._alive.append(size)
                started = time.perf_counter()
                tensors = [checkpoints[i].load(name) for i, name in load]
                self.read_seconds += time.perf_counter() - started
                self._items.put(tensors)
        except BaseException as exc:  # handed to the consumer, raised there
            self._items.put(exc)

    def get(self) -> list[torch.Tensor]:
        """The next tensor set (one tensor per load) in order; re-raises a reader error."""
        item = self._items.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self) -> None:
        """Signal that the oldest tensor set is no longer referenced."""
        with self._cond:
            self._alive.popleft()
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the reader thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()


def _execute(plan: MergePlan, out_dir: Path, progress: bool) -> dict[str, Any]:
    """Fuse every tensor into ``out_dir`` and return the report (without total time and RSS)."""
    metadata = {"scf_method": plan.spec.method, "scf_version": scf.__version__}
    writer = BackgroundWriter(ShardedWriter(out_dir, plan.outputs, plan.spec.shard_size_bytes, metadata))
    reader = _Prefetcher(plan.checkpoints, [plan.loads[t.name] for t in plan.outputs])
    records: list[dict[str, Any]] = []
    timings = {"read_seconds": 0.0, "compute_seconds": 0.0, "write_seconds": 0.0}
    diagnostics: dict[str, dict[str, float] | None] = {}
    workspace = Workspace()
    try:
        bar = tqdm(plan.outputs, desc=f"merge {plan.spec.method}", unit="tensor", disable=not progress)
        for output in bar:
            tensors = reader.get()
            fused, record = _merge_tensor(plan, output, tensors, workspace, diagnostics)
            del tensors
            reader.release()
            timings["compute_seconds"] += record["seconds"]
            writer.write(output.name, fused)  # written by a thread while the next tensor is computed
            del fused
            records.append(record)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
        workspace.clear()
    timings["read_seconds"] = reader.read_seconds
    timings["write_seconds"] = writer.busy_seconds
    return _report(plan, records, timings, diagnostics)


def _merge_tensor(plan: MergePlan, output: OutputTensor, tensors: list[torch.Tensor], workspace: Workspace,
                  diagnostics: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Fuse, check and measure one tensor; returns it (output dtype) and its report entry."""
    started = time.perf_counter()
    name = output.name
    loads = plan.loads[name]
    params = plan.tensor_params[name]
    keys = ["base", *(f"secondary_{i}" for i in range(plan.n_secondaries))]
    if not tensors[0].dtype.is_floating_point:  # integer buffers: keep the (first) input's
        fused = tensors[0]
        fractions = {**dict.fromkeys(keys, 0.0), keys[loads[0][0]]: 1.0, "neither": 0.0}
    else:
        inputs = [_to_device(t, in_name, plan.labels[i], plan)
                  for t, (i, in_name) in zip(tensors, loads, strict=True)]
        tensors.clear()  # the caller's list: drop the originals once moved (or upcast)
        fused, fractions = _fuse(plan, output, inputs, params, workspace, diagnostics)
        del inputs
        if plan.passthrough:  # one input per tensor: its share goes to that input's key
            fractions = {**dict.fromkeys(keys, 0.0), keys[loads[0][0]]: fractions["base"],
                         "neither": fractions["neither"]}
    record = {"name": name, "shape": list(output.shape), "dtype": str(output.dtype).removeprefix("torch."),
              "fraction_from": fractions, "sparsity": fractions["base"],
              "seconds": time.perf_counter() - started}
    if plan.passthrough and loads[0][1] != name:
        record["source"] = {"model": plan.labels[loads[0][0]], "tensor": loads[0][1]}
    if plan.described_params != plan.params.model_dump(mode="json") or plan.spec.slices:
        record["params"] = params.model_dump(mode="json")  # per-tensor forms: what this tensor got
    return fused, record


def _fuse(plan: MergePlan, output: OutputTensor, inputs: list[torch.Tensor], params: BaseModel,
          workspace: Workspace, diagnostics: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Run the method on one float tensor (a vocabulary tensor: on the rows every model has, so its
    whole-tensor statistics see those rows only), check it, and measure where its values come from."""
    name = output.name
    rows = plan.vocab.tensors.get(name)
    merged = inputs if rows is None else [t[: rows.common] for t in inputs]
    target = output if rows is None else OutputTensor(name, (rows.common, *output.shape[1:]), output.dtype)
    models = merged[: 1 + plan.n_secondaries]  # passthrough: its one input
    generator = torch.Generator(device=plan.device).manual_seed(tensor_seed(plan.spec.seed, name))
    reference = merged[-1] if plan.has_reference else None
    method_inputs = TensorInputs(name, models[0], models[1:], reference, generator, workspace,
                                 out_dtype=output.dtype)
    fused = plan.method.fn(method_inputs, params)
    fused = _check_fused(fused, target, plan.spec.method)
    fractions = fraction_from(fused, models)
    if name in plan.diagnosed:  # None marks a matrix too large to diagnose cheaply
        too_large = fused.numel() > diag.MAX_ELEMENTS
        diagnostics[name] = None if too_large else diag.matrix_diagnostics(models[0].float(), fused)
    if rows is not None and rows.rows > rows.common:
        fused, fractions = _add_copied_rows(plan, output, rows, fused, fractions, inputs[rows.source])
    return fused, fractions


def _add_copied_rows(plan: MergePlan, output: OutputTensor, rows: RowPlan, fused: torch.Tensor,
                     fractions: dict[str, float],
                     source: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The merged rows followed by the source's rows ``[common, rows)``, copied exactly (rounded only
    when the output dtype is narrower), and the fractions with those rows credited to the source."""
    whole = torch.empty(output.shape, dtype=output.dtype, device=fused.device)
    whole[: rows.common] = fused
    whole[rows.common:] = source[rows.common: rows.rows]
    whole = _check_fused(whole, output, plan.spec.method)
    share = rows.common / rows.rows
    key = "base" if rows.source == 0 else (
        f"secondary_{rows.source - 1}" if rows.source <= plan.n_secondaries else "neither")  # the reference
    fractions = {k: v * share for k, v in fractions.items()}
    fractions[key] += 1 - share
    return whole, fractions


def _to_device(tensor: torch.Tensor, name: str, label: str, plan: MergePlan) -> torch.Tensor:
    """An input on the compute device, in its stored dtype if the method streams from it, else as
    float32; NaN/Inf is refused with a message naming the model, file and tensor."""
    dtype = None if plan.method.stored_dtype else torch.float32
    moved = tensor.to(device=plan.device, dtype=dtype)
    if not all_finite(moved):
        checkpoint = plan.checkpoints[plan.labels.index(label)]
        bad = int((~torch.isfinite(moved)).sum())
        raise ScfError(f"tensor {name!r} of {label} ({checkpoint.tensors[name].file}) has {bad} NaN/Inf "
                       f"values; refusing to merge a broken checkpoint")
    return moved


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or +-Inf (one min/max pass: NaN propagates, Inf is an extreme)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _check_fused(fused: torch.Tensor, output: OutputTensor, method: str) -> torch.Tensor:
    """A method's result in the output dtype; it must have base's shape and be finite AFTER the cast
    (a finite float32 value beyond float16's range becomes Inf)."""
    if tuple(fused.shape) != output.shape:
        raise ScfError(f"method {method!r} returned shape {list(fused.shape)} for tensor {output.name!r}, "
                       f"expected {list(output.shape)}")
    fused = fused.to(output.dtype)
    if not all_finite(fused):
        dtype = _dtype_name(output.dtype)
        raise ScfError(f"tensor {output.name!r}: the merged values hold NaN/Inf in the output dtype {dtype} "
                       f"(method {method!r}; a value beyond {dtype}'s range becomes Inf): check the method's "
                       f"params, or choose a wider --dtype (bfloat16 or float32)")
    return fused


def fraction_from(fused: torch.Tensor, models: list[torch.Tensor]) -> dict[str, float]:
    """Share of elements whose written value is bit-identical to the base's, else to a secondary's.

    Args:
        fused: the fused tensor as written (output dtype).
        models: ``[base, *secondaries]`` (any float dtype, same shape), compared after rounding
            to the output dtype. An element equal to several models counts for the first of them.

    Returns:
        ``{"base": f, "secondary_0": f, ..., "neither": f}``, summing to 1. Bits, not values, are
        compared: that is what "taken from" means (a -0.0 written where the base holds +0.0 was
        not taken from it), and an integer compare costs half a float one.
    """
    numel = fused.numel()
    flat_fused, flat_models = fused.reshape(-1), [m.reshape(-1) for m in models]
    # claimed_upto[i]: elements equal to any of models[: i + 1]; the first claimant's share is the
    # difference of consecutive totals. Two reused flat buffers keep the masks small and each chunk
    # costs one comparison, one OR and one count per model (few kernels: each is a sync point).
    claimed_upto = [0] * len(models)
    size = min(numel, _CHUNK)
    claimed = torch.empty(size, dtype=torch.bool, device=fused.device)
    equal = torch.empty(size, dtype=torch.bool, device=fused.device)
    for start in range(0, numel, _CHUNK):
        fused_chunk = flat_fused[start: start + _CHUNK]
        n = fused_chunk.numel()
        fused_bits = _bits(fused_chunk)
        for i, model in enumerate(flat_models):
            model_chunk = model[start: start + _CHUNK].to(fused_chunk.dtype)  # a copy only if rounded
            if i == 0:
                torch.eq(fused_bits, _bits(model_chunk), out=claimed[:n])
            else:
                claimed[:n].bitwise_or_(torch.eq(fused_bits, _bits(model_chunk), out=equal[:n]))
            claimed_upto[i] += int(claimed[:n].count_nonzero())
    bounds = [0, *claimed_upto, numel]
    counts = [high - low for low, high in zip(bounds, bounds[1:], strict=False)]
    keys = ["base", *(f"secondary_{i}" for i in range(len(models) - 1)), "neither"]
    return {key: count / max(numel, 1) for key, count in zip(keys, counts, strict=True)}


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory seen as integers of the element's size (bit patterns, for exact compares)."""
    return tensor.view(_INT_OF_SIZE[tensor.element_size()])


def _report(plan: MergePlan, records: list[dict[str, Any]], timings: dict[str, float],
            diagnostics: dict[str, dict[str, float] | None]) -> dict[str, Any]:
    """Assemble the merge report (keys as in docs/architecture.md)."""
    n_params = sum(math.prod(r["shape"]) for r in records)
    totals: dict[str, float] = {}
    for record in records:
        weight = math.prod(record["shape"]) / max(n_params, 1)
        for key, value in record["fraction_from"].items():
            totals[key] = totals.get(key, 0.0) + value * weight
    dtypes = {r["dtype"] for r in records}
    report: dict[str, Any] = {
        "method": plan.spec.method,
        "params": plan.described_params,
        "inputs": {
            "base": plan.sources[0].as_report(),
            "secondaries": [s.as_report() for s in plan.sources[1: 1 + plan.n_secondaries]],
            "reference": plan.sources[-1].as_report() if plan.has_reference else None,
        },
        "scf_version": scf.__version__,
        "device": str(plan.device),
        "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
        "seed": plan.spec.seed,
        "totals": {"n_tensors": len(records), "n_params": n_params, "fraction_from": totals,
                   "sparsity": totals.get("base", 1.0)},
        "tensors": records,
        "timings": {"total_seconds": 0.0, **timings},
        "peak_rss_bytes": 0,
        "warnings": plan.warnings,
    }
    if plan.vocab.policy is not None or plan.vocab.untied:
        report["vocabulary"] = plan.vocab.report(plan.labels)
    if plan.spec.slices:
        report["slices"] = [s.model_dump(mode="json") for s in plan.spec.slices]
    if plan.spec.diagnostics:
        report["diagnostics"] = {
            "top_k": diag.DEFAULT_TOP_K,
            "spectral_shift": {n: d["spectral_shift"] for n, d in diagnostics.items() if d},
            "principal_angle_deg": {n: d["principal_angle_deg"] for n, d in diagnostics.items() if d},
            "skipped": sorted(n for n, d in diagnostics.items() if d is None),
            "per_layer_sparsity": diag.layer_sparsity(records),
            "fraction_from": totals,
        }
    return report


_NOT_TOKENIZER = ("config.json", "generation_config.json")
_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def _copy_aux_files(plan: MergePlan, out_dir: Path) -> dict[str, Any]:
    """Write config.json (the base's; see `_output_config`), the tokenizer files and the chat template
    (from the tokenizer source: the base unless ``tokenizer_source`` names another input) and
    generation_config.json (the source's, else the base's); returns where each came from."""
    base, source = plan.checkpoints[0], plan.checkpoints[plan.vocab.source]
    source_label = plan.labels[plan.vocab.source]
    for path in base.aux_files():
        if path.name == "config.json":
            config = _output_config(plan)
            if config is None:
                copy_file(path, out_dir / path.name)
            else:
                write_text(out_dir / path.name, json.dumps(config, indent=2) + "\n")
    tokenizer_files = [p for p in source.aux_files() if p.name not in _NOT_TOKENIZER]
    for path in tokenizer_files:
        copy_file(path, out_dir / path.name)
    generation = {label: path for label, checkpoint in ((source_label, source), ("base", base))
                  for path in checkpoint.aux_files() if path.name == "generation_config.json"}
    generation_from = next(iter(generation), None)
    if generation_from is not None:
        copy_file(generation[generation_from], out_dir / "generation_config.json")
    return {"config": "base" if base.config() is not None else None,
            "tokenizer": source_label if tokenizer_files else None,
            "generation_config": generation_from,
            "chat_template": _chat_template_origin(out_dir, source_label)}


def _chat_template_origin(out_dir: Path, source_label: str) -> dict[str, str] | None:
    """``{from, file}`` of the output's chat template (a file of its own or tokenizer_config.json's key)."""
    for name in _CHAT_TEMPLATE_FILES:
        if (out_dir / name).is_file():
            return {"from": source_label, "file": name}
    tokenizer_config = out_dir / "tokenizer_config.json"
    try:
        has_template = "chat_template" in json.loads(tokenizer_config.read_text())
    except (OSError, ValueError, TypeError):
        has_template = False
    return {"from": source_label, "file": tokenizer_config.name} if has_template else None


def _output_config(plan: MergePlan) -> dict[str, Any] | None:
    """The base's config.json with what this merge changed, or None when nothing changed (copied as is):
    the layout's ``config_updates`` (passthrough's layer count), the dtype of an explicit ``--dtype``,
    ``vocab_size`` (the output's rows), ``tie_word_embeddings`` (false once an LM head is written for a
    tied base) and the special token ids of the tokenizer source."""
    config = plan.checkpoints[0].config()  # a JSON object: checked when the merge was planned
    if config is None:
        return None
    updates: dict[str, Any] = dict(plan.config_updates)
    if plan.spec.dtype != "auto":
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        updates |= dict.fromkeys(keys, plan.spec.dtype)
    rows = next((r.rows for n, r in plan.vocab.tensors.items() if n != "lm_head.weight"),
                next((r.rows for r in plan.vocab.tensors.values()), None))
    if rows is not None and config.get("vocab_size") != rows:
        updates["vocab_size"] = rows
    if "base" in plan.vocab.untied and config.get("tie_word_embeddings"):
        updates["tie_word_embeddings"] = False
    if plan.vocab.source != 0:
        source_config = plan.checkpoints[plan.vocab.source].config() or {}
        updates |= {k: source_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                    if k in source_config and source_config[k] != config.get(k)}
    return config | updates if updates else None
