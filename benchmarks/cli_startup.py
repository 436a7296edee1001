"""CLI start-up benchmark: how long each `scf` command takes in a fresh process, and what it imports.

Each command runs ``--runs`` times as ``python -m flows.cli ...`` (what the ``scf`` console script
calls), in a fresh interpreter each time; the table gives the median and the fastest wall time.
One more run of each, through a wrapper that calls the same ``flows.cli.main`` and then lists
``sys.modules``, says which heavy modules the command imported. ``merge`` runs a real merge of a
tiny pair (built in a temporary directory), so its time includes torch and the merge itself.

Usage:
    python benchmarks/cli_startup.py [--runs 7] [--json PATH]

Needs the project importable (``PYTHONPATH`` at the checkout). Recorded runs: RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "safetensors", "transformers", "prefect", "mlflow", "duckdb", "lm_eval", "pandas")
COMMANDS: dict[str, list[str]] = {
    "scf --help": ["--help"],
    "scf methods": ["methods"],
    "scf methods --json": ["methods", "--json"],
    "scf merge --help": ["merge", "--help"],
    "scf eval --help": ["eval", "--help"],
    "scf nightly --help": ["nightly", "--help"],
    "scf merge (tiny pair)": ["merge", "--base", "{base}", "--secondary", "{secondary}", "--method", "linear",
                              "--quiet", "--overwrite", "--out", "{out}"],
}
IMPORTS_PROBE = """
import json, sys
from flows.cli import main
try:
    main(sys.argv[2:])
except SystemExit:
    pass
json.dump(sorted(m for m in json.loads(sys.argv[1]) if m in sys.modules), sys.stderr)
"""


def tiny_pair(root: Path) -> dict[str, str]:
    """Two tiny safetensors checkpoints (a few tensors, no config) for the merge command."""
    import torch
    from safetensors.torch import save_file

    paths = {}
    for index, role in enumerate(("base", "secondary")):
        generator = torch.Generator().manual_seed(index)
        tensors = {f"layer{i}.weight": torch.randn(64, 64, generator=generator) for i in range(4)}
        (root / role).mkdir()
        save_file(tensors, str(root / role / "model.safetensors"))
        paths[role] = str(root / role)
    paths["out"] = str(root / "out")
    return paths


def time_command(argv: list[str], runs: int) -> list[float]:
    """Wall seconds of ``runs`` fresh ``python -m flows.cli ARGV`` processes."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.cli", *argv], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return times


def imported_heavy_modules(argv: list[str]) -> list[str]:
    """Which of ``HEAVY`` the command leaves in ``sys.modules``."""
    result = subprocess.run([sys.executable, "-c", IMPORTS_PROBE, json.dumps(HEAVY), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    return json.loads(result.stderr.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the Markdown table (and write JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per command (default 7)")
    parser.add_argument("--json", default="", help="also write the measurements here")
    args = parser.parse_args(argv)
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        paths = tiny_pair(Path(tmp))
        for label, template in COMMANDS.items():
            command = [part.format(**paths) for part in template]
            times = time_command(command, args.runs)
            rows.append({"command": label, "median_s": statistics.median(times), "min_s": min(times),
                         "imports": imported_heavy_modules(command)})
    results = {
        "date": f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "runs": args.runs,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "rows": rows,
    }
    lines = [
        f"- command: `python benchmarks/cli_startup.py --runs {args.runs}`; date: {results['date']}; "
        f"{results['cpus']} CPU cores, Python {results['python']}",
        "- load average (1/5/15 min) before: " + "/".join(f"{x:.2f}" for x in load_before)
        + "; after: " + "/".join(f"{x:.2f}" for x in results["load_average"]["after"]),
        "",
        "| command | median s | fastest s | heavy modules imported |",
        "|---|---|---|---|",
    ]
    for row in rows:
        imported = ", ".join(row["imports"]) or "none"
        lines.append(f"| `{row['command']}` | {row['median_s']:.2f} | {row['min_s']:.2f} | {imported} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
