"""`scf merge` and `scf methods`: the merge library's subcommands (composed by flows/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from scf.errors import ScfError
from scf.yamlsafe import load_yaml

# CLI flag -> MergeSpec field, for flags that override the YAML config when given.
_FLAG_FIELDS = ("base", "secondary", "reference", "method", "device", "dtype", "seed", "shard_size",
                "diagnostics", "diagnostic_layers", "allow_pickle", "tokenizer_source")
_BOUND_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``merge`` and ``methods`` to the ``scf`` command.

    Args:
        subparsers: the ``add_subparsers()`` object of the ``scf`` parser.
    """
    merge = subparsers.add_parser(
        "merge", help="merge models (SCF-RKL or a baseline) into a new checkpoint",
        description="Merge a base with one or more secondaries, streaming tensor by tensor. Flags override "
                    "the fields of --config. Bad input: 'error: ...' and exit code 2, nothing written.")
    merge.add_argument("--config", type=Path,
                       help="YAML file of MergeSpec fields (base, secondary, method, params, ...), or a "
                            "mergekit config (merge_method, models, base_model, ...), run as it is")
    merge.add_argument("--out", required=True,
                       help="output directory (appears atomically); never an input, its parent or the "
                            "working directory")
    merge.add_argument("--base", help="base model: local dir, .safetensors file or hub id org/name[@rev]")
    merge.add_argument("--secondary", action="append", help="secondary model (repeat for several)")
    merge.add_argument("--reference", help="common ancestor for task-vector methods (mergekit's base_model)")
    merge.add_argument("--method", help="merge method (see `scf methods`; default scf_rkl)")
    merge.add_argument("--set", dest="params", action="append", default=[], metavar="KEY=VALUE",
                       help="method parameter, a YAML value (alpha=1.5, weight=[0.7,0.3]); repeatable")
    merge.add_argument("--device", choices=["auto", "cpu", "cuda"], help="compute device (default auto)")
    merge.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                       help="output dtype (default auto: the base's)")
    merge.add_argument("--seed", type=int, help="seed for sampling methods (default 0)")
    merge.add_argument("--shard-size", dest="shard_size",
                       help="largest output shard, e.g. 5GB (default), 500MiB")
    merge.add_argument("--diagnostics", action="store_true", default=None,
                       help="compute spectral shift and principal angles (paper section 3)")
    merge.add_argument("--diagnostic-layers", dest="diagnostic_layers", action="append", metavar="GLOB",
                       help="tensor-name glob to diagnose (repeatable; default: a few layers' attn/MLP)")
    merge.add_argument("--allow-pickle", dest="allow_pickle", action="store_true", default=None,
                       help="accept pickled .bin weights (loaded with torch.load(weights_only=True))")
    merge.add_argument("--tokenizer-source", dest="tokenizer_source", metavar="base|union|MODEL",
                       help="for inputs whose vocabularies differ: merge the rows every model has, take the "
                            "other rows, tokenizer and generation config from base, the union, or that input")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace --out if it is an earlier merge output (holds merge_report.json)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(func=run_merge)

    methods = subparsers.add_parser(
        "methods", help="list merge methods with their parameters",
        description="List merge methods, parameters, defaults, bounds and references.")
    methods.add_argument("--json", action="store_true", help="print JSON instead of text")
    methods.set_defaults(func=run_methods)

    convert = subparsers.add_parser(
        "convert-config", help="print a mergekit config as the equivalent scf merge config",
        description="Read a mergekit YAML config and print the scf merge config (MergeSpec YAML) that "
                    "`scf merge --config` runs to the same merge. Unsupported keys are errors.")
    convert.add_argument("config", type=Path, help="the mergekit YAML file")
    convert.set_defaults(func=run_convert_config)


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` items; values are YAML scalars or lists.

    Args:
        items: strings like ``alpha=1.5`` or ``weight=[0.7, 0.3]``.

    Returns:
        ``{key: value}``.

    Raises:
        ScfError: an item without ``=`` or with an unparsable value; the message quotes it.
    """
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ScfError(f"--set {item!r}: expected KEY=VALUE, e.g. --set alpha=1.5")
        # Bounded: an alias bomb is refused before anything walks (or prints) the value.
        params[key.strip()] = load_yaml(raw, f"--set {key.strip()}")
    return params


def build_spec(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The `MergeSpec` from ``--config`` (ours or mergekit's) with the given flags and ``--set``
    params on top, and the warnings a mergekit config's translation leaves for the report."""
    from scf.spec import load_spec_file, spec_from_mapping

    data = load_spec_file(args.config) if args.config else {}
    origin = str(args.config) if args.config else "command line"
    warnings: list[str] = []
    if args.config:
        from scf.mergekit_config import is_mergekit, translate

        if is_mergekit(data):
            translation = translate(data, origin, _downloaded_layer_count)
            data, warnings = translation.spec, translation.warnings
    for field in _FLAG_FIELDS:
        value = getattr(args, field)
        if value is not None:
            data[field] = value
    if args.params:
        data["params"] = {**(data.get("params") or {}), **parse_set(args.params)}
    if "base" not in data or ("secondary" not in data and data.get("method") != "passthrough"):
        raise ScfError(f"merge spec from {origin}: base and secondary are required "
                       f"(--base A --secondary B, or in --config)")
    return spec_from_mapping(data, origin), warnings


def _downloaded_layer_count(ref: str) -> int | None:
    """A model's num_hidden_layers, resolving (downloading) it as the merge is about to."""
    from scf.mergekit_config import layer_count_of
    from scf.sources import resolve_source

    path = resolve_source(ref).path
    return layer_count_of(path / "config.json" if path.is_dir() else None)


def run_merge(args: argparse.Namespace) -> int:
    """Handler of ``scf merge``: merge and print a one-paragraph summary."""
    from scf.merge import merge

    spec, warnings = build_spec(args)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    report = merge(spec, args.out, overwrite=args.overwrite, progress=not args.quiet, warnings=warnings)
    totals = report["totals"]
    shares = ", ".join(f"{k} {v:.2%}" for k, v in totals["fraction_from"].items())
    print(f"merged {totals['n_tensors']} tensors ({totals['n_params']:,} params) with {report['method']} "
          f"into {args.out} in {report['timings']['total_seconds']:.1f}s; values from: {shares}")
    vocab = report.get("vocabulary")
    for name, rows in (vocab or {}).get("tensors", {}).items():
        if rows["rows_copied"] or len(set(rows["rows_of"].values())) > 1:
            print(f"{name}: {rows['rows']} rows, {rows['rows_merged']} merged, {rows['rows_copied']} copied "
                  f"from {rows['copied_from'] or '-'} (tokenizer from {vocab['source']})")
    return 0


def run_convert_config(args: argparse.Namespace) -> int:
    """Handler of ``scf convert-config``: print the scf config of a mergekit config (no torch)."""
    import yaml

    from scf.mergekit_config import is_mergekit, local_layer_count, translate
    from scf.spec import load_spec_file, spec_from_mapping

    data = load_spec_file(args.config)
    if not is_mergekit(data):
        raise ScfError(f"{args.config}: not a mergekit config (it has no merge_method, models or base_model)")
    translation = translate(data, str(args.config), local_layer_count)
    spec = spec_from_mapping(translation.spec, str(args.config))  # what `scf merge --config` will accept
    fields = spec.model_dump(mode="json", exclude_defaults=True)
    order = ("base", "secondary", "reference", "method", "params", "slices")
    fields = {key: fields[key] for key in order if key in fields} | fields
    fields.setdefault("method", spec.method)  # scf_rkl is our default, not mergekit's
    sys.stdout.write(f"# scf merge config, converted from the mergekit config {args.config}\n")
    for warning in translation.warnings:
        sys.stdout.write(f"# warning: {warning}\n")
    sys.stdout.write(yaml.dump(fields, Dumper=_flow_list_dumper(), sort_keys=False))
    return 0


def _flow_list_dumper() -> type:
    """A safe YAML dumper that writes lists of plain values on one line (gradients, per-model lists)."""
    import yaml

    class FlowListDumper(yaml.SafeDumper):
        def represent_list(self, data: list) -> yaml.Node:
            plain = all(isinstance(v, int | float | str | bool) for v in data)
            return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=plain)

    FlowListDumper.add_representer(list, FlowListDumper.represent_list)
    return FlowListDumper


def run_methods(args: argparse.Namespace) -> int:
    """Handler of ``scf methods``: list every method with its parameters (no torch needed)."""
    from scf.methods.registry import METHODS

    described = [describe_method(spec) for spec in METHODS.values()]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    for method in described:
        sys.stdout.write(f"{method['name']} ({method['inputs']})\n  {method['summary']}\n"
                         f"  {method['reference_url']}\n")
        for param in method["params"]:
            value = "required" if param["required"] else f"= {param['default']!r}"
            bounds = f" {param['bounds']}" if param["bounds"] else ""
            per_model = " (per model)" if param["per_model"] else ""
            sys.stdout.write(f"    {param['name']} {value}{bounds}{per_model}: {param['help']}\n")
        sys.stdout.write("\n")
    return 0


def describe_method(spec: Any) -> dict[str, Any]:
    """A method's registry entry as plain data: name, inputs, summary, URL and each parameter.

    Parameters are listed under the key configs use (``lambda``, not the Python name ``lambda_``),
    with their default (None when required), bounds, whether they are per model, and their help.
    """
    params = []
    for name, field in spec.params.model_fields.items():
        bounds = [f"{symbol} {getattr(m, attr)}" for m in field.metadata
                  for attr, symbol in _BOUND_SYMBOLS.items() if hasattr(m, attr)]
        required = field.is_required()
        params.append({
            "name": field.alias or name,
            "default": None if required else field.get_default(call_default_factory=True),
            "required": required,
            "bounds": ", ".join(bounds),
            "per_model": name in spec.per_model_params,
            "help": field.description or "",
        })
    return {"name": spec.name, "summary": spec.summary, "inputs": _inputs_line(spec),
            "needs_reference": spec.needs_reference, "optional_reference": spec.optional_reference,
            "reference_url": spec.reference_url, "params": params}


def _inputs_line(spec: Any) -> str:
    """What a method merges, e.g. ``base + 1 secondary`` or ``base + secondaries, needs --reference``."""
    fewest, most = spec.secondaries
    if most == 0:
        return "base alone, or slices of several models"
    if most == fewest:
        models = f"base + {fewest} secondar{'y' if fewest == 1 else 'ies'}"
    else:
        models = "base + secondaries"
    if spec.needs_reference:
        return f"{models}, needs --reference"
    if spec.optional_reference:
        return f"{models}, optional --reference"
    return models
