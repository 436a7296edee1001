# MLflow tracking server with the Postgres driver it needs for a postgresql:// backend store.
FROM ghcr.io/mlflow/mlflow:v3.17.0
RUN pip install --no-cache-dir "psycopg2-binary>=2.9,<3"
