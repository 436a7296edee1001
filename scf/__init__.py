"""scf: streaming model merging (SCF-RKL and baselines). Knows nothing of evaluation or orchestration."""

__version__ = "0.1.0"
