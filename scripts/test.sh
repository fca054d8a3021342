#!/usr/bin/env bash
# The test command: the whole suite (unit + integration tests with real Prefect and MLflow servers on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] && .venv/bin/python -c "import influence_audit, xdist" 2>/dev/null || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
export PATH="$PWD/.venv/bin:$PATH"  # tests run the installed `influence-audit` and `prefect` commands
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)/prefect}"
# Two pytest-xdist workers (TEST_WORKERS=N for more, 0 for none), whole test files per worker: many tests wait on
# servers, workers and subprocesses, so the two cores overlap that waiting.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
