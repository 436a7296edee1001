"""`--out` never destroys anything: each unsafe output is one `error:` line, exit 2, nothing touched.

The refusals live in the library (`plan_merge`), so the pipeline's merges are covered too.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from helpers_ckpt import make_pair
from merge_helpers import leftovers, refused, tmpfs, tree_digest

import scf.outdir
from scf.errors import ScfError
from scf.merge import merge
from scf.outdir import check_not_an_input
from scf.spec import MergeSpec


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outdir")
    base, (sec, ref) = make_pair(root / "models", n_secondaries=2)
    return {"root": root / "models", "base": base, "sec": sec, "ref": ref}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory, holding a file that must survive every refusal."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    return work


def args(models: dict[str, Path], out: str, *extra: str) -> list[str]:
    return [
        "--base",
        str(models["base"]),
        "--secondary",
        str(models["sec"]),
        "--reference",
        str(models["ref"]),
        "--method",
        "linear",
        "--out",
        out,
        *extra,
    ]


def untouched(models: dict[str, Path], before: dict[str, str]) -> None:
    assert tree_digest(models["root"]) == before
    assert leftovers(models["root"]) == []


def test_empty_out_is_refused_and_the_working_directory_kept(models: dict[str, Path], workdir: Path) -> None:
    before = tree_digest(models["root"])
    refused(args(models, "", "--overwrite"), "--out is empty (an unset variable?)")
    assert sorted(p.name for p in workdir.iterdir()) == ["keep.txt"]
    untouched(models, before)


@pytest.mark.parametrize("out", [".", "./", "..", "../..", "WORKDIR"])
def test_working_directory_and_its_parents_are_refused(
    models: dict[str, Path], workdir: Path, out: str
) -> None:
    out = str(workdir) if out == "WORKDIR" else out
    refused(args(models, out, "--overwrite"), "is the working directory or a parent of it")
    assert sorted(p.name for p in workdir.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    ("target", "label", "reason"),
    [
        ("base", "base", "is or contains the base input"),
        ("sec", "secondary[0]", "is or contains the secondary[0] input"),
        ("ref", "reference", "is or contains the reference input"),
        ("root", "base", "is or contains the base input"),  # the parent of every input
        ("base/merged", "base", "lies inside the base model directory"),
    ],
)
def test_an_input_or_its_parent_or_a_directory_inside_it_is_refused(
    models: dict[str, Path], workdir: Path, target: str, label: str, reason: str
) -> None:
    before = tree_digest(models["root"])
    head, _, tail = target.partition("/")
    out = models[head] / tail if tail else models[head]
    refused(args(models, str(out), "--overwrite"), reason)
    untouched(models, before)


def test_an_input_reached_through_a_symlink_is_refused(
    models: dict[str, Path], tmp_path: Path, workdir: Path
) -> None:
    before = tree_digest(models["root"])
    link = tmp_path / "link"
    link.symlink_to(models["root"])
    refused(args(models, str(link / "base"), "--overwrite"), "is or contains the base input")
    untouched(models, before)


def test_an_earlier_merge_output_that_is_an_input_is_refused(
    models: dict[str, Path], tmp_path: Path, workdir: Path
) -> None:
    """Merging a previous merge into itself with --overwrite would delete its own input."""
    earlier = tmp_path / "earlier"
    merge(
        MergeSpec(base=str(models["base"]), secondary=[str(models["sec"])], method="linear"),
        earlier,
        progress=False,
    )
    before = tree_digest(earlier)
    refused(
        [
            "--base",
            str(earlier),
            "--secondary",
            str(models["sec"]),
            "--method",
            "linear",
            "--out",
            str(earlier),
            "--overwrite",
        ],
        "is or contains the base input",
    )
    assert tree_digest(earlier) == before


def test_a_directory_not_written_by_scf_is_refused_even_with_overwrite(
    models: dict[str, Path], tmp_path: Path, workdir: Path
) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    refused(
        args(models, str(out), "--overwrite"),
        "exists and was not written by scf merge",
        "no merge_report.json",
        "even with --overwrite",
    )
    assert (out / "holiday.jpg").read_bytes() == b"precious"


def test_an_existing_file_is_called_a_file(models: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("keep")
    line = refused(
        args(models, str(out), "--overwrite"), f"--out {out} exists and is a file, not a directory"
    )
    assert "pass --overwrite" not in line and out.read_text() == "keep"


def test_an_out_under_a_file_is_refused(models: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    parent = tmp_path / "notes.txt"
    parent.write_text("keep")
    refused(args(models, str(parent / "merged")), f"{parent} is a file, not a directory")
    assert parent.read_text() == "keep"


def test_the_library_refuses_too(models: dict[str, Path], workdir: Path) -> None:
    spec = MergeSpec(base=str(models["base"]), secondary=[str(models["sec"])], method="linear")
    with pytest.raises(ScfError, match="is or contains the base input"):
        merge(spec, models["root"], overwrite=True, progress=False)
    with pytest.raises(ScfError, match="--out is empty"):
        merge(spec, "", overwrite=True, progress=False)


def test_hugging_face_cache_blobs_are_protected(tmp_path: Path) -> None:
    """A snapshot's files link into blobs/: an output that is (or holds) the blobs is an input too."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_bytes(b"weights")
    snapshot = repo / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(repo / "blobs" / "abc123")
    inputs = {"base": [snapshot, snapshot / "model.safetensors"]}
    for dest in (repo / "blobs", repo, tmp_path):
        with pytest.raises(ScfError, match="is or contains the base input"):
            check_not_an_input(dest, inputs)
    check_not_an_input(tmp_path / "merged", inputs)  # a sibling is fine


def test_a_read_only_output_filesystem_is_one_error_line(
    models: dict[str, Path], tmp_path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ro"
    with tmpfs(target, "ro,size=16m") as mounted:
        if not mounted:  # no privileges to mount: the filesystem refuses the first file it is asked for
            target.mkdir(exist_ok=True)
            real_open = os.open

            def read_only(path, *a, **kw):  # noqa: ANN001, ANN002, ANN003 - os.open's signature
                if str(path).startswith(str(target)):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
                return real_open(path, *a, **kw)

            monkeypatch.setattr(scf.outdir.os, "open", read_only)
        refused(
            args(models, str(target / "merged")),
            f"cannot write the merge output in {target}: Read-only file system",
        )
        assert not (target / "merged").exists()
    shutil.rmtree(target, ignore_errors=True)
