"""Build the corpus of hostile and malformed inputs for `scf merge`, each case with its expected message.

Nothing here is committed as data: tests/reliability/test_hostile_inputs.py calls `build(root)` into
a temporary directory and runs every case. To look at the files yourself:

    python tests/data/bad/build.py /tmp/bad      # writes the cases and /tmp/bad/cases.json

A case is the arguments of one ``scf merge`` (``{root}`` stands for the corpus directory) and the
fragments its one ``error:`` line must hold; a case with no fragments must merge successfully (the
test then checks what it promises, e.g. that integer tensors are the base's). Only torch,
safetensors and the standard library are used, so the corpus does not depend on the code it tests.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

# The good pair every broken variant is compared against: two float tensors and two non-float buffers.
BASE = {
    "a.weight": torch.arange(16, dtype=torch.float32).reshape(4, 4) / 16,
    "a.bias": torch.tensor([0.5, -0.5, 0.25, -0.25]),
    "a.ids": torch.tensor([3, 1, 2], dtype=torch.int8),
    "a.mask": torch.tensor([True, False]),
}
BOMB = (
    "[&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
    "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], "
    "&g [*f,*f,*f,*f,*f,*f,*f,*f,*f], &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]]"
)


@dataclass
class Case:
    """One hostile input: ``scf merge`` arguments and the fragments of the expected error line.

    Attributes:
        name: the case's directory under the corpus root.
        args: ``scf merge`` arguments; ``{root}`` is the corpus root.
        expect: fragments of the single ``error:`` line; empty: the merge must succeed.
        note: what the case is about.
    """

    name: str
    args: list[str]
    expect: list[str] = field(default_factory=list)
    note: str = ""


def secondary() -> dict[str, torch.Tensor]:
    """The good secondary: different floats, different integer and bool buffers."""
    return {
        "a.weight": BASE["a.weight"] * 2,
        "a.bias": BASE["a.bias"] + 1,
        "a.ids": torch.tensor([9, 9, 9], dtype=torch.int8),
        "a.mask": torch.tensor([False, True]),
    }


def header_for(tensors: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    """A correct safetensors header (as a dict) and data region for ``tensors``."""
    codes = {torch.float32: "F32", torch.int8: "I8", torch.bool: "BOOL", torch.int64: "I64"}
    header, data, offset = {}, b"", 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": codes[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        data += raw
        offset += len(raw)
    return header, data


def raw_file(
    path: Path, header: dict | str, data: bytes, *, header_len: int | None = None, extra: bytes = b""
) -> None:
    """Write a safetensors-like file byte by byte (header as given, even when it lies)."""
    text = header if isinstance(header, str) else json.dumps(header)
    encoded = text.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        struct.pack("<Q", len(encoded) if header_len is None else header_len) + encoded + data + extra
    )


def model_dir(path: Path, tensors: dict[str, torch.Tensor], *, config: object = None) -> Path:
    """A directory with ``model.safetensors`` (and a ``config.json`` when given)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def lying_header(root: Path, name: str, change) -> Path:  # noqa: ANN001 - a function editing the header
    """The good secondary with its header edited by ``change(header) -> (header, data)``."""
    header, data = header_for(secondary())
    header, data = change(header, data)
    raw_file(root / name / "model.safetensors", header, data)
    return root / name


def merge_args(out: str, sec: str, *extra: str, base: str = "{root}/good/base") -> list[str]:
    """``scf merge`` of ``sec`` into ``base`` with linear, writing ``{root}/out/<out>``."""
    return ["--base", base, "--secondary", sec, "--method", "linear", *extra, "--out", f"{{root}}/out/{out}"]


def _safetensors_cases(root: Path) -> list[Case]:
    cases = []

    def add(name: str, expect: list[str], note: str, *extra: str) -> None:
        cases.append(Case(name, merge_args(name, f"{{root}}/{name}", *extra), expect, note))

    good = (root / "good" / "sec" / "model.safetensors").read_bytes()
    (root / "truncated").mkdir()
    (root / "truncated" / "model.safetensors").write_bytes(good[:-10])
    add("truncated", ["truncated safetensors", "model.safetensors"], "the last 10 bytes are missing")

    (root / "header_larger_than_file").mkdir()
    (root / "header_larger_than_file" / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + good[8:])
    add(
        "header_larger_than_file",
        ["header length 1000000 does not fit in a"],
        "header length beyond the file",
    )

    def short_bias(h: dict, d: bytes) -> tuple:
        h["a.bias"]["data_offsets"][1] -= 4
        return h, d

    lying_header(root, "lies_about_offsets", short_bias)
    add("lies_about_offsets", ["tensor 'a.bias' has 12 bytes", "need 16"], "offsets span too few bytes")

    def f64(h: dict, d: bytes) -> tuple:
        h["a.weight"]["dtype"] = "F64"
        return h, d

    lying_header(root, "lies_about_dtype", f64)
    add(
        "lies_about_dtype",
        ["tensor 'a.weight' has 64 bytes", "dtype F64 need 128"],
        "dtype F64, data for F32",
    )

    def alias(h: dict, d: bytes) -> tuple:
        h["a.bias"]["data_offsets"] = [0, 16]  # the first 16 bytes of a.weight
        for name in ("a.ids", "a.mask"):
            h[name]["data_offsets"] = [x - 16 for x in h[name]["data_offsets"]]
        return h, d[:64] + d[80:]

    lying_header(root, "aliased_offsets", alias)
    add("aliased_offsets", ["overlaps tensor"], "two tensors read the same bytes")

    def overlap(h: dict, d: bytes) -> tuple:
        h["a.bias"]["data_offsets"] = [56, 72]
        h["a.ids"]["data_offsets"] = [72, 75]
        h["a.mask"]["data_offsets"] = [75, 77]
        return h, d[:77]

    lying_header(root, "overlapping_offsets", overlap)
    add(
        "overlapping_offsets",
        ["tensor 'a.bias' (bytes 56-72 of the data) overlaps tensor 'a.weight'"],
        "spans overlap",
    )

    def negative(h: dict, d: bytes) -> tuple:
        h["a.bias"]["data_offsets"] = [-16, 0]
        return h, d

    lying_header(root, "negative_offsets", negative)
    add("negative_offsets", ["tensor 'a.bias' has data_offsets [-16, 0]"], "a negative offset")

    def very_negative(h: dict, d: bytes) -> tuple:
        h["a.bias"]["data_offsets"] = [-(2**62), -(2**62) + 16]
        return h, d

    lying_header(root, "large_negative_offsets", very_negative)
    add(
        "large_negative_offsets",
        ["tensor 'a.bias' has data_offsets", "non-negative integers"],
        "a large negative offset (a traceback before)",
    )

    def strings(h: dict, d: bytes) -> tuple:
        h["a.bias"]["data_offsets"] = ["64", "80"]
        return h, d

    lying_header(root, "string_offsets", strings)
    add("string_offsets", ["tensor 'a.bias' has data_offsets ['64', '80']"], "offsets as strings")

    def gap(h: dict, d: bytes) -> tuple:
        for name in ("a.bias", "a.ids", "a.mask"):
            h[name]["data_offsets"] = [x + 8 for x in h[name]["data_offsets"]]
        return h, d[:64] + b"\0" * 8 + d[64:]

    lying_header(root, "gap_between_tensors", gap)
    add(
        "gap_between_tensors", ["8 bytes before tensor 'a.bias' belong to no tensor"], "data no tensor covers"
    )

    header, data = header_for(secondary())
    raw_file(root / "trailing_bytes" / "model.safetensors", header, data, extra=b"12345678")
    add("trailing_bytes", ["8 trailing bytes after the last tensor"], "bytes after the last tensor")

    text = json.dumps(header)[:-1] + ', "a.bias": ' + json.dumps(header["a.bias"]) + "}"
    raw_file(root / "duplicate_json_keys" / "model.safetensors", text, data)
    add("duplicate_json_keys", ["key 'a.bias' appears twice"], "a JSON key twice: which one wins?")

    def unknown(h: dict, d: bytes) -> tuple:
        h["a.weight"]["dtype"] = "F12"
        return h, d

    lying_header(root, "unknown_dtype", unknown)
    add("unknown_dtype", ["tensor 'a.weight' has unknown dtype 'F12'"], "no such dtype")

    raw_file(root / "not_json" / "model.safetensors", "{not json" + " " * 7, data)
    add("not_json", ["corrupted safetensors header (not JSON)"], "the header is not JSON")

    def float8(h: dict, d: bytes) -> tuple:
        h["a.weight"] = {"dtype": "F8_E4M3", "shape": [4, 4], "data_offsets": [0, 16]}
        for name in ("a.bias", "a.ids", "a.mask"):
            h[name]["data_offsets"] = [x - 48 for x in h[name]["data_offsets"]]
        return h, d[:16] + d[64:]

    lying_header(root, "float8", float8)
    add(
        "float8",
        ["tensor 'a.weight' of secondary[0]", "is float8 (F8_E4M3)", "dequantize"],
        "quantized weights: refused with the reason",
    )

    kinds = dict(secondary(), **{"a.bias": torch.tensor([1, 2, 3, 4], dtype=torch.int64)})
    model_dir(root / "dtype_kind_mismatch", kinds)
    add(
        "dtype_kind_mismatch",
        ["tensor 'a.bias': dtype mismatch: base has float32 (float)", "secondary[0] has int64 (integer)"],
        "I64 where the base is F32",
    )

    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        poisoned = secondary()
        poisoned["a.bias"] = poisoned["a.bias"].clone()
        poisoned["a.bias"][2] = value
        model_dir(root / name, poisoned)
        add(name, ["tensor 'a.bias' of secondary[0]", "has 1 NaN/Inf values"], f"{name} in an input")

    huge = {**BASE, "a.weight": torch.full((4, 4), 1e30)}
    model_dir(root / "overflow_float16_base", huge)
    model_dir(root / "overflow_float16", dict(secondary(), **{"a.weight": torch.full((4, 4), 1e30)}))
    cases.append(
        Case(
            "overflow_float16",
            [
                "--base",
                "{root}/overflow_float16_base",
                "--secondary",
                "{root}/overflow_float16",
                "--method",
                "linear",
                "--dtype",
                "float16",
                "--out",
                "{root}/out/overflow_float16",
            ],
            ["tensor 'a.weight': the merged values hold NaN/Inf in the output dtype float16"],
            "1e30 is finite in float32 and Inf in float16: checked after the cast",
        )
    )

    model_dir(root / "config_list_base", BASE, config=[1, 2])
    cases.append(
        Case(
            "config_list_with_dtype",
            [
                "--base",
                "{root}/config_list_base",
                "--secondary",
                "{root}/good/sec",
                "--method",
                "linear",
                "--dtype",
                "bfloat16",
                "--out",
                "{root}/out/config_list",
            ],
            ["config.json: not a model config (a JSON object), got a JSON list"],
            "found while planning, not after the merge",
        )
    )
    return cases


def _layout_cases(root: Path) -> list[Case]:
    cases = []

    def add(name: str, expect: list[str], note: str, *extra: str) -> None:
        cases.append(Case(name, merge_args(name, f"{{root}}/{name}", *extra), expect, note))

    def index_dir(name: str, weight_map: object, shards: dict[str, dict[str, torch.Tensor]]) -> None:
        directory = root / name
        directory.mkdir(parents=True)
        for file, tensors in shards.items():
            save_file(tensors, str(directory / file))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    sec = secondary()
    index_dir("weight_map_is_a_list", list(sec), {"model-1.safetensors": sec})
    add("weight_map_is_a_list", ["weight_map is a JSON list"], "a list where a mapping belongs")
    index_dir(
        "weight_map_null_value",
        dict.fromkeys(sec, "model-1.safetensors") | {"a.bias": None},
        {"model-1.safetensors": sec},
    )
    add("weight_map_null_value", ["weight_map['a.bias'] is None, expected a shard file name"], "a null shard")
    for name, shard in (
        ("index_parent_path", "../good/sec/model.safetensors"),
        ("index_absolute_path", str(root / "good" / "sec" / "model.safetensors")),
        ("index_etc_passwd", "../../../../../../../../etc/passwd"),
    ):
        index_dir(name, dict.fromkeys(sec, shard), {})
        add(
            name,
            [f"names shard {shard!r}, which is not a plain file name"],
            "an index pointing outside the model directory: never opened",
        )
    first = {"a.weight": sec["a.weight"], "a.bias": sec["a.bias"]}
    second = {"a.weight": sec["a.weight"], "a.ids": sec["a.ids"], "a.mask": sec["a.mask"]}
    index_dir(
        "duplicate_across_shards",
        {
            "a.weight": "model-1.safetensors",
            "a.bias": "model-1.safetensors",
            "a.ids": "model-2.safetensors",
            "a.mask": "model-2.safetensors",
        },
        {"model-1.safetensors": first, "model-2.safetensors": second},
    )
    add(
        "duplicate_across_shards",
        ["model-2.safetensors: tensor 'a.weight' also appears in model-1.safetensors"],
        "one name in two shards",
    )

    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "model.safetensors")
    add("fifo", ["model.safetensors: is a FIFO (named pipe), not a regular file"], "would block forever")
    (root / "directory_named_safetensors" / "x.safetensors").mkdir(parents=True)
    add("directory_named_safetensors", ["x.safetensors: is a directory, not a regular file"], "not a file")

    # The Hugging Face cache layout: snapshot files are links into blobs/ (sharded, with an index).
    blobs = root / "hf_cache" / "blobs"
    snapshot = root / "hf_cache" / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, (file, tensors) in enumerate(
        (("model-1.safetensors", first), ("model-2.safetensors", {k: sec[k] for k in ("a.ids", "a.mask")}))
    ):
        save_file(tensors, str(blobs / f"blob{i}"))
        (snapshot / file).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    weight_map = {
        "a.weight": "model-1.safetensors",
        "a.bias": "model-1.safetensors",
        "a.ids": "model-2.safetensors",
        "a.mask": "model-2.safetensors",
    }
    (blobs / "index").write_text(json.dumps({"weight_map": weight_map}))
    (snapshot / "model.safetensors.index.json").symlink_to(Path("..") / ".." / "blobs" / "index")
    cases.append(
        Case(
            "hf_cache_symlinks",
            merge_args("hf_cache_symlinks", f"{{root}}/hf_cache/snapshots/{'a' * 40}"),
            [],
            "links into blobs/ keep working",
        )
    )

    odd = {"../../evil": torch.ones(2), "a/b": torch.zeros(2), "/abs/path": torch.ones(3)}
    model_dir(root / "odd_names_base", {**BASE, **odd})
    model_dir(root / "odd_names", {**secondary(), **{k: v * 3 for k, v in odd.items()}})
    cases.append(
        Case(
            "tensor_names_with_separators",
            merge_args("tensor_names_with_separators", "{root}/odd_names", base="{root}/odd_names_base"),
            [],
            "legal tensor names, never used as paths",
        )
    )
    empty = {"empty.weight": torch.zeros(0, 4), "empty.bias": torch.zeros(0)}
    model_dir(root / "zero_size_base", {**BASE, **empty})
    model_dir(root / "zero_size", {**secondary(), **empty})
    cases.append(
        Case(
            "zero_size_tensors",
            merge_args("zero_size", "{root}/zero_size", base="{root}/zero_size_base"),
            [],
            "tensors with no elements",
        )
    )
    cases.append(
        Case(
            "non_float_copied_from_base",
            merge_args("non_float", "{root}/good/sec"),
            [],
            "int8 and bool buffers are the base's, not merged",
        )
    )
    return cases


class _Pwn:
    """Unpickling this would create a file: a pickle that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _pickle_cases(root: Path) -> list[Case]:
    def pickle_dir(name: str, obj: object, *, legacy: bool = False, extra: dict | None = None) -> str:
        directory = root / name
        directory.mkdir(parents=True)
        torch.save(obj, directory / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        for file, value in (extra or {}).items():
            torch.save(value, directory / file)
        return f"{{root}}/{name}"

    sec = secondary()
    plain = pickle_dir("pickled", sec)
    evil = pickle_dir("malicious_pickle", {"a.weight": _Pwn(root / "pwned")})
    nested = pickle_dir("nested_state_dict", {"state_dict": sec, "epoch": 3})
    legacy = pickle_dir("legacy_pickle", sec, legacy=True)
    trainer = pickle_dir(
        "trainer_dir",
        sec,
        extra={"training_args.bin": {"args": _Pwn(root / "pwned_args")}, "optimizer.bin": {"state": {}}},
    )
    return [
        Case(
            "pickle_refused_by_default",
            merge_args("pickled", plain),
            [
                "has only pickled .bin weights (pytorch_model.bin), which can run code when loaded",
                "--allow-pickle",
            ],
            "pickles are refused unless asked for",
        ),
        Case(
            "malicious_pickle_refused",
            merge_args("evil", evil),
            ["which can run code when loaded"],
            "never unpickled without --allow-pickle",
        ),
        Case(
            "malicious_pickle_with_allow_pickle",
            merge_args("evil_allowed", evil, "--allow-pickle"),
            ["cannot load pickled weights with torch.load(weights_only=True)"],
            "weights_only refuses it; the file is never created",
        ),
        Case(
            "nested_state_dict",
            merge_args("nested", nested, "--allow-pickle"),
            ["holds a training checkpoint", "'state_dict'", "flat state dict"],
            "a trainer checkpoint",
        ),
        Case(
            "legacy_pickle",
            merge_args("legacy", legacy, "--allow-pickle"),
            [],
            "old (non-zip) format: read without mmap",
        ),
        Case(
            "trainer_dir",
            merge_args("trainer", trainer, "--allow-pickle"),
            [],
            "training_args.bin and optimizer.bin next to the weights are not loaded",
        ),
    ]


def _config_cases(root: Path) -> list[Case]:
    good = f"base: {root}/good/base\nsecondary: [{root}/good/sec]\nmethod: linear\n"
    configs = {
        "unknown_key": (good + "shard_sise: 1GB\n", ["shard_sise: unknown key"]),
        "wrong_type": (good + "seed: abc\n", ["seed: Input should be a valid integer"]),
        "wrong_type_secondary": (
            f"base: {root}/good/base\nsecondary: 3\n",
            ["secondary: Input should be a valid list"],
        ),
        "alias_bomb": (good + f"params: {{weight: {BOMB}}}\n", ["expands to more than 100,000 values"]),
        "python_tag": (
            good + "params: {weight: !!python/object/apply:os.system [touch pwned]}\n",
            ["could not determine a constructor for the tag"],
        ),
        "shard_size_zero": (good + "shard_size: 0\n", ["shard_size", "must be at least 1 byte"]),
        "shard_size_negative": (good + "shard_size: -5GB\n", ["shard_size", "'-5GB' is not a size"]),
        "shard_size_bool": (good + "shard_size: true\n", ["shard_size", "True is not a size"]),
        "weight_infinite": (good + "params: {weight: .inf}\n", ["weight"]),
        "seed_negative": (good + "seed: -1\n", []),  # any integer seeds (it is hashed with the tensor name)
    }
    marker = root / "pwned_shell"
    for i, ref in enumerate(
        (f"x; touch {marker}", f"$(touch {marker})", f"`touch {marker}`", f"x && touch {marker}")
    ):
        configs[f"shell_injection_{i}"] = (
            f"base: {ref!r}\nsecondary: [{root}/good/sec]\nmethod: linear\n",
            ["no such file or directory"],
        )
    cases = []
    (root / "configs").mkdir()
    for name, (text, expect) in configs.items():
        (root / "configs" / f"{name}.yaml").write_text(text)
        cases.append(
            Case(
                f"config_{name}",
                ["--config", f"{{root}}/configs/{name}.yaml", "--out", f"{{root}}/out/config_{name}"],
                expect,
                "a --config file",
            )
        )
    cases.append(
        Case(
            "set_alias_bomb",
            merge_args("set_alias_bomb", "{root}/good/sec", "--set", f"weight={BOMB}"),
            ["--set weight: the YAML expands to more than 100,000 values"],
            "the bomb on the command line",
        )
    )
    return cases


def build(root: Path) -> list[Case]:
    """Write the corpus under ``root`` (an empty or missing directory) and return its cases."""
    model_dir(root / "good" / "base", BASE)
    model_dir(root / "good" / "sec", secondary())
    (root / "out").mkdir()
    return _safetensors_cases(root) + _layout_cases(root) + _pickle_cases(root) + _config_cases(root)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    cases = build(out)
    (out / "cases.json").write_text(json.dumps([asdict(c) for c in cases], indent=2))
    print(f"{len(cases)} cases in {out}")
