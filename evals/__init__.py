"""evals: generation, repetition, safety and reasoning scoring, and the toy model zoo.

Knows nothing of the merge library, Prefect, MLflow or DuckDB.
"""
