"""Run every example mergekit config (tests/data/mergekit/) through mergekit 0.1.5 and through `scf merge`.

Both read the same YAML file, unchanged, on the same tiny 4-layer Llama-shaped checkpoints (built
here), and the table says, per config, how many output tensors are bit-identical and the largest
absolute difference. It checks what the tests cannot without mergekit: that our reading of its
configs (roles, per-model / per-slice / top-level lookups, filters, layer gradients, slices) gives
its numbers.

mergekit is installed once, without its dependencies (torch, transformers, ... come from this
environment), into ``--mergekit-dir`` with pip, and runs in its own process. It is never a project
dependency.

Usage:
    python benchmarks/mergekit_configs.py [--mergekit-dir /tmp/scf-mergekit-0.1.5] [--keep DIR]

Needs the project importable (``PYTHONPATH`` at the checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "data" / "mergekit"
MERGEKIT_VERSION = "0.1.5"
# Why a config's outputs may differ, where they do (see docs/merging.md for each).
EXPECTED_DIFFERENCE = {
    "ties": "dtype: bfloat16 makes mergekit compute in bf16 (we compute in float32): the report warns",
    "dare_ties": "random drops: mergekit draws from torch's global RNG, we seed per tensor",
    "dare_linear": "random drops (as dare_ties)",
    "della": "random drops (as dare_ties)",
    "della_linear": "random drops (as dare_ties)",
    "arcee_fusion": "runs as the exact scf_kl; mergekit subsamples its quantiles (the report warns)",
    "multislerp": "whole-tensor sums in float64 here, one float32 torch call there (1 ulp)",
    "sce": "mean squares summed in float64 here (1 ulp)",
}
RUNNER = """
import sys
from pathlib import Path
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

if len(sys.argv) > 3:  # aligned: reseed torch's global RNG per tensor with our seed (see ALIGNED)
    import torch
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
    from scf.merge import tensor_seed

    unseeded = GeneralizedTaskArithmeticMerge.merge_group

    def seeded(self, group, /, **parameters):
        torch.manual_seed(tensor_seed(int(sys.argv[3]), group.metadata.name))
        return unseeded(self, group, **parameters)

    GeneralizedTaskArithmeticMerge.merge_group = seeded
config = MergeConfiguration.model_validate(yaml.safe_load(Path(sys.argv[1]).read_text()))
run_merge(config, sys.argv[2], options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True))
"""


# Random methods are compared once more with mergekit's global RNG reseeded before each tensor with
# our per-tensor seed (scf.merge.tensor_seed, seed 0 as `scf merge` uses): the same draws on both
# sides, so what still differs is the arithmetic. mergekit's formulas are untouched. DARE is not
# aligned this way: its drop draws with bernoulli_(density) (another sampler than mergekit's bernoulli
# of a filled tensor) and its rescale divides by density (mergekit restores the L1 norm).
ALIGNED = ("della", "della_linear")


def install_mergekit(target: Path) -> None:
    """``pip install --target`` mergekit and the one dependency this environment lacks (once)."""
    if (target / "mergekit").is_dir() and (target / "immutables").is_dir():
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
               f"mergekit=={MERGEKIT_VERSION}", "immutables"]
    subprocess.run(command, check=True)


def build_models(root: Path) -> None:
    """ancestor, math and code: tiny 4-layer relatives, as tests/test_mergekit_config.py builds them."""
    sys.path.insert(0, str(REPO))
    from tests.helpers_ckpt import finetune, llama_config, llama_state, save_checkpoint

    config = llama_config(n_layers=4, hidden=16, intermediate=32, vocab=64)
    ancestor = llama_state(config, seed=0)
    save_checkpoint(root / "ancestor", ancestor, config)
    save_checkpoint(root / "math", finetune(ancestor, seed=1), config)
    save_checkpoint(root / "code", finetune(ancestor, seed=2), config)


def absolute_config(source: Path, root: Path) -> Path:
    """The config with its model names as absolute paths (mergekit reads a bare name as a hub id)."""
    text = re.sub(r"(model|base_model): (ancestor|math|code)$", rf"\1: {root}/\2", source.read_text(),
                  flags=re.MULTILINE)
    path = root / source.name
    path.write_text(text)
    return path


def load(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors: dict = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(str(shard))
    return tensors


def compare(name: str, config: Path, root: Path, mergekit_dir: Path, aligned: bool = False) -> dict:
    """Run both on one config; the row of the table (``aligned``: mergekit reseeded per tensor)."""
    from flows.cli import main

    label = f"{name} (same draws)" if aligned else name
    theirs, ours = root / "mergekit" / label, root / "scf" / name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(mergekit_dir), str(REPO)]), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", RUNNER, str(config), str(theirs)] + (["0"] if aligned else [])
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        return {"config": label, "error": "mergekit: " + (run.stderr.strip().splitlines() or ["?"])[-1]}
    if not ours.is_dir() and main(["merge", "--config", str(config), "--out", str(ours), "--quiet"]) != 0:
        return {"config": label, "error": "scf merge failed"}
    a, b = load(ours), load(theirs)
    shared = [k for k in a if k in b]
    differences = [(a[k].float() - b[k].float()).abs().max().item() for k in shared]
    layers = [json.loads((d / "config.json").read_text()).get("num_hidden_layers") for d in (ours, theirs)]
    note = ("mergekit reseeded per tensor with our seeds: float32 rounding only" if aligned
            else EXPECTED_DIFFERENCE.get(name, ""))
    return {"config": label, "tensors": len(a), "same_names": set(a) == set(b),
            "bit_equal": sum(bool((a[k] == b[k]).all()) and a[k].dtype == b[k].dtype for k in shared),
            "max_abs_diff": max(differences, default=0.0), "layers": layers,
            "note": note}


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-dir", type=Path, default=Path(f"/tmp/scf-mergekit-{MERGEKIT_VERSION}"),
                        help="where mergekit is installed (pip --target), once")
    parser.add_argument("--keep", type=Path, help="keep the models and outputs here (default: a temp dir)")
    args = parser.parse_args(argv)
    install_mergekit(args.mergekit_dir)
    root = args.keep or Path(tempfile.mkdtemp(prefix="scf-mergekit-configs-"))
    root.mkdir(parents=True, exist_ok=True)
    build_models(root)
    rows = []
    for path in sorted(CONFIGS.glob("*.yml")):
        config = absolute_config(path, root)
        rows.append(compare(path.stem, config, root, args.mergekit_dir))
        if path.stem in ALIGNED:
            rows.append(compare(path.stem, config, root, args.mergekit_dir, aligned=True))
    print(f"- mergekit {MERGEKIT_VERSION} and `scf merge --config` on each tests/data/mergekit/*.yml, "
          f"4-layer float32 checkpoints (hidden 16)\n")
    print("| config | tensors | bit-identical | max abs diff | layers (ours/mergekit) | why they differ |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| `{row['config']}` | | | | | {row['error']} |")
            continue
        same = "" if row["same_names"] else " (names differ)"
        print(f"| `{row['config']}` | {row['tensors']}{same} | {row['bit_equal']}/{row['tensors']} | "
              f"{row['max_abs_diff']:.3g} | {row['layers'][0]}/{row['layers'][1]} | {row['note']} |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
