#!/usr/bin/env bash
# MLflow tracking + registry server for raydistill.
#   infra/mlflow/server.sh                       # sqlite backend + local artifacts under ./mlflow-data, 127.0.0.1:5000
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:mlflow@127.0.0.1:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://mlflow-artifacts infra/mlflow/server.sh
# Point raydistill at it with registry.tracking_uri=http://HOST:PORT.
set -euo pipefail
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
DATA="${MLFLOW_DATA_DIR:-$PWD/mlflow-data}"
mkdir -p "$DATA"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$DATA/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$DATA/artifacts}"
# --serve-artifacts: clients upload/download through the server (no object-store credentials on clients).
exec mlflow server \
  --host "$HOST" --port "$PORT" \
  --backend-store-uri "$BACKEND" \
  --serve-artifacts --artifacts-destination "$ARTIFACTS" \
  --workers "${MLFLOW_WORKERS:-2}"
