"""Prefect flows: merge_and_evaluate (one candidate) and nightly (a sweep, compare, promote)."""
