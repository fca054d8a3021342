#!/usr/bin/env bash
# Set up (if needed) and run the embedded demo audit: no servers, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/influence-audit ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/influence-audit demo "$@"
