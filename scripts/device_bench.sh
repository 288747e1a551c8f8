#!/usr/bin/env bash
# Benchmark the core engine on one GPU, in one command that ends within 290 s.
#
#   scripts/device_bench.sh OUT [SCALE] [OPTION...]
#
# Runs `python3 -m scripts.bench_device --scale SCALE --out OUT [OPTION...]` (SCALE: gpu,
# the default; tiny for a check of everything on a CPU in seconds) under `timeout`. OUT
# gets bench.md and bench.json (rewritten after each measurement, so a run stopped by the
# timeout keeps what it measured) and log.txt. The exit status is the benchmark's: not 0
# when a measurement failed or the time ran out.
# Wheels in .whl/, if any, are installed first, for a machine without a package index.
set -euo pipefail
out=${1:?usage: scripts/device_bench.sh OUT [SCALE] [OPTION...]}
scale=${2:-gpu}
shift $(($# < 2 ? $# : 2))
limit=290
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1

source "$(dirname "$0")/carried_wheels.sh"
install_carried_wheels /tmp/bench-site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# TERM 10 s before the limit, KILL 5 s later if it is still running.
left=$((limit - SECONDS - 10))
if ((left <= 0)); then
    echo "no time left to benchmark after $SECONDS s"
    exit 124
fi
status=0
timeout --signal=TERM --kill-after=5 "$left" \
    python3 -m scripts.bench_device --scale "$scale" --out "$out" "$@" || status=$?
if ((status == 124 || status == 137)); then
    echo "stopped by the time limit after $SECONDS s; bench.md holds what was measured"
fi
echo "exit $status after $SECONDS s"
exit "$status"
