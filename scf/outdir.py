"""The merge output directory: which ``--out`` is safe to write, and how it appears atomically.

`check_output_dir` and `check_not_an_input` refuse an output that could destroy something (the
working directory, an input, a directory this tool did not write). `AtomicDir` writes into a hidden
sibling and renames it into place, so the destination is absent or complete, never partial.

Leftovers of killed writers are cleaned only when provably stale. Each writer holds an exclusive
``flock`` on its own lock file ``.<name>.scf-lock-<id>`` for its whole life, where ``<id>`` is
hostname + pid + random (unique across hosts and containers sharing a volume). The lock file is
created (and locked) before the writer's temporary directory and removed after it, so:

- a lock file that can be locked without blocking belongs to a dead writer: its temporary
  directory is removed (and a previous output it had moved aside is put back);
- a temporary directory with no lock file is stale by construction.

A process id alone proves nothing: one from another host or PID namespace looks dead. On a
filesystem without working ``flock`` the lock cannot be taken and leftovers are never removed
automatically (nothing live is ever deleted).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

from scf import faults
from scf.errors import ScfError

REPORT_NAME = "merge_report.json"  # every merge output has one; its presence marks "written by scf merge"
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:40] or "host"


class OutputError(ScfError):
    """Writing the output failed (disk full, read-only filesystem, no permission)."""


def output_error(directory: Path, exc: OSError, what: str = "") -> OutputError:
    """An `OutputError` naming the directory and the reason, in one line.

    Args:
        directory: the directory the output was going to (the user's, not the hidden temporary one).
        exc: the operating system's error.
        what: the file being written, if any.

    Returns:
        The error to raise.
    """
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason += " (the disk is full or out of inodes)"
    doing = f" (writing {what})" if what else ""
    return OutputError(f"cannot write the merge output in {directory}: {reason}{doing}; "
                       f"the partial output was removed")


def check_output_dir(out: str | Path, *, overwrite: bool,
                     inputs: dict[str, list[Path]] | None = None) -> Path:
    """Refuse an ``--out`` that is empty, the working directory (or a parent of it), under a file, an
    input (see `check_not_an_input`), not a directory, or an existing directory this tool did not
    write; recover a killed writer's leftovers first.

    Args:
        out: the output directory as the user gave it.
        overwrite: whether an existing earlier merge output may be replaced.
        inputs: the inputs known so far (label -> paths), checked before the existing output is.

    Returns:
        The absolute destination path.

    Raises:
        ScfError: the refusal, one line naming ``out`` and what to do.
    """
    if not str(out).strip():
        raise ScfError("--out is empty (an unset variable?); name the output directory")
    dest = Path(os.path.abspath(Path(out).expanduser()))
    real, cwd = dest.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ScfError(f"--out {out} is the working directory or a parent of it ({cwd}); "
                       f"refusing to replace it, choose a new directory")
    ancestor = existing_ancestor(dest.parent)
    if not ancestor.is_dir():
        raise ScfError(f"cannot create --out {out}: {ancestor} is a file, not a directory")
    check_not_an_input(dest, inputs or {})
    recover_stale(dest)  # before looking at dest: a killed overwrite may have moved it aside
    if dest.is_symlink():
        raise ScfError(f"--out {out} is a symbolic link; give the directory's real path")
    if not os.path.lexists(dest):
        return dest
    if not dest.is_dir():
        raise ScfError(f"--out {out} exists and is a file, not a directory; remove it or choose "
                       f"another --out")
    if not overwrite:
        raise ScfError(f"output directory {out} already exists; pass --overwrite to replace it")
    if not (dest / REPORT_NAME).is_file() and any(dest.iterdir()):
        raise ScfError(f"--out {out} exists and was not written by scf merge (it has no {REPORT_NAME}); "
                       f"refusing to replace it, even with --overwrite")
    return dest


def check_not_an_input(dest: Path, inputs: dict[str, list[Path]]) -> None:
    """Refuse an output that is, contains, or lies inside an input (symlinks resolved).

    Args:
        dest: the absolute output directory.
        inputs: label (``base``, ``secondary[0]``, ``reference``) -> the input's path followed by its
            weight files (resolved here, so a Hugging Face cache snapshot's blobs are covered too).

    Raises:
        ScfError: naming the input.
    """
    real = dest.resolve()
    for label, paths in inputs.items():
        for path in paths:
            target = path.resolve()
            if real == target or target.is_relative_to(real):
                raise ScfError(f"--out {dest} is or contains the {label} input ({path}); "
                               f"refusing to replace an input, choose another --out")
        top = paths[0].resolve()
        if top.is_dir() and real.is_relative_to(top):
            raise ScfError(f"--out {dest} lies inside the {label} model directory ({paths[0]}); "
                           f"choose a directory outside every input")


def existing_ancestor(path: Path) -> Path:
    """The nearest of ``path`` and its parents that exists (as anything, a broken link included)."""
    while not os.path.lexists(path):
        path = path.parent
    return path


def _name(dest: Path, kind: str, writer_id: str) -> str:
    """The path of a writer's ``tmp`` or ``old`` directory or ``lock`` file next to ``dest``."""
    return str(dest.parent / f".{dest.name}.scf-{kind}-{writer_id}")


def _pattern(dest: Path, kind: str) -> str:
    """A glob matching every writer's ``kind`` path next to ``dest``."""
    return glob.escape(_name(dest, kind, "")) + "*"


def recover_stale(dest: Path) -> None:
    """Remove what dead writers left next to ``dest``, putting back an output they had moved aside.

    Args:
        dest: the absolute output directory.
    """
    if not dest.parent.is_dir():
        return
    for lock_file in glob.glob(_pattern(dest, "lock")):
        writer_id = lock_file.rsplit(".scf-lock-", 1)[1]
        fd = _lock_if_stale(lock_file)
        if fd is None:
            continue
        try:
            _recover(dest, writer_id)
            with contextlib.suppress(OSError):
                os.unlink(lock_file)
        finally:
            os.close(fd)
    for kind in ("tmp", "old"):  # no lock file: stale by construction (see the module docstring)
        for leftover in glob.glob(_pattern(dest, kind)):
            writer_id = leftover.rsplit(f".scf-{kind}-", 1)[1]
            if not os.path.lexists(_name(dest, "lock", writer_id)):
                _recover(dest, writer_id)


def _lock_if_stale(lock_file: str) -> int | None:
    """A descriptor holding the lock of a dead writer's lock file, or None if it is alive (or unknown)."""
    try:
        fd = os.open(lock_file, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:  # still the file at that name
            return fd
    except OSError:  # held by a live writer, gone, or flock unsupported: not provably stale
        pass
    os.close(fd)
    return None


def _recover(dest: Path, writer_id: str) -> None:
    old, tmp = Path(_name(dest, "old", writer_id)), Path(_name(dest, "tmp", writer_id))
    if old.is_dir():
        if not os.path.lexists(dest):
            old.rename(dest)  # killed mid-overwrite: put the previous output back
        else:
            shutil.rmtree(old, ignore_errors=True)
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)


class AtomicDir:
    """A directory that appears at its destination in one rename, complete or not at all.

    Files are written into a temporary sibling ``.<name>.scf-tmp-<id>`` (same filesystem) while the
    writer holds the lock file ``.<name>.scf-lock-<id>``; on success the directory is fsynced and
    renamed to the destination. On an exception it is removed; if the process is killed, the next
    writer (or `check_output_dir`) for the same destination removes it. With ``overwrite``, an
    existing destination is moved aside just before the rename and deleted after.
    """

    def __init__(self, dest: Path, *, overwrite: bool = False) -> None:
        """Prepare (nothing is created until the context is entered).

        Args:
            dest: the final directory.
            overwrite: replace an existing ``dest``.
        """
        self.dest = Path(os.path.abspath(dest))
        self.overwrite = overwrite
        self._lock_fd: int | None = None
        self._new_id()

    def _new_id(self) -> None:
        self.writer_id = f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp = Path(_name(self.dest, "tmp", self.writer_id))
        self.old = Path(_name(self.dest, "old", self.writer_id))
        self.lock_file = Path(_name(self.dest, "lock", self.writer_id))

    def __enter__(self) -> Path:
        recover_stale(self.dest)
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self._take_lock()
            self.tmp.mkdir()
        except OSError as exc:
            self._release_lock()
            raise output_error(self.dest.parent, exc) from None
        return self.tmp

    def _take_lock(self) -> None:
        """Create and lock this writer's lock file; retry under a new id if a cleaner removed it first."""
        for _ in range(5):
            fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a cleaner holds it for a moment; it will delete it
                os.close(fd)
                self._new_id()
                continue
            except OSError:  # no flock on this filesystem: keep the file (leftovers are then kept too)
                pass
            try:
                if os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino:
                    self._lock_fd = fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)  # a cleaner took it between create and lock and removed it: start over
            self._new_id()
        raise OSError(errno.EAGAIN, f"could not lock {self.lock_file}")

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.lock_file)
        os.close(self._lock_fd)
        self._lock_fd = None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            self._publish()
        finally:
            self._release_lock()

    def _publish(self) -> None:
        try:
            _fsync_dir(self.tmp)
            moved_aside = False
            if os.path.lexists(self.dest):
                if not self.overwrite:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    raise ScfError(f"output directory {self.dest} appeared during the merge (another "
                                   f"writer?); pass --overwrite to replace it")
                self.dest.rename(self.old)
                moved_aside = True
            faults.pause("final_rename")
            try:
                self.tmp.rename(self.dest)
            except OSError:
                if moved_aside:
                    self.old.rename(self.dest)
                raise
            _fsync_dir(self.dest.parent)
        except OSError as exc:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise output_error(self.dest.parent, exc) from None
        if moved_aside:
            shutil.rmtree(self.old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
