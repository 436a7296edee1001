"""lm-eval YAML task definitions of the toy benchmarks (package data; see evals.reasoning)."""
