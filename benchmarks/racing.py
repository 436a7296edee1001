"""Racing benchmark: the demo sweep with and without ``eval.racing``, on the toy zoo.

Runs ``configs/demo.yaml`` twice in fresh work directories (nothing cached but the zoo): once as it
is, once with ``eval.racing: {stages: [0.25, 0.5, 1.0]}``. Prints each run's decisions, the tokens its
evaluations generated (every model's samples, parents included, counted once per item), and its wall
time, then the ratios. The promoted candidate must be the same in both runs; the target is at least
40% fewer generated tokens with racing.

Usage:
    python benchmarks/racing.py [--config configs/demo.yaml] [--stages 0.25,0.5,1.0] [--json PATH]

Recorded runs: RESULTS.md ("Racing").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKENS_QUERY = """
SELECT c.kind, sum(n_tokens) FROM (
    SELECT DISTINCT model_id, benchmark, item_id, n_tokens FROM samples WHERE config_name = $config
) s JOIN candidates c ON c.config_name = $config AND c.id = s.model_id GROUP BY c.kind
"""


def run(config: dict, workdir: Path) -> dict:
    """One night of ``config`` with every store under ``workdir``; its decisions, tokens and time."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.nightly import nightly
    from tasks import results_db

    config = {**config, "storage": {"workdir": str(workdir)}}
    path = workdir / "config.yaml"
    workdir.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with prefect_test_harness(server_startup_timeout=180):
        started = time.perf_counter()
        summary = nightly(config_path=str(path))
        seconds = time.perf_counter() - started
    tokens = dict(results_db.with_retry(
        workdir / "results.duckdb",
        lambda con: con.execute(TOKENS_QUERY, {"config": config["name"]}).fetchall(),
        read_only=True,
    ))
    labels = {c["id"]: c["label"] for c in summary["candidates"]}
    return {
        "seconds": seconds,
        "tokens": {"parents": int(tokens.get("parent", 0)), "candidates": int(tokens.get("merge", 0))},
        "promoted": labels.get(summary["promoted"]),
        "decisions": {c["label"]: (c["decision"], c["reasons"][0]) for c in summary["candidates"]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--stages", default="0.25,0.5,1.0")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
        os.environ.setdefault(key, value)
    base = yaml.safe_load(args.config.read_text())
    stages = [float(share) for share in args.stages.split(",")]
    racing = {**base, "eval": {**base["eval"], "racing": {"stages": stages}}}
    root = Path(tempfile.mkdtemp(prefix="scf-racing-"))
    results = {"plain": run(base, root / "plain"), "racing": run(racing, root / "racing")}
    for name, result in results.items():
        print(f"\n== {name}: {result['seconds']:.0f} s, promoted {result['promoted']}, tokens generated: "
              f"{result['tokens']['candidates']} by candidates + {result['tokens']['parents']} by parents")
        for label, (decision, reason) in result["decisions"].items():
            print(f"  {decision:>8}  {label}: {reason[:110]}")
    plain, raced = results["plain"], results["racing"]
    saved = 1 - raced["tokens"]["candidates"] / plain["tokens"]["candidates"]
    total = 1 - sum(raced["tokens"].values()) / sum(plain["tokens"].values())
    print(f"\nsame promoted candidate: {plain['promoted'] == raced['promoted']} ({raced['promoted']})")
    print(f"generated tokens: {total:.1%} fewer with racing (the candidates' alone: {saved:.1%} fewer); "
          f"wall time racing / plain: {raced['seconds'] / plain['seconds']:.2f}")
    print(f"target (>= 40% fewer generated tokens, parents included): {'met' if total >= 0.4 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if plain["promoted"] == raced["promoted"] else 1


if __name__ == "__main__":
    sys.exit(main())
