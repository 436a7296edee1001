#!/usr/bin/env bash
# Start a Prefect process worker for the scf-pipeline work pool on this machine.
#
# The worker runs each flow run as a subprocess here, so the flow sees this machine's GPUs,
# checkpoints cache and DuckDB file. Used as the CMD of the project image (docker-compose's
# `worker` service) and usable as is on any GPU box that has the project installed.
#
# Environment:
#   PREFECT_API_URL    the Prefect server's API, e.g. http://prefect-server:4200/api (required)
#   SCF_WORK_POOL      the process work pool to poll (default: scf, the pool in prefect.yaml)
#   SCF_WORKER_LIMIT   how many flow runs this worker runs at once (default: 2)
#   SCF_GPU_SLOTS      if set, create the `gpu` global concurrency limit with this many slots
#                      when it is missing: GPU steps across ALL workers of the server then share
#                      them. Unset (the default), each machine's own GPU lock ($SCF_CACHE/locks)
#                      serialises the GPU steps of that machine, and machines run in parallel.
#   SCF_API_WAIT_S     how long to wait for the Prefect API before giving up (default: 120)
#   PREFECT_FLOWS_HEARTBEAT_FREQUENCY  seconds between flow-run heartbeats (default here: 30), so a
#                      night in pool mode notices a dead worker within execution.heartbeat_timeout_s
set -euo pipefail

: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server API, e.g. http://prefect-server:4200/api}"
SCF_WORK_POOL="${SCF_WORK_POOL:-scf}"
SCF_WORKER_LIMIT="${SCF_WORKER_LIMIT:-2}"
SCF_API_WAIT_S="${SCF_API_WAIT_S:-120}"
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"

# Wait for the API: compose orders start-up by healthchecks, but a worker started by hand
# or after a server restart should wait rather than crash-loop.
python - "$PREFECT_API_URL" "$SCF_API_WAIT_S" <<'PY'
import sys, time, urllib.request

api_url, wait_s = sys.argv[1].rstrip("/"), float(sys.argv[2])
deadline = time.monotonic() + wait_s
while True:
    try:
        urllib.request.urlopen(f"{api_url}/health", timeout=3).read()
        break
    except OSError as err:
        if time.monotonic() > deadline:
            sys.exit(f"error: Prefect API {api_url} not healthy after {wait_s:.0f} s: {err}")
        time.sleep(1)
PY

# Optional: a server-wide `gpu` limit (the pipeline's GPU steps hold one slot when it exists).
# Created once; an existing limit (maybe resized) is kept.
if [ -n "${SCF_GPU_SLOTS:-}" ] && ! prefect gcl inspect gpu >/dev/null 2>&1; then
    prefect gcl create gpu --limit "$SCF_GPU_SLOTS"
fi

# The worker creates the pool (type process) if it does not exist yet.
exec prefect worker start \
    --pool "$SCF_WORK_POOL" \
    --type process \
    --limit "$SCF_WORKER_LIMIT" \
    --name "${SCF_WORKER_NAME:-$(hostname)}" \
    --with-healthcheck
