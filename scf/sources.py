"""Where a model comes from: a local directory or file, or a Hugging Face hub id with a revision.

`resolve_source` turns what the user wrote into a local path plus a fingerprint (the content
identity used for caching and in merge reports), checking the weights on the way so that a bad
input fails before anything is written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from scf.errors import ScfError
from scf.io import CONFIG_AND_TOKENIZER_PATTERNS, open_checkpoint

# What a merge needs from a hub repo: weights, index, config and tokenizer files, nothing else.
HUB_PATTERNS = ["*.safetensors", "model.safetensors.index.json", *CONFIG_AND_TOKENIZER_PATTERNS]
HUB_PICKLE_PATTERNS = ["*.bin", "pytorch_model.bin.index.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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


def _download(ref: str, allow_pickle: bool) -> tuple[Path, str]:
    """Fetch (or find in the cache) a hub snapshot; returns its directory and commit sha."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision = split_hub_ref(ref)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=HUB_PATTERNS + (HUB_PICKLE_PATTERNS if allow_pickle else []),
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,  # read now, not at import
            local_files_only=offline,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ScfError(f"model source {ref!r}: not a local path, and hub repo {repo_id!r}"
                       f"{f' at revision {revision!r}' if revision else ''} was not found {where} "
                       f"({type(exc).__name__}: {reason})") from None
    path = Path(snapshot)
    return path, path.name  # snapshot folders are named by commit sha
