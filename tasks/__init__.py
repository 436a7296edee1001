"""Prefect tasks: thin wrappers over scf/ and evals/, plus the MLflow and DuckDB stores and the gate."""
