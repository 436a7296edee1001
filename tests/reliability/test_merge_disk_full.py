"""A full disk during a merge: one `error:` line naming the directory, no partial output, inputs untouched.

On a small tmpfs where this machine can mount one (as root); elsewhere (a CI runner without
privileges) the same faults are simulated at the writer's seam, `scf.io.open_output`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from helpers_ckpt import make_pair
from merge_helpers import leftovers, refused, start_paused_merge, tmpfs, tree_digest

import scf.io

ENOSPC = "No space left on device (the disk is full or out of inodes)"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("disk")
    base, (sec,) = make_pair(root / "models", hidden=64, intermediate=128, vocab=256)
    args = ["--base", str(base), "--secondary", str(sec), "--method", "linear"]
    return {"root": root / "models", "args": args, "before": tree_digest(root / "models")}


def no_partial_output(directory: Path, models: dict) -> None:
    assert not (directory / "merged").exists() and leftovers(directory) == []
    assert tree_digest(models["root"]) == models["before"]


def test_no_free_inode_for_the_first_output_file(
    models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "disk"
    # 3 inodes: the root, the writer's lock file and its temporary directory; the first shard gets none.
    with tmpfs(disk, "size=16m,nr_inodes=3") as mounted:
        if not mounted:

            def full(path: Path):  # noqa: ANN202 - open_output's stand-in
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

            monkeypatch.setattr(scf.io, "open_output", full)
        refused(
            [*models["args"], "--out", str(disk / "merged")],
            f"cannot write the merge output in {disk}: {ENOSPC} (writing model.safetensors)",
        )
        no_partial_output(disk, models)


def test_disk_fills_up_in_the_middle_of_a_shard(
    models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "disk"
    with tmpfs(disk, "size=16m") as mounted:
        expected = (
            f"cannot write the merge output in {disk}: {ENOSPC} (writing model.safetensors); "
            f"the partial output was removed"
        )
        if mounted:  # pause once the checks passed, fill the disk but 24 KB, let the merge go on
            marker = tmp_path / "marker"
            proc = start_paused_merge(
                [*models["args"], "--out", str(disk / "merged")], "before_first_shard", marker
            )
            stats = os.statvfs(disk)
            with (disk / "filler").open("wb") as filler:
                filler.write(b"\0" * (stats.f_bavail * stats.f_frsize - 24 * 1024))
            marker.unlink()
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 2 and err.strip().splitlines() == [f"error: {expected}"], err
            (disk / "filler").unlink()
        else:
            real_open = scf.io.open_output

            def fills_up(path: Path):  # noqa: ANN202 - open_output's stand-in
                return _FillsUp(real_open(path), room=24 * 1024)

            monkeypatch.setattr(scf.io, "open_output", fills_up)
            refused([*models["args"], "--out", str(disk / "merged")], expected)
        no_partial_output(disk, models)


class _FillsUp:
    """A file that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, handle, room: int) -> None:  # noqa: ANN001 - any binary file
        self._handle, self._room = handle, room

    def write(self, data) -> int:  # noqa: ANN001 - bytes or memoryview
        size = memoryview(data).nbytes
        if size > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= size
        return self._handle.write(data)

    def __getattr__(self, name: str):  # noqa: ANN204 - flush, fileno, close of the real file
        return getattr(self._handle, name)

    def __enter__(self) -> _FillsUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()
