"""`scf eval` and `scf zoo build`: the evaluation library's subcommands.

`register` imports only cheap modules (the suite table, the backend names): `scf --help` never
loads torch, transformers, pydantic or lm-eval. The handlers import what they run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evals.errors import EvalError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` and `zoo` to the `scf` command.

    Args:
        subparsers: the `scf` parser's subparsers.
    """
    _register_eval(subparsers)
    _register_zoo(subparsers)


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    from evals.backends import BACKENDS
    from evals.catalog import SUITES

    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model: benchmark scores, repetition and safety",
        description="Evaluate a local model directory on a named suite and write one JSON report.",
    )
    parser.add_argument("model", help="model directory (config.json, tokenizer, safetensors weights)")
    parser.add_argument("--suite", default="toy", help=f"suite name: {', '.join(SUITES)} (default: toy)")
    parser.add_argument(
        "--backend", default="transformers", choices=tuple(BACKENDS), help="default: transformers; vllm: GPU"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--limit", type=int, default=None, help="at most N samples per benchmark")
    parser.add_argument(
        "--items",
        metavar="START:STOP",
        help="only items [START, STOP) of each benchmark, after --limit: positions (2:5, 10:) or "
        "shares of each benchmark's items (0.25:0.5)",
    )
    gen = parser.add_argument_group("decoding (default: the suite's settings)")
    gen.add_argument("--max-new-tokens", type=int, help="tokens generated per prompt at most")
    gen.add_argument("--temperature", type=float, help="0 = greedy")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--repetition-penalty", type=float, help="1.0 = off")
    gen.add_argument("--seed", type=int, help="sampling seed")
    gen.add_argument("--batch-size", type=int)
    gen.add_argument("--stop", action="append", help="extra stop string (repeatable)")
    parser.add_argument(
        "--safety-data",
        action="append",
        type=Path,
        default=[],
        help="HarmBench / StrongREJECT / XSTest CSV or JSONL file (repeatable)",
    )
    parser.add_argument("--judge", default="matcher", help="'matcher' (default) or a judge model directory")
    parser.add_argument(
        "--no-chat-template", action="store_true", help="don't apply the tokenizer's chat template"
    )
    parser.add_argument("--no-samples", action="store_true", help="leave per-sample generations out")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickled .bin weights when there are no safetensors (unpickling can run code)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model's own Python code run (transformers/vLLM auto_map); logged when on",
    )
    engine = parser.add_argument_group("vLLM engine (--backend vllm; default: see docs/evaluation.md)")
    engine.add_argument("--tensor-parallel-size", type=int, help="GPUs per model (default 1)")
    engine.add_argument("--gpu-memory-utilization", type=float, help="share of GPU memory (default 0.9)")
    engine.add_argument("--max-model-len", type=int, help="prompt + generation tokens (default: the model's)")
    engine.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    engine.add_argument("--max-num-seqs", type=int, help="sequences decoded at once (default 256)")
    engine.add_argument("--vllm-batch-size", help="requests per engine call, or 'auto' (default: auto)")
    parser.add_argument(
        "--spec",
        type=Path,
        help="a JSON file holding a whole EvalSpec (what the pipeline runs); replaces the flags above",
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run_eval)


def _register_zoo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("zoo", help="the toy model zoo", description="The toy model zoo.")
    zoo_commands = parser.add_subparsers(dest="zoo_command", required=True, metavar="COMMAND")
    build = zoo_commands.add_parser(
        "build",
        help="build (train) the toy zoo: base + specialists",
        description="Build the toy zoo (base, math, strings, safety, weak) into DIR; cached by settings.",
    )
    build.add_argument("--out", type=Path, help="zoo directory (default: under $SCF_CACHE)")
    build.add_argument("--size", default="tiny", choices=("tiny", "small"), help="default: tiny")
    build.add_argument("--seed", type=int, default=0, help="default: 0")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.add_argument("--no-progress", action="store_true", help="hide progress bars")
    build.set_defaults(func=run_zoo_build)


def build_spec(args: argparse.Namespace):
    """The EvalSpec an `scf eval` command line asks for.

    Args:
        args: parsed `scf eval` arguments.

    Returns:
        The validated `EvalSpec` (decoding = the suite's defaults, overridden by the flags given).

    Raises:
        EvalError: unknown suite, or a flag value out of range (named).
    """
    from pydantic import ValidationError

    from evals.catalog import get_suite
    from evals.spec import EvalSpec, GenParams

    if args.spec is not None:
        return _spec_from_file(args.spec)
    suite = get_suite(args.suite)
    overrides = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "stop": tuple(args.stop) if args.stop else None,
    }
    batch = args.vllm_batch_size
    engine = {
        "tensor_parallel_size": args.tensor_parallel_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_model_len": args.max_model_len,
        "enforce_eager": args.enforce_eager,
        "max_num_seqs": args.max_num_seqs,
        "batch_size": int(batch) if batch is not None and batch.isdigit() else batch,
    }
    try:
        gen = GenParams(**(dict(suite.default_gen) | {k: v for k, v in overrides.items() if v is not None}))
        return EvalSpec(
            suite=suite.name,
            backend=args.backend,
            device=args.device,
            dtype=args.dtype,
            limit=args.limit,
            items=parse_items(args.items),
            gen=gen,
            safety={"files": tuple(args.safety_data)},
            chat_template=not args.no_chat_template,
            judge=args.judge,
            keep_samples=not args.no_samples,
            allow_pickle=args.allow_pickle,
            trust_remote_code=args.trust_remote_code,
            vllm={k: v for k, v in engine.items() if v is not None},
        )
    except ValidationError as err:
        raise EvalError(_describe(err)) from err


def parse_items(text: str | None) -> dict | None:
    """`--items START:STOP` as `ItemSlice` fields: whole numbers are positions, decimals are shares.

    Args:
        text: "2:5", "10:" (to the end), "0.25:0.5"; None when the flag is not given.

    Returns:
        The fields (validated by `EvalSpec`), or None.

    Raises:
        EvalError: not of the form START:STOP with numbers.
    """
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    unit = "share" if "." in text else "index"
    number = float if unit == "share" else int
    try:
        if not sep:
            raise ValueError
        return {"start": number(start or 0), "stop": number(stop) if stop else None, "unit": unit}
    except ValueError:
        raise EvalError(f"--items: expected START:STOP (e.g. 2:5, 10: or 0.25:0.5), got {text!r}") from None


def _spec_from_file(path: Path):
    """An EvalSpec from a JSON file (``EvalSpec.model_dump_json()``); EvalError names the file."""
    from pydantic import ValidationError

    from evals.spec import EvalSpec

    try:
        return EvalSpec.model_validate_json(path.read_text())
    except OSError as err:
        raise EvalError(f"--spec {path}: cannot read ({err.strerror})") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise EvalError(f"--spec {path}: invalid EvalSpec: {problems}") from None


def _describe(err) -> str:
    """One line per bad field, named as the flag that sets it."""
    problems = []
    for error in err.errors():
        loc = [str(part) for part in error["loc"]]
        field = loc[-1] if loc else "?"
        if loc[:1] == ["vllm"] and len(loc) > 1:  # engine flags; a union's member names its type last
            field = "vllm-batch-size" if loc[1] == "batch_size" else loc[1]
        message = error["msg"].removeprefix("Value error, ")
        # An empty loc: a check across fields of the whole spec, whose message names them.
        problems.append(f"--{field.replace('_', '-')}: {message}" if loc else message)
    return "bad eval settings: " + "; ".join(problems)


def run_eval(args: argparse.Namespace) -> int:
    """`scf eval`: evaluate, print a short table, write the JSON report.

    Args:
        args: parsed arguments.

    Returns:
        0 on success (bad input raises EvalError: exit code 2).
    """
    from evals.suites import evaluate

    spec = build_spec(args)
    report = evaluate(args.model, spec, progress=not args.no_progress)
    if args.out is not None:
        report.write_json(args.out)
    print(format_report(report))
    if args.out is not None:
        print(f"report: {args.out}")
    return 0


def format_report(report) -> str:
    """A short plain-text table of an EvalReport.

    Args:
        report: the report.

    Returns:
        The table.
    """
    lines = [
        f"model  {report.model}",
        f"suite  {report.suite}  ({report.backend}, {report.device}, {report.seconds:.1f} s)",
        "",
        f"{'benchmark':<28}{'metric':<28}{'value':>8}{'stderr':>8}{'n':>7}",
    ]
    for score in report.benchmarks:
        stderr = f"{score.stderr:.3f}" if score.stderr is not None else "-"
        lines.append(f"{score.benchmark:<28}{score.metric:<28}{score.value:>8.3f}{stderr:>8}{score.n:>7}")
    lines.append("")
    rep = report.repetition
    lines.append(
        f"repetition_rate {rep.repetition_rate:.3f}   mean_seq_rep_4 {rep.mean_seq_rep_4:.3f}   "
        f"truncation_rate {rep.truncation_rate:.3f}   (n={rep.n})"
    )
    if report.safety is not None:
        safety = report.safety
        refusal = "-" if safety.refusal_rate is None else f"{safety.refusal_rate:.3f}"
        over = "-" if safety.over_refusal_rate is None else f"{safety.over_refusal_rate:.3f}"
        lines.append(
            f"refusal_rate {refusal} (n={safety.n_harmful})   over_refusal_rate {over} (n={safety.n_benign})"
            f"   judge {safety.judge}"
        )
    return "\n".join(lines)


def run_zoo_build(args: argparse.Namespace) -> int:
    """`scf zoo build`: build (or reuse) the toy zoo.

    Args:
        args: parsed arguments.

    Returns:
        0 on success.
    """
    from evals.zoo import build_zoo, default_zoo_dir

    out = args.out if args.out is not None else default_zoo_dir(args.size, seed=args.seed)
    path = build_zoo(out, size=args.size, seed=args.seed, progress=not args.no_progress, force=args.force)
    print(f"zoo: {path}")
    return 0
