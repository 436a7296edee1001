"""SIGKILL `scf merge` at each named point (scf/faults.py), and two writers sharing a destination.

After every kill the destination is absent or complete (never partial), the next run removes the
leftovers, and its output is bit-identical to an uninterrupted merge's. Leftovers are judged by the
writer's lock, never by its process id.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

import pytest
from helpers_ckpt import make_pair
from merge_helpers import kill, leftovers, refused, start_paused_merge, tree_digest

from scf.merge import merge
from scf.outdir import AtomicDir, recover_stale
from scf.spec import MergeSpec


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A base/secondary pair, the merge's arguments (several output shards) and an uninterrupted output."""
    root = tmp_path_factory.mktemp("kill")
    base, (sec,) = make_pair(root / "in", n_layers=2, hidden=64, intermediate=128, vocab=256)
    spec = MergeSpec(base=str(base), secondary=[str(sec)], method="linear", shard_size="40KB")
    reference = merge(spec, root / "reference", progress=False)
    assert len(list((root / "reference").glob("model-*.safetensors"))) >= 3
    args = ["--base", str(base), "--secondary", str(sec), "--method", "linear", "--shard-size", "40KB"]
    return {
        "spec": spec,
        "args": args,
        "reference": tree_digest(root / "reference"),
        "report": reference,
        "inputs": (tree_digest(base), tree_digest(sec)),
        "base": base,
        "sec": sec,
    }


def weights(digest: dict[str, str]) -> dict[str, str]:
    """The weight files and index of a digest (the report holds timings, which differ run to run)."""
    return {k: v for k, v in digest.items() if k.endswith((".safetensors", ".json")) and "report" not in k}


@pytest.mark.parametrize("point", ["before_first_shard", "between_shards", "final_rename"])
def test_sigkill_leaves_nothing_partial_and_the_rerun_is_bit_identical(
    inputs: dict, tmp_path: Path, point: str
) -> None:
    out = tmp_path / "merged"
    proc = start_paused_merge([*inputs["args"], "--out", str(out)], point, tmp_path / "marker")
    if point == "between_shards":  # one shard complete in the temporary directory, more to come
        (tmp,) = tmp_path.glob(".merged.scf-tmp-*")
        assert len(list(tmp.glob("model-*.safetensors"))) == 1
    kill(proc)
    assert not out.exists()  # absent, never partial
    assert any(".scf-tmp-" in name for name in leftovers(tmp_path))  # the dead writer's directory
    merge(inputs["spec"], out, progress=False)
    assert leftovers(tmp_path) == []  # cleaned by the rerun
    assert weights(tree_digest(out)) == weights(inputs["reference"])
    assert (tree_digest(inputs["base"]), tree_digest(inputs["sec"])) == inputs["inputs"]


def test_sigkill_during_an_overwrite_puts_the_previous_output_back(inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    other = inputs["spec"].model_copy(update={"params": {"weight": [0.9, 0.1]}})
    merge(other, out, progress=False)
    previous = tree_digest(out)
    proc = start_paused_merge(
        [*inputs["args"], "--out", str(out), "--overwrite"], "final_rename", tmp_path / "marker"
    )
    assert not out.exists()  # moved aside, the new one not yet in place
    kill(proc)
    # A rerun without --overwrite gets the previous output back and says so at once (it used to merge
    # fully and then claim the output "appeared during the merge").
    started = time.monotonic()
    refused([*inputs["args"], "--out", str(out)], f"output directory {out} already exists", "--overwrite")
    assert time.monotonic() - started < 30
    assert tree_digest(out) == previous and leftovers(tmp_path) == []
    merge(inputs["spec"], out, overwrite=True, progress=False)
    assert weights(tree_digest(out)) == weights(inputs["reference"])


def test_a_second_writer_never_deletes_a_live_writers_temp_dir(inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    first = start_paused_merge(
        [*inputs["args"], "--out", str(out)], "before_first_shard", tmp_path / "marker"
    )
    try:
        (live,) = [tmp_path / n for n in leftovers(tmp_path) if ".scf-tmp-" in n]
        merge(inputs["spec"], out, progress=False)  # same destination, while the first is alive
        assert live.is_dir(), "the second writer deleted a live writer's temporary directory"
        assert weights(tree_digest(out)) == weights(inputs["reference"])
    finally:
        kill(first)
    recover_stale(out.absolute())  # the first is dead now: its lock is free, its directory goes
    assert leftovers(tmp_path) == []


def test_leftovers_are_judged_by_the_lock_not_the_pid(tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "merge_report.json").write_text("{}")
    # Another host's writer, alive (this test holds its lock), whose pid means nothing here.
    live_id = "otherhost-999999999-abcd1234"
    (tmp_path / f".merged.scf-tmp-{live_id}").mkdir()
    lock = os.open(tmp_path / f".merged.scf-lock-{live_id}", os.O_CREAT | os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    # A dead writer (lock file free) whose pid is alive: this very process.
    dead_id = f"otherhost-{os.getpid()}-00000000"
    (tmp_path / f".merged.scf-tmp-{dead_id}").mkdir()
    (tmp_path / f".merged.scf-lock-{dead_id}").touch()
    # A temporary directory with no lock file at all: stale by construction.
    (tmp_path / ".merged.scf-tmp-gone-1-ffffffff").mkdir()
    try:
        with AtomicDir(dest, overwrite=True) as tmp:
            (tmp / "merge_report.json").write_text("{}")
        assert leftovers(tmp_path) == [f".merged.scf-lock-{live_id}", f".merged.scf-tmp-{live_id}"]
    finally:
        os.close(lock)
    recover_stale(dest)
    assert leftovers(tmp_path) == []


def test_temp_names_are_unique_across_hosts_and_runs(tmp_path: Path) -> None:
    names = {AtomicDir(tmp_path / "out").tmp.name for _ in range(50)}
    assert len(names) == 50
    host, pid, token = next(iter(names)).removeprefix(".out.scf-tmp-").rsplit("-", 2)
    assert host and pid == str(os.getpid()) and len(token) == 8


def test_killed_overwrite_is_recovered_by_a_plain_rerun_in_the_library(inputs: dict, tmp_path: Path) -> None:
    """The same recovery without the CLI: plan_merge restores the output before it looks at it."""
    out = tmp_path / "merged"
    merge(inputs["spec"], out, progress=False)
    previous = tree_digest(out)
    aside = tmp_path / ".merged.scf-old-deadhost-1-00000000"
    shutil.move(out, aside)  # what a writer killed between its two renames leaves
    (tmp_path / ".merged.scf-lock-deadhost-1-00000000").touch()
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        merge(inputs["spec"], out, progress=False)
    assert tree_digest(out) == previous and leftovers(tmp_path) == []
