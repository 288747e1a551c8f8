#!/usr/bin/env bash
# Train the toy preset on one GPU and pack the run for shipping, within a time limit.
#
#   scripts/gpu_toy.sh OUT [SCALE] [SECONDS]
#
# Runs the steps of `python -m core.toy.build` in runs/toy-SCALE (SCALE: full, the
# default; smoke for a dry run on a CPU). Training always finishes (its recipe fits a
# wall-clock budget); the SAE, dictionary, strengths and check steps stop once SECONDS (default 470)
# have passed since the start, and what is left resumes later with the same command.
# After each step OUT gets toy.tar.part-* (the run folder without training caches, in
# 15 MiB pieces), log.txt and timings.json. Unpack with
#     cat OUT/toy.tar.part-* | tar -x -C runs/
# Wheels in .whl/, if any, are installed first, for a machine without a package index.
set -euo pipefail
out=${1:?usage: scripts/gpu_toy.sh OUT [SCALE] [SECONDS]}
scale=${2:-full}
limit=${3:-470}
run=runs/toy-$scale
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1

source "$(dirname "$0")/carried_wheels.sh"
install_carried_wheels /tmp/toy-site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_MININTERVAL=10

pack() {
    rm -f "$out"/toy.tar.part-*
    tar -c -C runs --exclude='*.pt' --exclude=latents.safetensors --exclude=sae_run \
        "toy-$scale" | split -b 15M - "$out/toy.tar.part-"
    cp "$run/timings.json" "$out/" 2>/dev/null || true
    echo "packed $(du -ch "$out"/toy.tar.part-* | tail -1 | cut -f1) after $SECONDS s"
}

python3 -m core.toy.build train --out "$run" --scale "$scale"
pack
for step in saes dictionary strengths check; do
    left=$((limit - SECONDS))
    if ((left < 10)); then
        echo "stopped before $step: $SECONDS s of $limit s used"
        break
    fi
    status=0
    timeout --signal=TERM --kill-after=20 "$left" \
        python3 -m core.toy.build "$step" --out "$run" --scale "$scale" || status=$?
    pack
    if ((status != 0)); then
        echo "$step stopped (exit $status) after $SECONDS s"
        break
    fi
done
echo "done in $SECONDS s"
