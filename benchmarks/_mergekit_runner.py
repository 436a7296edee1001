"""Run one mergekit merge and print its time and peak RSS; executed INSIDE mergekit's virtualenv.

merge_throughput.py calls this with the mergekit venv's python, so the timing covers
``mergekit.merge.run_merge`` alone (not interpreter start-up or imports), measured the same way as
our merges. It must not import this project's packages (scf is not installed in that venv); it
loads the standard-library-only ``scf/rss.py`` by path for the peak RSS, so both children measure alike.

Usage (inside the mergekit venv):
    python _mergekit_runner.py CONFIG.yml OUT_DIR [--device cpu|cuda] [--shard-params N]

Last stdout line: ``RESULT {"wall_s": ..., "peak_rss_bytes": ..., "error": null, "extra": {}}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

RESULT_PREFIX = "RESULT "


def peak_rss_bytes() -> int:
    """This process's peak RSS since it started (exec), in bytes: ``scf/rss.py``'s helper, loaded by
    path because this virtualenv has no scf installed (that file uses the standard library only)."""
    path = Path(__file__).resolve().parents[1] / "scf" / "rss.py"
    spec = importlib.util.spec_from_file_location("scf_rss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peak_rss_bytes()


def main(argv: list[str] | None = None) -> int:
    """Entry point. Returns 0 when the merge succeeded, 1 otherwise (the error is in the RESULT line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shard-params", type=int, default=5_000_000_000, help="parameters per output shard")
    args = parser.parse_args(argv)
    result = {"wall_s": float("nan"), "peak_rss_bytes": 0, "error": None, "extra": {}}
    try:
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        with open(args.config, encoding="utf-8") as fh:
            source = fh.read()
        config = MergeConfiguration.model_validate(yaml.safe_load(source))
        # Same conditions as our engine: no tokenizer to copy, no model card, safetensors output.
        options = MergeOptions(
            device=args.device,
            cuda=args.device == "cuda",
            copy_tokenizer=False,
            write_model_card=False,
            lazy_unpickle=False,
            out_shard_size=args.shard_params,
        )
        start = time.perf_counter()
        run_merge(config, args.out, options=options, config_source=source)
        result["wall_s"] = time.perf_counter() - start
        result["peak_rss_bytes"] = peak_rss_bytes()
    except Exception as exc:  # reported by the benchmark, which goes on
        result["error"] = f"{type(exc).__name__}: {exc}"
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
