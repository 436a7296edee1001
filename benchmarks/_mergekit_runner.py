"""Run one mergekit merge and print its time and peak RSS; executed INSIDE mergekit's virtualenv.

merge_throughput.py calls this with the mergekit venv's python, so the timing covers
``mergekit.merge.run_merge`` alone (not interpreter start-up or imports), measured the same way as
our merges. It must not import this project's packages (scf is not installed in that venv); it
loads the standard-library-only ``scf/rss.py`` by path for the peak RSS, so both children measure alike.

Usage (inside the mergekit venv):
    python _mergekit_runner.py CONFIG.yml OUT_DIR [--device cpu|cuda] [--shard-params N] [--align SEEDS.json]

``--align`` runs mergekit aligned with scf where its result depends on an unspecified order or on
float32 rounding of whole-tensor sums, to show that every other element agrees: sorts are stable
(ties in index order, as scf keeps them), float32 sums and norms accumulate in float64 and are
rounded once (as scf's statistics), and the global RNG is reseeded before each tensor with scf's
per-tensor seed (SEEDS.json: tensor name -> seed), so DELLA's draws are scf's. This changes only
what mergekit leaves unspecified or rounds differently; its formulas stay its own.

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


# Methods whose whole-tensor sums and norms scf accumulates in float64 (mergekit: one float32 torch
# reduction). slerp is not among them: scf sums it over mergekit's own float32 chunks.
FLOAT64_STATISTICS = {"nuslerp", "multislerp", "model_stock", "della", "della_linear", "breadcrumbs",
                      "breadcrumbs_ties"}


def align_with_scf(seeds_path: str, method: str) -> None:
    """Patch mergekit (in this process only) as ``--align`` describes, for one merge method."""
    import torch
    from mergekit import sparsify
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    seeds = json.loads(Path(seeds_path).read_text())

    class StableSortTorch:
        """``torch`` as mergekit.sparsify sees it, with stable sorts."""

        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def sort(values, *args, **kwargs):
            return torch.sort(values, *args, stable=True, **kwargs)

        @staticmethod
        def argsort(values, *args, **kwargs):
            return torch.argsort(values, *args, stable=True, **kwargs)

    sparsify.torch = StableSortTorch()

    def in_float64(reduce):
        def reduced(values, *args, **kwargs):
            if isinstance(values, torch.Tensor) and values.dtype == torch.float32 and "dtype" not in kwargs:
                return reduce(values.double(), *args, **kwargs).to(torch.float32)
            return reduce(values, *args, **kwargs)
        return reduced

    if method in FLOAT64_STATISTICS:
        torch.Tensor.sum, torch.Tensor.norm = in_float64(torch.Tensor.sum), in_float64(torch.Tensor.norm)
        torch.sum, torch.norm = in_float64(torch.sum), in_float64(torch.norm)

    merge_group = GeneralizedTaskArithmeticMerge.merge_group

    def seeded_merge_group(self, group, /, **parameters):
        torch.manual_seed(seeds[group.metadata.name])
        return merge_group(self, group, **parameters)

    GeneralizedTaskArithmeticMerge.merge_group = seeded_merge_group


def main(argv: list[str] | None = None) -> int:
    """Entry point. Returns 0 when the merge succeeded, 1 otherwise (the error is in the RESULT line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shard-params", type=int, default=5_000_000_000, help="parameters per output shard")
    parser.add_argument("--align", metavar="SEEDS.json", help="align mergekit with scf (see the module doc)")
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
        if args.align:
            align_with_scf(args.align, config.merge_method)
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
