#!/usr/bin/env bash
# A local Prefect server on 127.0.0.1 (its default SQLite database under $PREFECT_HOME) plus the
# process serving the deployment synth/avar. Ctrl-C (or SIGTERM) stops both.
#
#   scripts/prefect_local.sh                 # server on :4200, serves synth/avar
#   PREFECT_PORT=4300 scripts/prefect_local.sh
#
# Then, in another shell:
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
#   .venv/bin/prefect deployment run synth/avar --param config_path=configs/demo.yaml --watch
#   # UI: http://127.0.0.1:4200 (flow runs, task runs, the run-summary artifact)
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PREFECT="${PREFECT:-$(dirname "$PY")/prefect}"
PORT="${PREFECT_PORT:-4200}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export PREFECT_HOME="${PREFECT_HOME:-$HOME/.prefect}"   # the server's SQLite db lives here
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "starting Prefect server on 127.0.0.1:${PORT} (database under ${PREFECT_HOME})"
"$PREFECT" server start --host 127.0.0.1 --port "$PORT" &
pids+=($!)

for _ in $(seq 1 120); do
  if "$PY" -c "import urllib.request,sys; urllib.request.urlopen('${PREFECT_API_URL}/health', timeout=2)" 2>/dev/null; then
    break
  fi
  sleep 1
done
"$PY" -c "import urllib.request; urllib.request.urlopen('${PREFECT_API_URL}/health', timeout=2)" \
  || { echo "Prefect server did not come up on ${PREFECT_API_URL}" >&2; exit 1; }

echo "serving deployment synth/avar; run it with:"
echo "  PREFECT_API_URL=${PREFECT_API_URL} ${PREFECT} deployment run synth/avar --param config_path=configs/demo.yaml --watch"
"$PY" -m flows.deploy "$@" &
pids+=($!)
wait -n "${pids[@]}"
