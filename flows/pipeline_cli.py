"""``scf nightly``, ``scf run`` and ``scf results``: the pipeline from the command line.

The flows run with no server (Prefect starts a temporary local one) unless ``PREFECT_API_URL``
points at a server, in which case the runs appear in its UI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tasks.errors import NightFailed, PipelineError  # light: no Prefect, MLflow or DuckDB

# The rest of the tasks layer (Prefect, MLflow, DuckDB) is imported inside the handlers, so that
# `scf --help` and the other subcommands do not pay for it.


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``nightly``, ``run`` and ``results`` to the ``scf`` command.

    Args:
        subparsers: the ``add_subparsers()`` object of the ``scf`` parser.
    """
    nightly = subparsers.add_parser(
        "nightly",
        help="merge, evaluate, gate and promote every candidate of a pipeline config",
        description="Run the nightly flow: evaluate the parents, merge and evaluate every candidate, log to "
        "MLflow, store in DuckDB, gate, promote; then print the leaderboard. Finished merges and "
        "evaluations are reused (cached by content).",
    )
    nightly.add_argument("--config", type=Path, required=True, help="pipeline YAML, e.g. configs/demo.yaml")
    nightly.add_argument(
        "--keep-candidates",
        action="store_true",
        default=None,
        help="keep merged models that lost the gate (default: the config's keep_candidates)",
    )
    nightly.add_argument("--concurrency", type=int, help="evaluations at once (default: the config's)")
    nightly.add_argument(
        "--mode",
        choices=("local", "pool"),
        help="run candidates on this machine or on the config's work pool (default: execution.mode)",
    )
    nightly.add_argument(
        "--racing",
        choices=("on", "off"),
        help="evaluate in stages and stop candidates proven to fail (default: the config's eval.racing)",
    )
    nightly.set_defaults(func=_nightly)

    run = subparsers.add_parser(
        "run",
        help="merge, evaluate and gate one candidate: a config's, or one described by flags",
        description="Run the merge-and-evaluate flow for one candidate: a config's (--candidate: label, e.g. "
        "scf_rkl-alpha=1.5, or id prefix; may be left out when the config has one), or the one the flags "
        "describe (--method, --param, sources, evaluation, gate), on top of --config when given. The same "
        "request as the Prefect run form, validated the same way.",
    )
    run.add_argument("--config", type=Path, help="pipeline YAML (the base the other flags override)")
    run.add_argument("--candidate", help="candidate label or id prefix (see `scf results`)")
    run.add_argument("--keep-candidates", action="store_true", default=None, help="keep the merged model")
    form = run.add_argument_group("a candidate no config names (the Prefect run form's fields)")
    form.add_argument("--base", help="base model: hub id[@revision], local path or zoo:<model>")
    form.add_argument("--secondary", action="append", help="a secondary model (repeat for several)")
    form.add_argument("--reference", help="the common ancestor (task-vector methods need it)")
    form.add_argument("--method", help="merge method (see `scf methods`)")
    form.add_argument("--param", action="append", metavar="KEY=VALUE", default=[],
                      help="a method parameter, the value in YAML (alpha=1.2, weight=[0.5,0.5])")
    form.add_argument("--suite", help="evaluation suite")
    form.add_argument("--limit", type=int, help="at most this many items per benchmark")
    form.add_argument("--max-new-tokens", type=int, help="the most tokens generated per prompt")
    form.add_argument("--gate-config", help="use this config's gate (a path, or a name in configs/)")
    form.add_argument("--name", help="config name: the MLflow experiment and DuckDB rows (default on-demand)")
    run.set_defaults(func=_run)

    results = subparsers.add_parser(
        "results",
        help="print the leaderboard from the results database",
        description="Print candidates x benchmarks (deltas vs the parents' mean), repetition, safety and the "
        "gate decision, from DuckDB.",
    )
    results.add_argument("--config", type=Path, help="pipeline YAML (its name and database)")
    results.add_argument("--db", type=Path, help="a results.duckdb file (every config in it unless --config)")
    results.add_argument(
        "--history",
        action="store_true",
        help="one line per night: candidates, what was promoted, the champion after",
    )
    results.set_defaults(func=_results)

    champion = subparsers.add_parser(
        "champion",
        help="the current champion with its evidence; `champion rollback` restores an earlier one",
        description="Print a config's current champion: since when, which run promoted it and why, its "
        "scores. `scf champion rollback` makes an earlier champion the champion again (MLflow alias and "
        "DuckDB), recording the rollback with its reason.",
    )
    champion.add_argument("--config", type=Path, help="pipeline YAML (required)")
    champion.set_defaults(func=_champion)
    actions = champion.add_subparsers(dest="champion_action", metavar="ACTION")
    rollback = actions.add_parser("rollback", help="restore an earlier champion")
    # SUPPRESS: `scf champion --config C rollback` keeps C (a default would overwrite it)
    rollback.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="pipeline YAML")
    rollback.add_argument("--to", help="candidate id (prefix) to restore (default: the previous champion)")
    rollback.add_argument("--reason", required=True, help="why: stored with the rollback event")
    rollback.set_defaults(func=_rollback)

    report = subparsers.add_parser(
        "report",
        help="test the SCF-RKL paper's claims on stored results: REPORT.md + figures",
        description="Read the DuckDB results and merge reports of one or more pipeline configs (e.g. "
        "configs/paper-toy/) and write a Markdown report with the paper's tables, figures and a verdict "
        "on each of its eight claims. Configs without results yet are listed as not run.",
    )
    report.add_argument("--config", type=Path, action="append", required=True,
                        help="pipeline YAML or a directory of them (repeatable), e.g. configs/paper-toy")
    report.add_argument("--out", type=Path, default=Path(REPORT_DIR),
                        help=f"directory for REPORT.md and the PNGs (default {REPORT_DIR})")
    report.set_defaults(func=_report)


def _nightly(args: argparse.Namespace) -> int:
    from tasks.config import request_config

    racing = None if args.racing is None else args.racing == "on"
    overrides = {"keep_candidates": args.keep_candidates, "concurrency": args.concurrency, "mode": args.mode,
                 "racing": racing}
    config = request_config(args.config, **overrides)  # fail fast on a bad config, before Prefect starts
    from flows.nightly import nightly  # Prefect and MLflow: only once the config is known to be good

    return _run_flow(config, args.config, lambda: nightly(config_path=str(args.config), **overrides))


def _run(args: argparse.Namespace) -> int:
    from tasks.config import request_config

    request = run_request(args)
    config = request_config(args.config, keep_candidates=args.keep_candidates, **request)  # fail fast
    from flows.merge_eval import merge_and_evaluate

    config_path = str(args.config) if args.config else None
    return _run_flow(
        config,
        args.config or Path("(run parameters)"),
        lambda: merge_and_evaluate(
            config_path=config_path, candidate=args.candidate, keep_candidates=args.keep_candidates, **request
        ),
    )


def run_request(args: argparse.Namespace) -> dict[str, Any]:
    """``scf run``'s flags as the merge-and-evaluate flow's typed parameters (unset ones left out)."""
    from scf.yamlsafe import load_yaml

    if args.config is None and args.method is None:
        raise PipelineError("scf run needs --config (a pipeline YAML) or --method (and the other flags)")
    request: dict[str, Any] = {"method": args.method, "gate_config": args.gate_config, "name": args.name}
    if args.param:
        request["params"] = {}
        for item in args.param:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise PipelineError(f"--param {item!r}: write KEY=VALUE (alpha=1.2)")
            request["params"][key] = load_yaml(value, f"--param {key}") if value else None
    if args.base or args.secondary or args.reference:
        request["sources"] = {"base": args.base, "secondary": args.secondary or [],
                              "reference": args.reference}
    evaluation = {"suite": args.suite, "limit": args.limit, "max_new_tokens": args.max_new_tokens}
    if any(value is not None for value in evaluation.values()):
        request["evaluation"] = {key: value for key, value in evaluation.items() if value is not None}
    return {key: value for key, value in request.items() if value is not None}


def _run_flow(config, config_path: Path, run) -> int:
    """Run a flow and print its report. Exit 0 when the run reached a verdict (even with failed
    candidates, which are listed); 1 when a parent failed or no candidate could be judged."""
    try:
        summary = run()
    except NightFailed as err:
        if config.duckdb_path.exists():
            print(leaderboard_text(config.duckdb_path, config.name))
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report(summary, config_path))
    return 0


REPORT_DIR = "docs/paper-toy"


def _report(args: argparse.Namespace) -> int:
    from tasks.report import build_report

    command = "scf report " + " ".join(f"--config {path}" for path in args.config)
    if args.out != Path(REPORT_DIR):
        command += f" --out {args.out}"
    path, claims = build_report(args.config, args.out, command)
    for verdict in claims:
        print(f"claim {verdict.claim}: {verdict.verdict:<12} {verdict.title}")
    print(f"wrote {path}")
    return 0


def _results(args: argparse.Namespace) -> int:
    from tasks import results_db
    from tasks.config import load_config

    if args.config is None and args.db is None:
        raise PipelineError("scf results needs --config (a pipeline YAML) or --db (a results.duckdb file)")
    if args.config is not None:
        config = load_config(args.config)
        db_path, names = args.db or config.duckdb_path, [config.name]
    else:
        db_path = args.db
        names = results_db.config_names(db_path)
    for name in names:
        print(history_text(db_path, name) if args.history else leaderboard_text(db_path, name))
    return 0


def history_text(db_path: Path, config_name: str) -> str:
    """One line per night of a config: date, run, candidates, what was promoted, the champion after."""
    from tasks import results_db

    nights = results_db.nights(db_path, config_name)
    lines = [f"History: {config_name} ({len(nights)} nights)"]
    for night in nights:
        promoted = (f"promoted {night['promoted_label']} ({night['promoted']})" if night["promoted"]
                    else "nothing promoted")
        lines.append(f"{night['decided_at']:%Y-%m-%d %H:%M}  run {night['run_id']}  "
                     f"{night['n_candidates']} candidates  {promoted}  "
                     f"champion after: {night['champion_after'] or 'none'}")
    return "\n".join(lines) + "\n"


def _champion(args: argparse.Namespace) -> int:
    from tasks.config import load_config

    config = load_config(_config_arg(args))
    print(champion_text(config.duckdb_path, config.name))
    return 0


def champion_text(db_path: Path, config_name: str) -> str:
    """The current champion with its evidence: since when, which run, why, its scores."""
    from tasks import results_db

    current = results_db.champion(db_path, config_name)
    if current is None:
        return f"{config_name}: no champion yet"
    cid = current["candidate_id"]
    entry = next((e for e in results_db.leaderboard(db_path, config_name) if e["id"] == cid), None)
    label = entry["label"] if entry else cid
    promoted_by = f"run {current['run_id']}" if current["run_id"] else "a rollback"
    lines = [
        f"Champion of {config_name}: {label} ({cid})",
        f"  since {current['since']:%Y-%m-%d %H:%M:%S} UTC, by {promoted_by}",
        f"  why: {current['reason']}",
        f"  weights: {current['path']}",
    ]
    if entry:
        lines.append("  scores: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(entry["scores"].items())))
    return "\n".join(lines)


def _rollback(args: argparse.Namespace) -> int:
    from tasks import results_db, tracking
    from tasks.config import load_config

    config = load_config(_config_arg(args))
    reigns = results_db.champion_history(config.duckdb_path, config.name)
    current = reigns[-1] if reigns and reigns[-1]["until"] is None else None
    if current is None:
        raise PipelineError(f"config {config.name!r} has no champion to roll back")
    target = _rollback_target(reigns, current, args.to)
    path = Path(target["path"] or "")
    if not (path / "config.json").is_file():
        raise PipelineError(f"cannot roll back to {target['candidate_id']}: its weights are gone ({path})")
    version = tracking.move_champion_alias(config.mlflow_uri, config.name, target["candidate_id"])
    try:
        results_db.record_rollback(config.duckdb_path, config.name, target["candidate_id"], args.reason)
    except BaseException:  # keep MLflow and DuckDB in agreement
        tracking.move_champion_alias(config.mlflow_uri, config.name, current["candidate_id"])
        raise
    print(f"rolled back {config.name}: champion {current['candidate_id']} -> {target['candidate_id']} "
          f"(MLflow {tracking.registered_model_name(config.name)} version {version}, alias "
          f"'{tracking.CHAMPION_ALIAS}'); reason: {args.reason}")
    return 0


def _config_arg(args: argparse.Namespace) -> Path:
    if args.config is None:
        raise PipelineError(f"scf {args.command} needs --config (a pipeline YAML)")
    return args.config


def _rollback_target(reigns: list[dict], current: dict, wanted: str | None) -> dict:
    """The reign to restore: the one named by ``--to`` (id or prefix), else the one before the current."""
    former = [r for r in reigns if r["candidate_id"] != current["candidate_id"]]
    if wanted is None:
        if not former:
            raise PipelineError("there is no earlier champion to roll back to")
        return former[-1]
    matches = {r["candidate_id"]: r for r in former if r["candidate_id"].startswith(wanted)}
    if len(matches) != 1:
        listing = ", ".join(dict.fromkeys(r["candidate_id"] for r in former)) or "none"
        raise PipelineError(f"--to {wanted!r} matches {len(matches)} former champions; former champions: "
                            f"{listing}")
    return next(iter(matches.values()))


def leaderboard_text(db_path: Path, config_name: str, run_id: str | None = None) -> str:
    """The leaderboard of one config, titled, with the champion marked.

    Args:
        db_path: the results database.
        config_name: the config's name.
        run_id: show only the models a given flow run wrote (None: every model of the config).

    Returns:
        The text to print.
    """
    from tasks import results_db

    entries = results_db.leaderboard(db_path, config_name, run_id)
    champion = results_db.champion(db_path, config_name)
    table = format_leaderboard(entries, champion["candidate_id"] if champion else None)
    title = f"Leaderboard: {config_name} (scores; merged candidates show the delta vs the parents' mean)"
    footer = f"champion (*): {champion['candidate_id']}" if champion else "champion: none yet"
    return f"{title}\n{table}\n{footer}\n"


def report(summary: dict[str, Any], config_path: Path) -> str:
    """What a flow run ends with: leaderboard, promotion decision, what was reused, where to look.

    Args:
        summary: the flow's return value.
        config_path: the config the run used.

    Returns:
        The text to print.
    """
    from tasks import tracking

    lines = [leaderboard_text(Path(summary["duckdb"]), summary["config"], summary["flow_run_id"])]
    labels = {c["id"]: c["label"] for c in summary["candidates"]}
    if summary["promoted"]:
        lines.append(
            f"Decision: promoted {labels[summary['promoted']]} ({summary['promoted']}) as the champion "
            f"(MLflow model {tracking.registered_model_name(summary['config'])}, alias "
            f"'{tracking.CHAMPION_ALIAS}')."
        )
    else:
        lines.append(f"Decision: nothing promoted; champion stays {summary['champion'] or 'none'}.")
    for cand in summary["candidates"]:
        lines.append(f"  {cand['decision']:>8}  {cand['label']} ({cand['id']})")
        lines += [f"              - {reason}" for reason in cand["reasons"]]
    failed = [cand for cand in summary["candidates"] if cand["status"] == "failed"]
    if failed:
        total = len(summary["candidates"])
        lines.append(f"Failed: {len(failed)} of {total} candidates (the others were judged):")
        lines += [f"  {cand['label']} ({cand['id']}): {cand['failure']}" for cand in failed]
    merges = sum(c["merge_cached"] for c in summary["candidates"])
    evals = sum(c["eval_cached"] for c in summary["candidates"])
    total = len(summary["candidates"])
    lines.append(f"Reused from cache: {merges}/{total} merges, {evals}/{total} candidate evaluations.")
    lines += [
        "Where to look:",
        f"  MLflow:  {tracking.ui_command(summary['mlflow_uri'])}, then the runs view "
        f"#/experiments/{summary['mlflow_experiment_id']}/runs?{tracking.RUNS_VIEW_QUERY}",
        f"  DuckDB:  {summary['duckdb']}  (scf results --config {config_path})",
        f"  Plots:   {Path(summary['workdir']) / 'plots'}",
    ]
    return "\n".join(lines)


def format_leaderboard(entries: list[dict], champion_id: str | None = None) -> str:
    """The leaderboard as a fixed-width text table (candidates x benchmarks).

    Args:
        entries: from ``leaderboard``.
        champion_id: marks the current champion with ``*``.

    Returns:
        The table; merged candidates show each score with its delta vs the parents' mean.
    """
    keys = sorted({key for entry in entries for key in entry["scores"]})
    header = ["model", "id", *keys, "repetition", "refusal", "over_refusal", "decision"]
    lines = [header]
    for entry in entries:
        cells = [entry["label"] + (" *" if entry["id"] == champion_id else ""), entry["id"][:12]]
        for key in keys:
            value = entry["scores"].get(key)
            delta = entry["deltas"].get(key)
            if value is None:
                cells.append("-")
            elif entry["kind"] == "merge" and delta is not None:
                cells.append(f"{value:.3f} ({delta:+.3f})")
            else:
                cells.append(f"{value:.3f}")
        cells += [_fmt(entry[key]) for key in ("repetition_rate", "refusal_rate", "over_refusal_rate")]
        decision = entry["decision"] or ("parent" if entry["kind"] == "parent" else "-")
        cells.append("FAILED" if entry["status"] == "failed" else decision)
        lines.append(cells)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
