"""Peak memory of a merge is a small multiple of the largest tensor, not of the model (measured by RSS)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_ckpt import save_checkpoint

LARGEST = (2048, 1024)  # float32: 8 MiB, like an embedding
LAYER = (256, 1024)  # float32: 1 MiB
N_LAYER_TENSORS = 152  # model = 8 + 152 MiB = 20x the largest tensor

# Runs in a fresh process: a warm-up merge loads every lazy import and code path, then the
# kernel's RSS high-water mark is reset (/proc/self/clear_refs, Linux >= 4.0) so VmHWM after the
# real merge minus VmRSS before it is exactly the merge's peak growth.
PROBE = """
import json, sys
from pathlib import Path
from scf.merge import merge
from scf.spec import MergeSpec

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

base, sec, warm, small_base, small_sec, out = sys.argv[1:]
merge(MergeSpec(base=small_base, secondary=[small_sec], method="linear"), Path(warm), progress=False)
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
merge(MergeSpec(base=base, secondary=[sec], method="linear", shard_size="50MB"), Path(out), progress=False)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def random_state(seed: int, n_layer_tensors: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(LARGEST, generator=gen)}
    for i in range(n_layer_tensors):
        state[f"model.layers.{i}.mlp.weight"] = torch.randn(LAYER, generator=gen)
    return state


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc RSS accounting")
def test_peak_rss_growth_under_4x_largest_tensor(tmp_path: Path) -> None:
    inputs = [save_checkpoint(tmp_path / name, random_state(seed, N_LAYER_TENSORS), tokenizer=False)
              for seed, name in ((0, "base"), (1, "sec"))]
    small = [save_checkpoint(tmp_path / f"small{seed}", random_state(seed, 2), tokenizer=False)
             for seed in (0, 1)]
    largest = 4 * LARGEST[0] * LARGEST[1]
    model_bytes = sum(f.stat().st_size for f in inputs[0].glob("*.safetensors"))
    assert model_bytes >= 20 * largest
    args = [str(p) for p in (*inputs, tmp_path / "warm", *small, tmp_path / "out")]
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert growth < 4 * largest, f"peak RSS grew by {growth / 2**20:.1f} MiB, largest tensor is 8 MiB"
