"""What the tests that run every registered method need to know about each one."""

from __future__ import annotations

from scf.methods.registry import METHODS

# Parameters without defaults (mergekit requires them too), at values every generic test can use.
REQUIRED_PARAMS: dict[str, dict] = {"slerp": {"t": 0.5}, "nearswap": {"t": 0.01}}


def runnable_params(name: str, **params) -> dict:
    """``params`` plus values for the method's required parameters the caller did not give."""
    return {**REQUIRED_PARAMS.get(name, {}), **params}


def n_secondaries(name: str, available: int) -> int:
    """How many of ``available`` secondaries the method takes (slerp-like methods: exactly one)."""
    most = METHODS[name].secondaries[1]
    return available if most is None else min(most, available)


def takes_reference(name: str) -> bool:
    """Whether the method uses a reference (needs one, or uses one when given)."""
    spec = METHODS[name]
    return spec.needs_reference or spec.optional_reference
