"""``scf nightly``, ``scf run`` and ``scf results``: the pipeline from the command line.

The flows run with no server (Prefect starts a temporary local one) unless ``PREFECT_API_URL``
points at a server, in which case the runs appear in its UI.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# The tasks layer (Prefect, MLflow, DuckDB) is imported inside the handlers, so that `scf --help`
# and the other subcommands do not pay for it.


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
    nightly.set_defaults(func=_nightly)

    run = subparsers.add_parser(
        "run",
        help="merge, evaluate and gate one candidate of a pipeline config",
        description="Run the merge-and-evaluate flow for one candidate (by label, e.g. scf_rkl-alpha=1.5, or "
        "id prefix); may be left out when the config has one candidate.",
    )
    run.add_argument("--config", type=Path, required=True, help="pipeline YAML")
    run.add_argument("--candidate", help="candidate label or id prefix (see `scf results`)")
    run.add_argument("--keep-candidates", action="store_true", default=None, help="keep the merged model")
    run.set_defaults(func=_run)

    results = subparsers.add_parser(
        "results",
        help="print the leaderboard from the results database",
        description="Print candidates x benchmarks (deltas vs the parents' mean), repetition, safety and the "
        "gate decision, from DuckDB.",
    )
    results.add_argument("--config", type=Path, help="pipeline YAML (its name and database)")
    results.add_argument("--db", type=Path, help="a results.duckdb file (every config in it unless --config)")
    results.set_defaults(func=_results)


def _nightly(args: argparse.Namespace) -> int:
    from flows.nightly import nightly
    from tasks.config import load_config

    load_config(args.config)  # fail fast on a bad config, before Prefect starts
    summary = nightly(
        config_path=str(args.config), keep_candidates=args.keep_candidates, concurrency=args.concurrency
    )
    print(report(summary, args.config))
    return 0


def _run(args: argparse.Namespace) -> int:
    from flows.merge_eval import merge_and_evaluate
    from tasks.config import load_config

    load_config(args.config)
    summary = merge_and_evaluate(
        config_path=str(args.config), candidate=args.candidate, keep_candidates=args.keep_candidates
    )
    print(report(summary, args.config))
    return 0


def _results(args: argparse.Namespace) -> int:
    from tasks import results_db
    from tasks.config import load_config
    from tasks.errors import PipelineError

    if args.config is None and args.db is None:
        raise PipelineError("scf results needs --config (a pipeline YAML) or --db (a results.duckdb file)")
    if args.config is not None:
        config = load_config(args.config)
        db_path, names = args.db or config.duckdb_path, [config.name]
    else:
        db_path = args.db
        names = results_db.config_names(db_path)
    for name in names:
        print(leaderboard_text(db_path, name))
    return 0


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
    table = results_db.format_leaderboard(entries, champion["candidate_id"] if champion else None)
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
    merges = sum(c["merge_cached"] for c in summary["candidates"])
    evals = sum(c["eval_cached"] for c in summary["candidates"])
    total = len(summary["candidates"])
    lines.append(f"Reused from cache: {merges}/{total} merges, {evals}/{total} candidate evaluations.")
    lines += [
        "Where to look:",
        f"  MLflow:  {tracking.ui_command(summary['mlflow_uri'])}",
        f"  DuckDB:  {summary['duckdb']}  (scf results --config {config_path})",
        f"  Plots:   {Path(summary['workdir']) / 'plots'}",
    ]
    return "\n".join(lines)
