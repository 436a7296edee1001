-- Runs once, when the postgres volume is first initialised: MLflow gets its own database
-- next to Prefect's, owned by the same user.
CREATE DATABASE mlflow;
