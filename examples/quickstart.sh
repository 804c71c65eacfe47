#!/usr/bin/env bash
# The main job: train the digits-quick preset on CPU, sample, evaluate, write a picture.
set -euo pipefail
RUN=${RUN:-runs/digits-quick}
OUT=${OUT:-out/digits-quick}
difflab train --preset digits-quick --run-dir "$RUN"
difflab generate --network "$RUN" --seeds 0-63 --outdir "$OUT"
difflab fid ref --data digits --dest refs/digits.npz --features
difflab fid calc --network "$RUN" --ref refs/digits.npz --num 1000 --metrics fid,kid,pr
echo "Sample grid: $OUT/grid.png (training snapshots: $RUN/samples-*.png)"
