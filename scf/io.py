"""All disk access of the merge library: reading checkpoints lazily and writing the output.

Reading: `open_checkpoint` finds a checkpoint's weight files (single ``model.safetensors``,
sharded with ``model.safetensors.index.json``, a lone ``.safetensors`` file, or, only when
allowed, pickled ``.bin`` files), checks every safetensors header against its file size, and
loads one tensor at a time with ``safe_open``.

Writing: `ShardedWriter` plans the whole output layout up front (every tensor's name, shape and
dtype is known before merging), so each shard's header is written first and each tensor is
appended the moment it is computed: memory holds one tensor, never a shard. Every output file is
created by `open_output`, and a failed write is an `OutputError` naming the directory.
`scf.outdir.AtomicDir` makes the output directory appear in one rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import stat
import struct
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from scf import faults
from scf.errors import ScfError, one_line, short_repr
from scf.outdir import output_error

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"

# safetensors dtype codes <-> torch dtypes.
_ST_TO_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}
# Non-weight files a merged model needs from its base: config and tokenizer.
CONFIG_AND_TOKENIZER_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
)
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE)
_SAMPLE_BYTES = 4096


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives and what it is, read from a header without loading data.

    Attributes:
        name: tensor name.
        file: the weight file holding it.
        dtype: torch dtype.
        shape: shape.
        span: (start, end) byte offsets of its data inside the file (safetensors only).
    """

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    span: tuple[int, int] | None = None

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Size of its data in bytes."""
        return self.numel * self.dtype.itemsize


def read_header(path: Path) -> tuple[bytes, dict[str, TensorMeta]]:
    """Read and check a safetensors header, at least as strictly as the safetensors library does.

    Checked: the file is a regular file; the header length fits in the file and under 100 MB; the
    header is UTF-8 JSON without duplicate keys; ``__metadata__`` maps strings to strings; every
    tensor has a known dtype, a shape of non-negative integers and two integer ``data_offsets``
    whose span is exactly what the shape and dtype need; sorted by offset, the tensors cover the data
    region from its first byte to the file's last, with no gap, overlap or trailing byte.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        The raw header bytes and the tensors it declares (absolute file offsets), in offset order.

    Raises:
        ScfError: the file is not regular, truncated or corrupted; the message names it and the tensor.
    """
    size = regular_file(path).st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ScfError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ScfError(f"{path}: corrupted or truncated safetensors (header length {header_len} "
                           f"does not fit in a {size}-byte file)")
        if header_len > _MAX_HEADER_BYTES:
            raise ScfError(f"{path}: corrupted safetensors (a {header_len}-byte header is over the "
                           f"format's {_MAX_HEADER_BYTES}-byte limit)")
        raw = f.read(header_len)
    header = _parse_header_json(path, raw)
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ScfError(f"{path}: corrupted safetensors header (__metadata__ must map strings to strings)")
    metas = sorted((_tensor_meta(path, name, entry, data_start, size) for name, entry in header.items()),
                   key=lambda m: m.span)
    _check_layout(path, metas, data_start, size)
    return raw, {meta.name: meta for meta in metas}


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_header_json(path: Path, raw: bytes) -> dict[str, Any]:
    """The header as a dict; refuses non-UTF-8, non-JSON, a non-object and duplicate keys (at any depth:
    JSON parsers disagree on which of two equal keys wins, so a file could mean two things)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as dup:
        key = short_repr(str(dup))
        raise ScfError(f"{path}: corrupted safetensors header (key {key} appears twice)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ScfError(f"{path}: corrupted safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ScfError(f"{path}: corrupted safetensors header (not a JSON object)")
    return header


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_meta(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorMeta:
    """One header entry as a `TensorMeta`, checking its dtype, shape and byte range."""
    where = f"{path}: corrupted safetensors header: tensor {short_repr(name)}"
    if not isinstance(entry, dict):
        raise ScfError(f"{where} is not an object with dtype, shape and data_offsets")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in _ST_TO_TORCH:
        raise ScfError(f"{where} has unknown dtype {short_repr(code)} "
                       f"(known: {', '.join(_ST_TO_TORCH)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ScfError(f"{where} has shape {short_repr(shape)}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)
            and offsets[0] <= offsets[1]):
        raise ScfError(f"{where} has data_offsets {short_repr(offsets)}; expected [begin, end], "
                       f"non-negative integers with begin <= end")
    begin, end = offsets
    dtype = _ST_TO_TORCH[code]
    meta = TensorMeta(name, path, dtype, tuple(shape), (data_start + begin, data_start + end))
    expected = meta.numel * dtype.itemsize
    if end - begin != expected:
        raise ScfError(f"{path}: corrupted safetensors: tensor {short_repr(name)} has {end - begin} bytes, "
                       f"its shape {short_repr(shape)} and dtype {code} need {expected}")
    if data_start + end > size:
        raise ScfError(f"{path}: truncated safetensors: tensor {short_repr(name)} ends at byte "
                       f"{data_start + end}, the file has {size}")
    return meta


def _check_layout(path: Path, metas: list[TensorMeta], data_start: int, size: int) -> None:
    """Tensors sorted by offset must tile the data region exactly: no overlap (two names reading
    the same bytes), no gap and no trailing bytes (data no tensor accounts for)."""
    position, previous = data_start, None
    for meta in metas:
        begin, end = meta.span
        if begin < position:
            raise ScfError(f"{path}: corrupted safetensors: tensor {short_repr(meta.name)} (bytes "
                           f"{begin - data_start}-{end - data_start} of the data) overlaps tensor "
                           f"{short_repr(previous)}")
        if begin > position:
            raise ScfError(f"{path}: corrupted safetensors: {begin - position} bytes before tensor "
                           f"{short_repr(meta.name)} belong to no tensor")
        position, previous = end, meta.name
    if position != size:
        raise ScfError(f"{path}: corrupted safetensors: {size - position} trailing bytes after the last "
                       f"tensor belong to no tensor")


def regular_file(path: Path) -> os.stat_result:
    """``stat`` of a weight file that must be a regular file (a link to one is fine).

    A FIFO would block the first read forever and a directory cannot be read, so both (and devices,
    sockets, broken links) are refused before anything opens them.

    Args:
        path: the file.

    Returns:
        Its ``os.stat`` (links followed).

    Raises:
        ScfError: it is missing or not a regular file.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ScfError(f"{path}: does not exist (a broken link?)") from None
    except OSError as exc:
        raise ScfError(f"{path}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        kinds = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
                 stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
        kind = kinds.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise ScfError(f"{path}: is {kind}, not a regular file; weight files must be regular files")
    return info


@dataclass
class Checkpoint:
    """A model's weights, opened lazily: names, shapes and dtypes come from headers, data on demand.

    Attributes:
        root: the directory (or single file) it was opened from.
        kind: ``"safetensors"`` or ``"pickle"``.
        files: weight files in order.
        tensors: metadata per tensor name, in file and offset order.
        headers: raw header bytes per safetensors file (for fingerprints).
    """

    root: Path
    kind: str
    files: list[Path]
    tensors: dict[str, TensorMeta]
    headers: dict[Path, bytes] = field(default_factory=dict)
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @property
    def directory(self) -> Path | None:
        """The checkpoint directory (config and tokenizer live here), or None for a lone file."""
        return self.root if self.root.is_dir() else None

    def config(self) -> dict[str, Any] | None:
        """The checkpoint's ``config.json`` as a dict, or None when it has none."""
        if self.directory is None or not (self.directory / "config.json").is_file():
            return None
        path = self.directory / "config.json"
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ScfError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise ScfError(f"{path}: not a model config (a JSON object), got a JSON {type(config).__name__}")
        return config

    def load(self, name: str) -> torch.Tensor:
        """Load one tensor (on the CPU, in its stored dtype).

        Args:
            name: tensor name.

        Returns:
            The tensor.
        """
        meta = self.tensors[name]
        if self.kind != "safetensors":
            if meta.file not in self._handles:
                self._handles[meta.file] = _load_pickle(meta.file)
            return self._handles[meta.file][meta.name]
        try:
            # Opened per tensor: safe_open memory-maps the file, and a mapping kept open would
            # keep every page read so far resident (RSS growing to the model size).
            with safe_open(str(meta.file), framework="pt", device="cpu") as handle:
                return handle.get_tensor(meta.name)  # an alias (a tied LM head) reads its target
        except Exception as exc:  # safetensors raises its own error types
            reason = f"{type(exc).__name__}: {exc}"
            raise ScfError(f"{meta.file}: cannot read tensor {name!r} ({reason})") from None

    def aux_files(self) -> list[Path]:
        """Config and tokenizer files next to the weights (none for a lone ``.safetensors`` file)."""
        if self.directory is None:
            return []
        found = {p for pattern in CONFIG_AND_TOKENIZER_PATTERNS for p in self.directory.glob(pattern)}
        return sorted(p for p in found if p.is_file() and p.suffix not in {".safetensors", ".bin"})

    def close(self) -> None:
        """Release open file handles."""
        self._handles.clear()

    def fingerprint(self) -> str:
        """A cheap content fingerprint: sha256 over each file's header, size and data samples.

        For every tensor three 4 KiB samples (its first, middle and last bytes) are hashed, so
        two fine-tunes of one architecture (identical headers) differ, while a multi-GB
        checkpoint is fingerprinted by reading a few MB. An edit that changes no sampled byte
        goes unnoticed.

        Returns:
            A hex sha256.
        """
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode())
            if self.kind != "safetensors":
                digest.update(_file_sha256(path).encode())
                continue
            digest.update(self.headers[path])
            with path.open("rb") as f:
                for meta in (m for m in self.tensors.values() if m.file == path):
                    for offset in _sample_offsets(*meta.span):
                        f.seek(offset)
                        digest.update(f.read(min(_SAMPLE_BYTES, meta.span[1] - offset)))
        return digest.hexdigest()


def _sample_offsets(begin: int, end: int) -> list[int]:
    """Start offsets of the first, middle and last 4 KiB of a byte range (fewer if it is small)."""
    if end - begin <= 3 * _SAMPLE_BYTES:
        return [begin]
    middle = begin + (end - begin) // 2
    return [begin, middle, end - _SAMPLE_BYTES]


def _file_sha256(path: Path) -> str:
    """Streamed sha256 of a whole file (pickled weights have no header to sample)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickled state dict safely: ``weights_only`` (no code runs), memory-mapped when the file
    is in torch's zip format (an old-format file cannot be mapped and is read whole)."""
    regular_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many types for a bad pickle
        lines = str(exc).splitlines() or [""]
        # weights_only's refusal names the offending global on a later line ("Unsupported global: ...")
        reason = one_line(next((line for line in lines if "Unsupported global" in line), lines[0]), 300)
        raise ScfError(f"{path}: cannot load pickled weights with torch.load(weights_only=True), which "
                       f"loads tensors only and runs no code from the file ({type(exc).__name__}: "
                       f"{reason})") from None
    if not isinstance(state, dict):
        raise ScfError(f"{path}: pickled weights are not a state dict (got {type(state).__name__})")
    odd = [key for key, value in state.items()
           if not (isinstance(key, str) and isinstance(value, torch.Tensor))]
    if odd:
        shown = ", ".join(short_repr(k) for k in odd[:3])
        nested = "state_dict" in state or "model" in state
        what = ("a training checkpoint (a state dict nested among other entries)" if nested
                else "entries that are not tensors")
        raise ScfError(f"{path}: holds {what}: {shown}; only a flat state dict of name -> tensor can be "
                       f"merged: extract it and save it with safetensors")
    return state


def open_checkpoint(path: Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Find and check a checkpoint's weight files.

    Args:
        path: a directory (``model.safetensors``, ``model.safetensors.index.json`` plus shards,
            or other ``*.safetensors`` files) or a single ``.safetensors`` file.
        allow_pickle: accept pickled weights (``pytorch_model.bin``, or the shards of
            ``pytorch_model.bin.index.json``) when there are no safetensors.

    Returns:
        The opened `Checkpoint` (headers read and checked, no tensor data loaded).

    Raises:
        ScfError: no weights, pickled weights not allowed, a missing shard, a shard name that is not
            a plain file name, a weight file that is not a regular file, or a corrupted or truncated
            file; the message names the file.
    """
    if not path.is_dir():
        regular_file(path)
        if path.suffix != ".safetensors":
            raise ScfError(f"{path}: not a .safetensors file")
        return _open_safetensors(path, [path])
    index = path / INDEX_NAME
    if os.path.lexists(index):
        weight_map = _read_weight_map(index)
        checkpoint = _open_safetensors(path, [path / name for name in dict.fromkeys(weight_map.values())])
        _check_weight_map(index, weight_map, checkpoint)
        return checkpoint
    if os.path.lexists(path / SINGLE_NAME):
        return _open_safetensors(path, [path / SINGLE_NAME])
    loose = sorted(path.glob("*.safetensors"))
    if loose:
        return _open_safetensors(path, loose)
    pickled = _pickle_files(path)
    if not pickled:
        raise ScfError(f"{path}: no model weights found (expected {SINGLE_NAME} or {INDEX_NAME})")
    if not allow_pickle:
        raise ScfError(f"{path}: has only pickled .bin weights ({pickled[0].name}), which can run code "
                       f"when loaded; convert them to safetensors or pass --allow-pickle "
                       f"(allow_pickle: true) to load them with torch.load(weights_only=True)")
    return _open_pickle(path, pickled)


def _read_weight_map(index: Path) -> dict[str, str]:
    """An index's ``weight_map`` (tensor name -> shard file name), every shard name checked to be a
    plain file name of the index's directory and to exist there."""
    regular_file(index)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ScfError(f"{index}: not a valid index (no 'weight_map')") from None
    if not isinstance(weight_map, dict):
        raise ScfError(f"{index}: weight_map is a JSON {type(weight_map).__name__}, expected an object "
                       f"of tensor name -> shard file name")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ScfError(f"{index}: weight_map[{short_repr(tensor)}] is {short_repr(shard)}, "
                           f"expected a shard file name")
    for shard in dict.fromkeys(weight_map.values()):
        _check_shard_name(index, shard)
        if not os.path.lexists(index.parent / shard):
            raise ScfError(f"{index}: names shard {shard!r}, which does not exist in {index.parent}")
    return weight_map


def _check_shard_name(index: Path, shard: str) -> None:
    """A shard must be named by a plain file name (no directory part, no ``..``), so an index can only
    point inside its own directory. The name is checked, not where a link of that name points: the
    Hugging Face cache stores a snapshot's files as links into its blobs folder."""
    if not shard or shard in {".", ".."} or any(sep in shard for sep in ("/", "\\", "\0")):
        raise ScfError(f"{index}: names shard {short_repr(shard)}, which is not a plain file name; "
                       f"shards must be files directly inside {index.parent}")


def _check_weight_map(index: Path, weight_map: dict[str, str], checkpoint: Checkpoint) -> None:
    """Every tensor the index places must be in the header of the shard it names."""
    for tensor, shard in weight_map.items():
        meta = checkpoint.tensors.get(tensor)
        if meta is None or meta.file.name != shard:
            found = f"it is in {meta.file.name}" if meta else "no shard holds it"
            raise ScfError(f"{index}: places tensor {short_repr(tensor)} in {shard}, but {found}")


def _pickle_files(path: Path) -> list[Path]:
    """Pickled weight files of a directory: the shards its index names, else ``pytorch_model.bin``,
    else ``pytorch_model-*.bin``; never other ``.bin`` files (a trainer's ``training_args.bin``,
    ``optimizer.bin`` or ``rng_state.bin`` are not weights)."""
    index = path / PICKLE_INDEX_NAME
    if os.path.lexists(index):
        return [path / shard for shard in dict.fromkeys(_read_weight_map(index).values())]
    if os.path.lexists(path / PICKLE_SINGLE_NAME):
        return [path / PICKLE_SINGLE_NAME]
    return sorted(path.glob("pytorch_model-*.bin"))


def _open_safetensors(root: Path, files: list[Path]) -> Checkpoint:
    tensors: dict[str, TensorMeta] = {}
    headers: dict[Path, bytes] = {}
    for file in files:
        headers[file], metas = read_header(file)
        for name, meta in metas.items():
            if name in tensors:
                raise ScfError(f"{file}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = meta
    return Checkpoint(root, "safetensors", files, tensors, headers)


def _open_pickle(root: Path, files: list[Path]) -> Checkpoint:
    tensors: dict[str, TensorMeta] = {}
    handles: dict[Path, Any] = {}
    for file in files:
        handles[file] = state = _load_pickle(file)
        for name, tensor in state.items():
            if name in tensors:
                raise ScfError(f"{file}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = TensorMeta(name, file, tensor.dtype, tuple(tensor.shape))
    return Checkpoint(root, "pickle", files, tensors, {}, handles)


# ---------------------------------------------------------------------------------------- writing


def check_free_space(directory: Path, needed_bytes: int) -> None:
    """Fail early when a filesystem cannot hold the output.

    Args:
        directory: where the output goes (an existing directory on the target filesystem).
        needed_bytes: estimated output size.

    Raises:
        ScfError: less free space than needed plus a 1% margin; the message names the directory.
    """
    free = shutil.disk_usage(directory).free
    if free < needed_bytes * 1.01:
        raise ScfError(f"not enough free disk space in {directory}: the output needs about "
                       f"{human_bytes(needed_bytes)}, {human_bytes(free)} is free")


def human_bytes(n: float) -> str:
    """A byte count for people: ``28.7 KB``, ``1.5 GB`` (decimal units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class OutputTensor:
    """A tensor the writer will receive: name, shape and output dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Size of its data."""
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def plan_shards(tensors: list[OutputTensor], shard_size: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes (a bigger tensor alone).

    Args:
        tensors: output tensors in write order.
        shard_size: largest shard in bytes.

    Returns:
        The shards, each a list of tensors.
    """
    shards: list[list[OutputTensor]] = [[]]
    filled = 0
    for tensor in tensors:
        if shards[-1] and filled + tensor.nbytes > shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(tensor)
        filled += tensor.nbytes
    return shards


def shard_names(n_shards: int) -> list[str]:
    """Output file names: ``model.safetensors`` alone, else ``model-0000i-of-0000N.safetensors``."""
    if n_shards == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


class ShardedWriter:
    """Writes safetensors shards tensor by tensor, in a layout planned before the first write.

    Each shard's header (names, dtypes, shapes, offsets) is written when its first tensor
    arrives; tensors are appended as they come and a shard is fsynced and closed as soon as its
    last tensor is in. Tensors must arrive in the planned order.
    """

    def __init__(self, out_dir: Path, tensors: list[OutputTensor], shard_size: int,
                 metadata: dict[str, str]) -> None:
        """Plan the layout.

        Args:
            out_dir: an existing, empty directory.
            tensors: every output tensor, in the order `write` will be called.
            shard_size: largest shard in bytes.
            metadata: free-text ``__metadata__`` for every shard header.
        """
        self.out_dir = out_dir
        self.metadata = {"format": "pt", **metadata}
        self.shards = plan_shards(tensors, shard_size)
        self.files = [out_dir / name for name in shard_names(len(self.shards))]
        self._order = [(shard_i, t) for shard_i, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._handle: Any = None

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data across all shards."""
        return sum(t.nbytes for _, t in self._order)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (must be the next planned name, with its shape and dtype).

        Args:
            name: tensor name.
            tensor: the data (any device; copied to the CPU if needed).
        """
        shard_i, planned = self._order[self._next]
        if name != planned.name or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            got = f"{name} {tuple(tensor.shape)} {tensor.dtype}"
            raise RuntimeError(f"writer expected {planned} next, got {got}")
        try:
            if self._handle is None:
                self._handle = open_output(self.files[shard_i])
                self._handle.write(_header_bytes(self.shards[shard_i], self.metadata))
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._handle.write(memoryview(data.numpy()))
            self._next += 1
            if self._next == len(self._order) or self._order[self._next][0] != shard_i:
                _fsync_close(self._handle)
                self._handle = None
                if self._next < len(self._order):
                    faults.pause("between_shards")
        except OSError as exc:
            raise output_error(self.out_dir.parent, exc, self.files[shard_i].name) from None

    def finish(self) -> None:
        """Check every tensor was written and write the index when there are several shards."""
        if self._next != len(self._order):
            raise RuntimeError(f"writer got {self._next} of {len(self._order)} tensors")
        if len(self.files) == 1:
            return
        weight_map = {t.name: self.files[i].name for i, t in self._order}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        write_text(self.out_dir / INDEX_NAME, json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close an open shard after a failure (the atomic directory removes the files)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class BackgroundWriter:
    """Feeds a `ShardedWriter` from a thread, so writing a tensor (and fsyncing a finished shard)
    overlaps the computation of the next one.

    At most two tensors wait in the queue while another is being written (slack for a slow fsync
    or a large tensor), so memory holds at most three output tensors beyond the one being
    computed. A write error is raised by the next `write` or by `finish`. A tensor handed to
    `write` must not be modified afterwards.

    Attributes:
        busy_seconds: time the thread spent writing (it overlaps the caller's work).
    """

    def __init__(self, writer: ShardedWriter) -> None:
        self.busy_seconds = 0.0
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="scf-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain after a failure; the caller sees the error
            started = time.perf_counter()
            try:
                self._writer.write(*item)
            except BaseException as exc:  # handed to the caller
                self._error = exc
            self.busy_seconds += time.perf_counter() - started

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue the next tensor (blocks while two are already waiting).

        Args:
            name: tensor name, in the planned order.
            tensor: its data; not to be modified after this call.
        """
        self._raise_error()
        self._queue.put((name, tensor))

    def finish(self) -> None:
        """Wait for every queued tensor, then finish the shards and the index."""
        self._stop()
        self._raise_error()
        self._writer.finish()

    def abort(self) -> None:
        """Stop after a failure elsewhere: drop queued tensors, close the open shard."""
        self._error = self._error or RuntimeError("aborted")
        self._stop()
        self._writer.abort()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _header_bytes(shard: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus JSON header of one shard, padded to 8 bytes as safetensors does."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": _TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _fsync_close(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def open_output(path: Path) -> BinaryIO:
    """Create an output file for writing: the one place the merge output's files are created (the
    seam a test replaces to simulate a full disk where no small filesystem can be mounted).

    Args:
        path: the new file (inside the temporary output directory).

    Returns:
        A binary file opened for writing.
    """
    return path.open("wb")


def write_text(path: Path, text: str) -> None:
    """Write a text file of the output and fsync it; a failure is an `OutputError` naming the directory."""
    try:
        with open_output(path) as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise output_error(path.parent.parent, exc, path.name) from None


def copy_file(src: Path, dst: Path) -> None:
    """Copy a file into the output and fsync the copy; a failure to write is an `OutputError`."""
    data = src.read_bytes()  # config and tokenizer files: small
    try:
        with open_output(dst) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise output_error(dst.parent.parent, exc, dst.name) from None
