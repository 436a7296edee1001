"""Session-wide test settings: offline, no telemetry, a repo-local cache for built artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never reach a hub or a telemetry endpoint; built artifacts (the toy zoo) are cached
# under .cache/ so a second local run reuses them, while a fresh CI clone builds them once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SCF_CACHE", str(REPO / ".cache" / "scf-pipeline"))
# The models in tests are tiny: one intra-op thread is faster than two fighting over 2 cores
# with the Prefect server and worker subprocesses some tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_zoo() -> Path:
    """The `tiny` toy zoo (base + specialists), built once and cached by its build settings.

    Under pytest-xdist every worker asks for it: a lock lets one build while the others wait, then
    reuse it (build_zoo alone is safe, but would train the same zoo once per worker).
    """
    import fcntl

    from evals.zoo import build_zoo, default_zoo_dir

    out = default_zoo_dir("tiny", seed=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "tiny-seed0.lock", "a") as lock:  # not ".tiny-seed0.*": build leftovers
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build_zoo(out, size="tiny", seed=0, progress=False)
