"""Flaky and failing hub downloads, against a local stand-in for the hub (fake_hub.py) on loopback.

Transient failures (dropped connections, a stalled server, HTTP 5xx/429) are retried with backoff and
the download then succeeds; a permanent 404 or 401 fails at once, with one request and a message naming
the repo and revision. Each resolve runs in a child process, since huggingface_hub reads its endpoint
and timeouts from the environment when it is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_hub import FakeHub
from helpers_ckpt import llama_config, llama_state, save_checkpoint
from merge_helpers import REPO, tree_digest

SHA = "3" * 40
RESOLVE = (
    "from scf.sources import resolve_source; s = resolve_source('org/tiny@main'); print(s.path, s.revision)"
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(
        tmp_path_factory.mktemp("hub") / "tiny", llama_state(llama_config(), 0), llama_config()
    )


def resolve(hub: FakeHub, cache: Path, *, attempts: int = 6) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DOWNLOAD_TIMEOUT": "1",  # seconds: a stalled request times out fast
        "HF_HUB_ETAG_TIMEOUT": "1",
        "HF_HUB_DISABLE_XET": "1",
        "SCF_HUB_ATTEMPTS": str(attempts),
        "SCF_HUB_BACKOFF_S": "0.1",
    }
    return subprocess.run(
        [sys.executable, "-c", RESOLVE], env=env, capture_output=True, text=True, timeout=180
    )


def info_requests(hub: FakeHub) -> int:
    return sum(1 for r in hub.requests if r.startswith("GET /api/models/org/tiny/revision/"))


def test_dropped_then_stalled_requests_are_retried_and_the_download_succeeds(
    model: Path, tmp_path: Path
) -> None:
    with FakeHub("org/tiny", SHA, model, drop=2, stall=2, stall_s=3.0) as hub:
        started = time.monotonic()
        result = resolve(hub, tmp_path / "cache")
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    snapshot = tmp_path / "cache" / "models--org--tiny" / "snapshots" / SHA
    assert result.stdout.split() == [str(snapshot), SHA]
    assert tree_digest(snapshot) == tree_digest(model)  # every file, byte for byte
    assert info_requests(hub) == 5  # 2 dropped + 2 timed out + the one served
    assert result.stderr.count("retry ") == 4
    assert "RemoteProtocolError" in result.stderr and "timed out" in result.stderr
    assert elapsed < 60  # 1 s timeouts, 0.1 s first backoff: no hang on the stalled requests


def test_server_errors_are_retried_then_reported(model: Path, tmp_path: Path) -> None:
    with FakeHub("org/tiny", SHA, model, fail_with=503) as hub:
        result = resolve(hub, tmp_path / "cache", attempts=3)
    assert result.returncode == 1 and info_requests(hub) == 3
    assert (
        "model source 'org/tiny@main': not a local path, and hub repo 'org/tiny' at revision 'main' "
        "could not be downloaded from the hub after 3 attempts" in result.stderr
    )


@pytest.mark.parametrize("status", [404, 401])
def test_a_permanent_error_fails_at_once_naming_repo_and_revision(
    model: Path, tmp_path: Path, status: int
) -> None:
    with FakeHub("org/tiny", SHA, model, fail_with=status) as hub:
        result = resolve(hub, tmp_path / "cache")
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1
    assert error.startswith(
        "scf.errors.ScfError: model source 'org/tiny@main': not a local path, and hub repo 'org/tiny' at "
        "revision 'main' was not found on the hub, or is private and HF_TOKEN gives no access "
        f"(HTTP {status})"
    ), error
    assert len(hub.requests) == 1, hub.requests  # no retry storm
    assert "retry" not in result.stderr
