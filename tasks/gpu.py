"""One GPU step at a time on a machine, without depending on anything a user must create first.

Two layers, taken in this order:

1. The Prefect global concurrency limit ``gpu``, when it exists on the server (created with
   ``prefect gcl create gpu --limit N``): it bounds GPU steps across every machine of a pool.
   When it does not exist it is skipped (Prefect itself would only log a warning and not limit).
2. An exclusive ``fcntl`` lock on ``$SCF_CACHE/locks/gpu.lock``: it serialises GPU steps across
   every thread and process of this machine, whatever the server says. ``flock`` locks belong to
   an open file description, so two threads of one process exclude each other as two processes do,
   and the kernel drops the lock when its holder dies: a killed step never leaves it taken.

Whether a step needs the lock: ``on`` always (tests force the lock path on CPU this way), ``off``
never, ``auto`` when the step's device is CUDA (``cuda``, or ``auto`` on a machine with an NVIDIA
device; checked without importing torch, so the flow process stays light).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from tasks.child import scf_cache_dir

GPU_LIMIT = "gpu"
LockMode = Literal["auto", "on", "off"]
log = logging.getLogger(__name__)


def default_lock_path() -> Path:
    """``$SCF_CACHE/locks/gpu.lock`` (``SCF_CACHE`` defaults to ``~/.cache/scf-pipeline``)."""
    return scf_cache_dir() / "locks" / "gpu.lock"


def machine_has_gpu() -> bool:
    """Whether an NVIDIA device is visible to this machine (device nodes; no torch import)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def needs_lock(device: str, mode: LockMode) -> bool:
    """Whether a step on ``device`` takes the GPU lock under ``mode``.

    Args:
        device: the step's device setting (``auto``, ``cpu``, ``cuda``).
        mode: ``auto``, ``on`` or ``off``.

    Returns:
        True when the step must hold the lock.
    """
    if mode != "auto":
        return mode == "on"
    return device.startswith("cuda") or (device == "auto" and machine_has_gpu())


@contextlib.contextmanager
def gpu_slot(device: str, mode: LockMode = "auto", lock_path: Path | None = None) -> Iterator[bool]:
    """Hold the GPU for one step (the Prefect ``gpu`` limit when it exists, then the machine lock).

    Args:
        device: the step's device setting.
        mode: see `needs_lock`.
        lock_path: the lock file (default `default_lock_path`).

    Yields:
        Whether the lock was taken.
    """
    if not needs_lock(device, mode):
        yield False
        return
    with _prefect_limit(), machine_lock(lock_path or default_lock_path()):
        yield True


@contextlib.contextmanager
def machine_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``, blocking until it is free.

    Args:
        path: the lock file (created, with its directory).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _prefect_limit() -> Iterator[None]:
    if not _limit_exists():
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1):
        yield


def _limit_exists() -> bool:
    """Whether the server has a global concurrency limit named ``gpu`` (False without a server)."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import PREFECT_API_URL

    if not (PREFECT_API_URL.value() or FlowRunContext.get() or TaskRunContext.get()):
        return False  # no server to ask (and asking would start a temporary one)
    try:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            except ObjectNotFound:
                return False
        return True
    except Exception as err:  # no API reachable: the machine lock alone protects this machine
        log.debug("no Prefect concurrency limit check (%s)", err)
        return False
