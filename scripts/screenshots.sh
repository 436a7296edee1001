#!/usr/bin/env bash
# Screenshots of the two screens users live in, for the README (docs/screenshots/*.png):
#   prefect-run-form.png      the merge-and-evaluate run form, its method dropdown open
#   prefect-night-graph.png   a completed night's flow-run graph
#   mlflow-runs-compared.png  the MLflow runs view, the candidates of two nights side by side
#
# Usage: scripts/screenshots.sh [RESULTS_DIR]
#   It starts `prefect server start` and `mlflow ui` on free loopback ports with a temporary
#   PREFECT_HOME, deploys prefect.yaml, runs a demo-sized tiny night twice (the second reuses the
#   first's cache) against that server, takes headless Chromium screenshots and stops the servers.
#   RESULTS_DIR (kept; default a temporary one) holds the night's config and stores: give the same
#   one again to reuse its cache. Not part of CI. Needs the project's venv (make install).
#
# Installs only what is missing: Debian's `chromium` (apt-get) when /usr/bin/chromium is absent, and
# playwright-core (npm, no browser download) under $SCF_CACHE for the clicks.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${SCF_VENV_BIN:-$REPO/.venv/bin}
OUT=${SCF_SCREENSHOTS_OUT:-$REPO/docs/screenshots}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
export SCF_CACHE=${SCF_CACHE:-$REPO/.cache/scf-pipeline}  # the zoo the tests build, reused
CACHE=$SCF_CACHE
NODE_DIR=$CACHE/screenshots-node
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export MLFLOW_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

TMP=$(mktemp -d -t scf-screenshots.XXXXXX)
RESULTS=${1:-$TMP/results}
mkdir -p "$RESULTS" "$OUT"
RESULTS=$(cd "$RESULTS" && pwd)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do  # each server was started in its own process group
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

say() { printf '%s screenshots: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

free_port() {
    "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # URL LOG SECONDS
    local deadline=$((SECONDS + $3))
    until curl -fsS -o /dev/null "$1" 2>/dev/null; do
        if ((SECONDS > deadline)); then
            say "$1 did not answer within $3 s; log:"; tail -n 40 "$2" >&2; exit 1
        fi
        sleep 1
    done
}

start() {  # LOG COMMAND...: in a process group of its own, so cleanup stops all it starts
    local log=$1; shift
    setsid "$@" > "$log" 2>&1 &
    PIDS+=($!)
}

# ------------------------------------------------------------------------------------- tools
if [[ ! -x $CHROMIUM ]]; then
    say "installing Debian's chromium"
    if [[ $(id -u) -eq 0 ]]; then apt-get install -y chromium; else sudo apt-get install -y chromium; fi
fi
if [[ ! -d $NODE_DIR/node_modules/playwright-core ]]; then
    say "installing playwright-core into $NODE_DIR"
    mkdir -p "$NODE_DIR"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$NODE_DIR" --no-audit --no-fund \
        playwright-core@1 >&2
fi

# ----------------------------------------------------------------------------- Prefect server
PREFECT_PORT=$(free_port)
export PREFECT_HOME=$TMP/prefect-home
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_UI_API_URL=$PREFECT_API_URL PREFECT_UI_ENABLED=true PREFECT_SERVER_ANALYTICS_ENABLED=false
say "starting the Prefect server on $PREFECT_PORT"
start "$TMP/prefect.log" "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" --no-scheduler
wait_for "$PREFECT_API_URL/health" "$TMP/prefect.log" 300
"$BIN/prefect" work-pool create scf --type process > /dev/null
(cd "$REPO" && "$BIN/prefect" --no-prompt deploy --all > "$TMP/deploy.log" 2>&1) \
    || { tail -n 40 "$TMP/deploy.log" >&2; exit 1; }

# ---------------------------------------------------------------------------------- the night
# The demo (configs/demo.yaml) cut to five candidates and a few items per benchmark, its stores in
# RESULTS; racing off, so the graph shows every step.
CONFIG=$RESULTS/demo.yaml  # the night is nightly-demo, its experiment demo
"$BIN/python" - "$REPO/configs/demo.yaml" "$CONFIG" "$RESULTS" <<'PY'
import sys
from pathlib import Path

import yaml

demo, config, results = sys.argv[1:]
raw = yaml.safe_load(Path(demo).read_text())
raw["candidates"] = [
    {"method": "scf_rkl", "grid": {"alpha": [0.5, 1.5]}},
    {"method": "linear", "params": {"weight": [0.5, 0.5]}},
    {"method": "ties", "params": {"weight": 1.0, "density": 0.5}},
    {"method": "dare_linear", "params": {"weight": 1.0, "density": 0.5}},
]
raw["eval"].update(limit=12, gen={"max_new_tokens": 24, "temperature": 0.0, "batch_size": 32})
raw["gate"].update(min_items=12, max_over_refusal_rate=0.5,  # 12 items: wide bounds
                   benchmarks={k: {"tolerance": 0.9} for k in raw["gate"]["benchmarks"]})
raw["storage"] = {"workdir": f"{results}/work"}
raw["keep_candidates"] = True  # the second night reuses every merge
Path(config).write_text(yaml.safe_dump(raw, sort_keys=False))
PY
for night in 1 2; do
    say "night $night of 2 (tiny zoo; the second reuses the first's cache)"
    (cd "$REPO" && "$BIN/scf" nightly --config "$CONFIG" > "$TMP/night-$night.log" 2>&1) \
        || { tail -n 40 "$TMP/night-$night.log" >&2; exit 1; }
done

# ------------------------------------------------------------------------------------ MLflow UI
MLFLOW_PORT=$(free_port)
MLFLOW_URI=sqlite:///$RESULTS/work/mlflow.db
say "starting the MLflow UI on $MLFLOW_PORT"
start "$TMP/mlflow.log" "$BIN/mlflow" ui --backend-store-uri "$MLFLOW_URI" --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --workers 1
wait_for "http://127.0.0.1:$MLFLOW_PORT/health" "$TMP/mlflow.log" 300

# --------------------------------------------------------------------------------- what to show
"$BIN/python" - "$MLFLOW_URI" > "$TMP/ids.json" <<'PY'
import asyncio
import json
import sys

from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.sorting import FlowRunSort


async def prefect_ids() -> dict:
    async with get_client() as client:
        deployment = await client.read_deployment_by_name("merge-and-evaluate/merge-and-evaluate")
        [night] = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["nightly"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["COMPLETED"]))),
            sort=FlowRunSort.START_TIME_ASC, limit=1,  # the first night: every step ran
        )
        return {"deployment": str(deployment.id), "night": str(night.id)}


mlflow = MlflowClient(sys.argv[1])
experiment = mlflow.get_experiment_by_name("demo")
print(json.dumps({**asyncio.run(prefect_ids()), "experiment": experiment.experiment_id}))
PY

cat > "$TMP/shots.cjs" <<'JS'
// Headless Chromium through playwright-core: the pages, waited for, clicked where a view needs it.
const { chromium } = require(process.env.PLAYWRIGHT);
const ids = require(process.env.IDS);
const prefect = process.env.PREFECT_UI, mlflow = process.env.MLFLOW_UI, out = process.env.OUT;

async function settle(page, ms = 1500) {
  await page.waitForLoadState("networkidle").catch(() => {});
  await page.waitForTimeout(ms);
}

(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM, args: ["--no-sandbox"] });
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.setDefaultTimeout(120000);  // 2 busy cores: the UIs' bundles load slowly
  page.setDefaultNavigationTimeout(180000);

  // 1. The run form: sources filled in, the method dropdown open (a field of the form is a
  // .schema-form-property labelled by its name; an optional one first asks which type).
  await page.goto(`${prefect}/deployments/deployment/${ids.deployment}/run`);
  await settle(page, 3000);
  const field = (name) => page.locator(".schema-form-property", { has: page.locator(
    ".schema-form-property__label", { hasText: new RegExp(`^${name}( \\(Optional\\))?$`, "i") }) }).last();
  const choose = async (name, variant) => {
    await field(name).locator(".p-button-group button", { hasText: new RegExp(`^${variant}$`) }).first().click();
    await page.waitForTimeout(300);
  };
  await choose("sources", "Sources");
  await field("base").locator("textarea, input").first().fill("zoo:math");
  await field("secondary").locator("button", { hasText: "Add item" }).click();
  await field("secondary").locator("textarea, input").first().fill("zoo:strings");
  await choose("reference", "str");
  await field("reference").locator("textarea, input").first().fill("zoo:base");
  await choose("method", "str");
  await field("sources").evaluate((el) => el.scrollIntoView({ block: "start" }));
  await field("method").locator(".p-select-button__control").focus();
  await page.keyboard.press("ArrowDown");  // opens the options (a click only focuses it headless)
  await page.waitForTimeout(1000);
  await page.screenshot({ path: `${out}/prefect-run-form.png` });

  // 2. The first night's flow-run graph.
  await page.goto(`${prefect}/runs/flow-run/${ids.night}`);
  await settle(page, 6000);
  await page.screenshot({ path: `${out}/prefect-night-graph.png` });

  // 3. MLflow's runs view (the "Model training" side): the candidates of both nights, their parents
  // expanded, the compare.* columns the pipeline logs side by side.
  const filter = encodeURIComponent("tags.kind = 'merge'");
  await page.goto(`${mlflow}/#/experiments/${ids.experiment}/runs?workflowType=machine_learning` +
                  `&searchFilter=${filter}`);
  await settle(page, 4000);
  const assistant = page.locator("button[aria-label='Close']");
  if (await assistant.count()) await assistant.first().click();
  const expanders = page.locator("button[data-component-id*='runnamecellrenderer']");
  for (let i = (await expanders.count()) - 1; i >= 0; i--) {
    await expanders.nth(i).click();
    await page.waitForTimeout(1500);
  }
  await page.getByText("Columns", { exact: true }).first().click();
  await page.waitForTimeout(1500);
  for (const name of ["Dataset", "Source", "Models"]) await page.getByText(name, { exact: true }).last().click();
  for (const name of ["decision", "toy_math.exact_match", "toy_strings.exact_match", "repetition_rate",
                      "refusal_rate", "sparsity"]) {
    await page.getByText(`compare.${name}`, { exact: true }).last().click();
    await page.waitForTimeout(300);
  }
  await page.keyboard.press("Escape");
  await settle(page, 1500);
  await page.screenshot({ path: `${out}/mlflow-runs-compared.png` });
  await browser.close();
})().catch((err) => { console.error(err); process.exit(1); });
JS

say "taking the screenshots"
PLAYWRIGHT=$NODE_DIR/node_modules/playwright-core IDS=$TMP/ids.json CHROMIUM=$CHROMIUM OUT=$OUT \
    PREFECT_UI=http://127.0.0.1:$PREFECT_PORT MLFLOW_UI=http://127.0.0.1:$MLFLOW_PORT \
    node "$TMP/shots.cjs"
for png in prefect-run-form prefect-night-graph mlflow-runs-compared; do
    size=$(stat -c %s "$OUT/$png.png")
    say "$OUT/$png.png ($((size / 1024)) KB)"
done
