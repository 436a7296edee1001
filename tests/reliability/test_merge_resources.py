"""Memory: the out-of-memory guard refuses a merge that cannot fit before writing anything, with the
numbers; and merge_report.json records the merge process's own peak RSS, not its parent's."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_ckpt import make_pair, run_scf
from merge_helpers import REPO, leftovers, refused

import scf.memory
from scf.memory import DEFAULT_FACTOR, WORKING_BYTES_PER_ELEMENT

LARGEST = 128 * 32  # make_pair's lm_head (first in the file) and embedding: vocab 128 x hidden 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    base, (sec,) = make_pair(tmp_path_factory.mktemp("mem"))
    return ["--base", str(base), "--secondary", str(sec)]


@pytest.mark.parametrize("method", ["scf_rkl", "linear", "ties"])
def test_the_guard_refuses_exactly_when_the_largest_tensor_cannot_fit(
    pair: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    factor = WORKING_BYTES_PER_ELEMENT[method]
    needed = int(LARGEST * factor)
    args = [*pair, "--reference", pair[1], "--method", method, "--device", "cpu"]
    monkeypatch.setattr(scf.memory, "available_bytes", lambda device: needed - 1)
    refused(
        [*args, "--out", str(tmp_path / "out")],
        f"not enough memory on cpu for tensor 'lm_head.weight' ({LARGEST:,} elements): method "
        f"{method!r} needs about",
        f"({factor:g} bytes per element, measured), and",
        "is available",
    )
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(scf.memory, "available_bytes", lambda device: needed)
    code, _, err = run_scf(["merge", *args, "--out", str(tmp_path / "fits"), "--quiet"])  # exactly enough
    assert code == 0, err


def test_a_method_without_a_measured_factor_gets_the_largest_one() -> None:
    assert max(WORKING_BYTES_PER_ELEMENT.values()) <= DEFAULT_FACTOR


def _sparse_model(directory: Path, numel: int) -> Path:
    """A safetensors file declaring one float32 tensor of ``numel`` elements, its data a hole (no disk)."""
    directory.mkdir(parents=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [numel], "data_offsets": [0, 4 * numel]}}).encode()
    path = directory / "model.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * numel)
    return directory


def test_a_tensor_larger_than_memory_is_refused_with_the_real_free_memory(tmp_path: Path) -> None:
    import psutil

    numel = 1 << 36  # 256 GiB of float32, as a sparse file: the guard must fire, with real numbers
    if numel * 7 < psutil.virtual_memory().available:
        pytest.skip("this machine has more free memory than the test's tensor needs")
    try:
        base, sec = _sparse_model(tmp_path / "base", numel), _sparse_model(tmp_path / "sec", numel)
    except OSError as exc:
        pytest.skip(f"no sparse files here ({exc})")
    if (base / "model.safetensors").stat().st_blocks * 512 > 2**30:
        pytest.skip("the filesystem does not keep files sparse")
    refused(
        [
            "--base",
            str(base),
            "--secondary",
            str(sec),
            "--method",
            "scf_rkl",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
        ],
        f"not enough memory on cpu for tensor 'w' ({numel:,} elements): method 'scf_rkl' needs about "
        "481.0 GB",
    )
    assert not (tmp_path / "out").exists()


FAT_PARENT = """
import json, resource, subprocess, sys
fat = bytearray(768 * 2**20)  # 768 MiB resident in the parent
child = subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], capture_output=True, text=True,
                       check=True)
print(child.stdout.strip().splitlines()[-1])
"""
MERGE_CHILD = """
import json, resource, sys
from pathlib import Path
from scf.merge import merge
from scf.spec import MergeSpec
spec = MergeSpec(base=sys.argv[1], secondary=[sys.argv[2]], method="linear")
report = merge(spec, Path(sys.argv[3]), progress=False)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"report": report["peak_rss_bytes"], "hwm": hwm,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_the_report_records_the_merge_processes_own_peak(pair: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", FAT_PARENT, MERGE_CHILD, pair[1], pair[3], str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["ru_maxrss"] > 768 * 2**20  # getrusage carries the parent's peak across fork + exec
    assert 50 * 2**20 < measured["report"] <= measured["hwm"] < 768 * 2**20  # the child's own VmHWM
