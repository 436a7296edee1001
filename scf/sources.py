"""Where a model comes from: a local directory or file, or a Hugging Face hub id with a revision.

`resolve_source` turns what the user wrote into a local path plus a fingerprint (the content
identity used for caching and in merge reports), checking the weights on the way so that a bad
input fails before anything is written.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scf.errors import ScfError, one_line
from scf.io import CONFIG_AND_TOKENIZER_PATTERNS, open_checkpoint

# What a merge needs from a hub repo: weights, index, config and tokenizer files, nothing else.
# README.md: the input's model card, read for its license (scf.card)
HUB_PATTERNS = ["*.safetensors", "model.safetensors.index.json", *CONFIG_AND_TOKENIZER_PATTERNS, "README.md"]
HUB_PICKLE_PATTERNS = ["*.bin", "pytorch_model.bin.index.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSource:
    """A model input resolved to local files.

    Attributes:
        ref: what the user wrote (path or ``org/name[@revision]``).
        path: the local directory (or single ``.safetensors`` file).
        revision: the hub commit sha, or None for local sources.
        fingerprint: the hub commit sha, or for local sources a sha256 over each weight file's
            header, size and a few KB of sampled data (see `scf.io.Checkpoint.fingerprint`).
    """

    ref: str
    path: Path
    revision: str | None
    fingerprint: str

    def as_report(self) -> dict[str, str | None]:
        """The ``{ref, revision, fingerprint}`` entry of a merge report."""
        return {"ref": self.ref, "revision": self.revision, "fingerprint": self.fingerprint}

    def pinned_ref(self) -> str:
        """A ref that reproduces this exact input: absolute path, or ``hub_id@commit``."""
        if self.revision is None:
            return str(self.path)
        return f"{split_hub_ref(self.ref)[0]}@{self.revision}"


def split_hub_ref(ref: str) -> tuple[str, str | None]:
    """Split ``org/name@revision`` into the repo id and revision (None when absent)."""
    repo_id, _, revision = ref.partition("@")
    return repo_id, revision or None


def resolve_source(ref: str, *, allow_pickle: bool = False) -> ResolvedSource:
    """Resolve a model reference to local, checked weights.

    Args:
        ref: a local directory, a ``.safetensors`` file, or a hub id ``org/name[@revision]``
            (revision: branch, tag or commit). Hub downloads fetch weights, index, config and
            tokenizer files only, use the token from the environment (``HF_TOKEN``) and honour
            ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``.
        allow_pickle: accept pickled ``.bin`` weights when there are no safetensors.

    Returns:
        The `ResolvedSource`.

    Raises:
        ScfError: the path does not exist, the hub id cannot be resolved, or the weights are
            missing, pickled (not allowed), corrupted or truncated; the message names the input.
    """
    local = Path(ref).expanduser()
    if local.exists():
        path, revision = local.absolute(), None
    elif _looks_like_hub_id(ref):
        path, revision = _download(ref, allow_pickle)
    else:
        raise ScfError(f"model source {ref!r}: no such file or directory")
    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    try:
        fingerprint = revision or checkpoint.fingerprint()
    finally:
        checkpoint.close()
    return ResolvedSource(ref, path, revision, fingerprint)


def _looks_like_hub_id(ref: str) -> bool:
    repo_id, revision = split_hub_ref(ref)
    return bool(_HUB_ID.match(repo_id)) and not repo_id.endswith(".safetensors") and revision != ""


# Retries of a hub download that failed for a reason that may pass (a dropped connection, a timeout,
# HTTP 5xx or 429): attempts in all, and the first wait in seconds (doubling, at most 60 s).
ATTEMPTS_ENV, BACKOFF_ENV = "SCF_HUB_ATTEMPTS", "SCF_HUB_BACKOFF_S"
_DEFAULT_ATTEMPTS, _DEFAULT_BACKOFF_S = 5, 2.0


def _download(ref: str, allow_pickle: bool) -> tuple[Path, str]:
    """Fetch (or find in the cache) a hub snapshot; returns its directory and commit sha.

    Transient failures are retried with exponential backoff (`ATTEMPTS_ENV`, `BACKOFF_ENV`); a
    permanent one (no such repo or revision, no access: HTTP 401/403/404) fails at once, with one
    request, and a message naming the repo and revision. Requests huggingface_hub sends without a
    timeout (the repo info and file listing) get ``HF_HUB_DOWNLOAD_TIMEOUT``, so a stalled hub is a
    timeout (retried), never a hang.
    """
    from huggingface_hub import snapshot_download

    repo_id, revision = split_hub_ref(ref)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    attempts = max(1, int(os.environ.get(ATTEMPTS_ENV) or _DEFAULT_ATTEMPTS))
    wait = float(os.environ.get(BACKOFF_ENV) or _DEFAULT_BACKOFF_S)
    _bound_hub_timeouts()
    for attempt in range(1, attempts + 1):
        try:
            snapshot = snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=HUB_PATTERNS + (HUB_PICKLE_PATTERNS if allow_pickle else []),
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,  # read now, not at import
                local_files_only=offline,
            )
            break
        except Exception as exc:  # huggingface_hub and httpx raise many types; classified below
            if offline or attempt == attempts or not _transient(exc):
                raise _download_error(ref, exc, offline, attempt) from None
            _log.warning("hub download of %s failed (%s); retry %d of %d in %.1f s", ref,
                         _reason(exc), attempt, attempts - 1, wait)
            time.sleep(wait)
            wait = min(2 * wait, 60.0)
    path = Path(snapshot)
    return path, path.name  # snapshot folders are named by commit sha


def _chain(exc: BaseException) -> list[BaseException]:
    """An exception and the ones it was raised from (huggingface_hub wraps network errors)."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _transient(exc: BaseException) -> bool:
    """Whether retrying may help: a network error, a timeout, HTTP 408/429/5xx; never a missing repo,
    revision or file, nor denied access."""
    import httpx2
    from huggingface_hub import errors

    # LocalEntryNotFoundError is not here: snapshot_download raises it for a network error too (as
    # its cause), so the chain decides.
    permanent = (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
                 errors.RemoteEntryNotFoundError, errors.DisabledRepoError, errors.OfflineModeIsEnabled)
    chain = _chain(exc)
    if any(isinstance(e, permanent) for e in chain):
        return False
    for e in chain:
        status = _status(e)
        if status is not None:
            return status in (408, 429) or status >= 500
        if isinstance(e, httpx2.TransportError | ConnectionError | TimeoutError):
            return True
    return False


def _reason(exc: BaseException) -> str:
    """The innermost cause in one short line, e.g. ``ReadTimeout: timed out``."""
    inner = _chain(exc)[-1]
    text = str(inner).splitlines()[0] if str(inner) else ""
    return one_line(f"{type(inner).__name__}: {text}" if text else type(inner).__name__, 300)


def _download_error(ref: str, exc: BaseException, offline: bool, attempts: int) -> ScfError:
    from huggingface_hub.errors import GatedRepoError, RevisionNotFoundError

    repo_id, revision = split_hub_ref(ref)
    at = f" at revision {revision!r}" if revision else ""
    start = f"model source {ref!r}: not a local path, and hub repo {repo_id!r}{at}"
    chain = _chain(exc)
    status = next((s for s in map(_status, chain) if s is not None), None)
    if offline:
        problem = "was not found in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
    elif any(isinstance(e, RevisionNotFoundError) for e in chain):
        problem = f"has no revision {revision!r} on the hub"
    elif any(isinstance(e, GatedRepoError) for e in chain):
        problem = "is gated: accept its terms on the hub and set HF_TOKEN"
    elif status in (401, 403, 404):
        problem = (f"was not found on the hub, or is private and HF_TOKEN gives no access (HTTP {status})"
                   if status != 403 else "refused access (HTTP 403): check HF_TOKEN's permissions")
    elif _transient(exc):
        problem = f"could not be downloaded from the hub after {attempts} attempts"
    else:
        problem = "was not found on the hub"
    return ScfError(f"{start} {problem} ({_reason(exc)})")


def _bound_hub_timeouts() -> None:
    """Give every request of huggingface_hub's shared HTTP client a timeout when it has none."""
    from huggingface_hub.utils import get_session

    session = get_session()
    hooks = session.event_hooks
    if _default_timeout not in hooks["request"]:
        session.event_hooks = {**hooks, "request": [*hooks["request"], _default_timeout]}


def _default_timeout(request: Any) -> None:
    """An httpx request hook: a request without any timeout gets ``HF_HUB_DOWNLOAD_TIMEOUT``
    (huggingface_hub's own "default timeout for other requests") for each phase."""
    from huggingface_hub import constants

    timeouts = request.extensions.get("timeout") or {}
    if all(value is None for value in timeouts.values()):
        seconds = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
        request.extensions["timeout"] = dict.fromkeys(("connect", "read", "write", "pool"), seconds)
