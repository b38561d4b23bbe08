#!/usr/bin/env bash
# Takes the screenshots in docs/img/ from a real run: a one-node `ray start` cluster with a metrics
# port, Prometheus scraping it through Ray's service-discovery file, the demo job submitted with
# `aha submit`, then headless Chromium on Prometheus's graph view (the job's ray_aha_* series) and
# on the Ray dashboard (the job and its actor pools).
#
#   bash docs/tools/screenshot_metrics.sh            # needs: .venv (make install), prometheus, chromium
#
# Everything it starts lives under $TMP and is ended at exit by that path (never `ray stop`, which
# would stop every Ray instance of the machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
TMP=${TMP_SHOT:-/tmp/ahashot}
OUT=$ROOT/docs/img
RAYPORT=6390 DASH=8275 METRICS=8090 PROM=9095
{ command -v prometheus && command -v chromium; } >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus chromium; }
CHROME=$(command -v chromium || command -v chromium-browser || command -v google-chrome)

cleanup() {
  pkill -f -- "$TMP" 2>/dev/null || true
  sleep 2
  pkill -9 -f -- "$TMP" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
rm -rf "$TMP" && mkdir -p "$TMP" "$OUT"

export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_metrics_report_interval_ms=1000
export RAY_PROMETHEUS_HOST=http://127.0.0.1:$PROM
export PATH=$BIN:$PATH
ray start --head --port=$RAYPORT --dashboard-port=$DASH --include-dashboard=true --num-cpus=4 \
  --metrics-export-port=$METRICS --temp-dir="$TMP/ray" --disable-usage-stats >/dev/null

cat > "$TMP/prometheus.yml" <<EOF
global: {scrape_interval: 2s, evaluation_interval: 2s}
scrape_configs:
  - job_name: ray
    file_sd_configs: [{files: ['$TMP/ray/prom_metrics_service_discovery.json']}]
EOF
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/prom" \
  --web.listen-address=127.0.0.1:$PROM >"$TMP/prometheus.log" 2>&1 &

# The demo job, submitted through the Jobs API and driven the way a user drives it.
A=(--address http://127.0.0.1:$DASH)
aha submit cluster/configs/demo.yaml stages.1.steps=80 run.name=shot run.root="$TMP/runs" \
  --job-id aha-shot --no-follow "${A[@]}"
step() {  # the GRPO stage's last logged step, from the run's metrics.jsonl (the head is this machine)
  "$BIN/python" - "$TMP/runs/shot/metrics.jsonl" <<'PY'
import json, os, sys
rows = [json.loads(x) for x in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
print(max([r["step"] for r in rows if r.get("stage") == "1-grpo"], default=0))
PY
}
wait_step() {  # wait_step N: until the GRPO stage reaches step N (20 minutes at most)
  local t=0; until [ "$(step)" -ge "$1" ]; do
    sleep 5; t=$((t + 5)); [ $t -lt 1200 ] || { aha status aha-shot "${A[@]}"; exit 1; }; done; }
wait_step 25
aha status aha-shot "${A[@]}"
aha scale aha-shot rollout=2 "${A[@]}"
wait_step 55
aha status aha-shot "${A[@]}"
shot() {  # shot NAME URL
  "$CHROME" --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,${HEIGHT:-1400} \
    --virtual-time-budget=15000 --screenshot="$OUT/$1.png" "$2" 2>/dev/null
  echo "wrote docs/img/$1.png"
}
enc() { "$BIN/python" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1"; }
g() { echo "&g$1.range_input=${RANGE:-6m}&g$1.tab=0&g$1.expr=$(enc "$2")"; }  # one graph of the page
P="http://127.0.0.1:$PROM/graph/?"  # Debian's build serves Prometheus's classic UI
shot ray_dashboard_actors "http://127.0.0.1:$DASH/#/actors"
shot ray_dashboard_jobs "http://127.0.0.1:$DASH/#/jobs"
aha logs aha-shot "${A[@]}" | tail -3
aha status aha-shot "${A[@]}"
shot prometheus_reward_pools "$P$(g 0 'max by (run, stage) (ray_aha_reward_mean)')$(g 1 'max by (run, stage, pool) (ray_aha_pool_size)')"
shot prometheus_throughput_phases "$P$(g 0 'sum by (run, stage) (rate(ray_aha_samples_trained_total[30s]))')$(g 1 'max by (run, stage, phase) (ray_aha_phase_seconds{stage="1-grpo"})')"
