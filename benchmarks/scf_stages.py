"""Where SCF-RKL's time goes: each stage of one tensor's merge, per element, against its I/O floor.

`merge_throughput.py` times whole merges; this script explains them. On one synthetic bf16 pair
(by default shaped like a Qwen2.5-1.5B MLP matrix, with the same fine-tuning-like deltas), in one
run, it measures in nanoseconds per element:

1. the I/O floor of this tensor: read both inputs from safetensors files (every byte) and write
   one output with ``save_file`` + fsync;
2. each stage of the engine's path for ``scf_rkl``, calling the project's own functions: the
   NaN/Inf checks of both inputs and the output, the importance (float64 row divergence), the
   exact quantiles (pass 1 alone, then both passes), the masked select and ``fraction_from``;
3. the torch primitives those stages are made of, on one cache-sized chunk, which bound what any
   composition of eager torch ops can reach with this arithmetic.

It prints each stage's share and what the sum implies: wall time over the floor without overlap
(compute after I/O) and with perfect overlap (the larger of the two).

Usage:
    python benchmarks/scf_stages.py                      # 8960 x 1536, the MLP shape
    python benchmarks/scf_stages.py --rows 151936        # the embedding shape (0.93 GB float32)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from scf import quantile  # noqa: E402
from scf.divergence import importance  # noqa: E402
from scf.merge import all_finite, fraction_from  # noqa: E402
from scf.methods.scf import ScfParams, _take_where_important, threshold  # noqa: E402

_CHUNK_ROWS_ELEMENTS = 1 << 18  # the primitives run on one chunk of this many elements (in cache)


def _load_merge_throughput():
    """benchmarks/merge_throughput.py, whose family recipe and I/O floor this script reuses."""
    if "merge_throughput" in sys.modules:  # already imported (by the smoke tests)
        return sys.modules["merge_throughput"]
    path = Path(__file__).with_name("merge_throughput.py")
    spec = importlib.util.spec_from_file_location("merge_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their module while being created
    spec.loader.exec_module(module)
    return module


merge_throughput = _load_merge_throughput()


def synthetic_pair(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 base and secondary of one matrix, made as `merge_throughput.build_family` makes
    every tensor of its family (N(0, 0.02) weights plus heavy-tailed fine-tuning deltas)."""
    _, base, secondary = merge_throughput._synthetic_tensors("w", (rows, width), seed, 0)
    return base, secondary


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def io_floor(base: torch.Tensor, secondary: torch.Tensor, workdir: Path) -> Callable[[], None]:
    """A callable doing one tensor's I/O: read both inputs' bytes from disk, write one, fsync.

    The per-tensor part of `merge_throughput.io_floor`, without its per-model work (opening the
    checkpoints, the output directory, index and rename), which a whole model spreads over
    hundreds of tensors but which would dominate one tensor's figure.
    """
    paths = [workdir / "base.safetensors", workdir / "secondary.safetensors"]
    for path, tensor in zip(paths, (base, secondary), strict=True):
        save_file({"w": tensor}, str(path))
    scratch = torch.empty(base.numel() * base.element_size(), dtype=torch.uint8)
    out = workdir / "out.safetensors"

    def run() -> None:
        loaded = []
        for path in paths:
            with safe_open(str(path), framework="pt") as handle:
                tensor = handle.get_tensor("w")
            scratch.copy_(tensor.reshape(-1).view(torch.uint8))  # every byte, not a lazy mapping
            loaded.append(tensor)
        save_file({"w": loaded[0]}, str(out))
        merge_throughput._fsync(out)

    return run


def stage_callables(base: torch.Tensor, secondary: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each stage of the engine's scf_rkl path on this pair, as the engine calls it."""
    params = ScfParams()
    scores = importance(base, secondary)
    tau = threshold(scores, params)
    fused = _take_where_important(scores, tau, secondary, base)
    bits = scores.view(-1).view(torch.int32)
    return {
        "NaN/Inf checks (2 inputs + output)": lambda: [all_finite(t) for t in (base, secondary, fused)],
        "importance (float64 row KL)": lambda: importance(base, secondary, out=scores),
        "quantiles: pass 1 (high 16 bits)": lambda: quantile._histogram_high(bits),
        "quantiles: both passes": lambda: threshold(scores, params),
        "select where(I >= tau)": lambda: _take_where_important(scores, tau, secondary, base),
        "fraction_from": lambda: fraction_from(fused, [base, secondary]),
    }


def primitive_callables(width: int) -> dict[str, Callable[[], object]]:
    """The torch ops the stages are built from, on one in-cache chunk of rows."""
    rows = max(1, _CHUNK_ROWS_ELEMENTS // width)
    gen = torch.Generator().manual_seed(1)
    x32 = 0.02 * torch.randn(rows, width, generator=gen)
    x64 = x32.double()
    near_one = 1.0 + 1e-3 * torch.randn(rows, width, generator=gen, dtype=torch.float64)
    keys = x32.abs().view(torch.int32).bitwise_right_shift(16)
    out32, out64 = torch.empty_like(x32), torch.empty_like(x64)
    return {
        "softmax float64 (per row)": lambda: torch.softmax(x64, dim=1),
        "log float64": lambda: torch.log(near_one, out=out64),
        "mul float64": lambda: torch.mul(x64, x64, out=out64),
        "exp float32": lambda: torch.exp(x32, out=out32),
        "bincount 65536 bins (int32 keys)": lambda: torch.bincount(keys.view(-1), minlength=1 << 16),
        "index_select int32 (65536-entry table)": lambda: torch.index_select(
            torch.zeros(1 << 16, dtype=torch.int32), 0, keys.view(-1)),
    }


def measure(rows: int, width: int, repeats: int, seed: int, progress: bool = True) -> dict:
    """Every measurement of one run, in ns per element (stages, floor) or per chunk element (primitives)."""
    base, secondary = synthetic_pair(rows, width, seed)
    n = base.numel()
    results: dict = {"rows": rows, "width": width, "elements": n, "threads": torch.get_num_threads(),
                     "stages_ns": {}, "primitives_ns": {}}
    with tempfile.TemporaryDirectory(prefix="scf-stages-") as tmp:
        floor = io_floor(base, secondary, Path(tmp))
        results["floor_ns"] = best_seconds(floor, repeats) * 1e9 / n
    stages = stage_callables(base, secondary)
    for label, fn in tqdm(stages.items(), desc="stages", unit="stage", disable=not progress):
        results["stages_ns"][label] = best_seconds(fn, repeats) * 1e9 / n
    chunk_elements = max(1, _CHUNK_ROWS_ELEMENTS // width) * width
    primitives = primitive_callables(width)
    for label, fn in tqdm(primitives.items(), desc="primitives", unit="op", disable=not progress):
        results["primitives_ns"][label] = best_seconds(fn, 20 * repeats) * 1e9 / chunk_elements
    return results


def compute_ns(stages_ns: dict[str, float]) -> float:
    """The sum of the stages (pass 1 is part of "both passes", so it is not added twice)."""
    return sum(v for k, v in stages_ns.items() if "pass 1" not in k)


def report(results: dict) -> str:
    """The printed tables."""
    floor, stages = results["floor_ns"], results["stages_ns"]
    compute = compute_ns(stages)
    lines = [f"tensor {results['rows']} x {results['width']} bf16 ({results['elements']:,} elements), "
             f"torch {torch.__version__} with {results['threads']} threads", "",
             "| stage | ns / element | share of compute |", "|---|---|---|"]
    for label, value in stages.items():
        share = "(in both passes)" if "pass 1" in label else f"{value / compute:.0%}"
        lines.append(f"| {label} | {value:.2f} | {share} |")
    lines += [f"| **compute, all stages** | **{compute:.2f}** | 100% |",
              f"| I/O floor (read 2, write 1, fsync) | {floor:.2f} | |", "",
              f"wall / floor if compute follows I/O: {(floor + compute) / floor:.1f}x; "
              f"with perfect overlap: {max(floor, compute) / floor:.1f}x; "
              f"3x allows at most {2 * floor:.2f} to {3 * floor:.2f} ns/element of compute", "",
              "| primitive (one in-cache chunk) | ns / element |", "|---|---|"]
    lines += [f"| {label} | {value:.3f} |" for label, value in results["primitives_ns"].items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Per-stage cost of scf_rkl against the I/O floor.")
    parser.add_argument("--rows", type=int, default=8960, help="rows of the tensor (first dimension)")
    parser.add_argument("--width", type=int, default=1536, help="row length")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per stage (the best counts)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic pair")
    parser.add_argument("--json", default="", help="also write the measurements to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = measure(args.rows, args.width, args.repeats, args.seed)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
