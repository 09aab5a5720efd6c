#!/bin/bash
# Experiment (run on one H200 in one go; works on any machine): does resolution fix small findings? AdaMatch demo preset at 256 px (grid 16 and grid 8)
# against 128 px grid 8, 400 steps each, scored on the test split (pointing game per (image, word) pair).
# WORKERS (phantom build processes, default 16) and LOADERS (data-loader workers, default 6) size it to the machine.
set -o pipefail
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT=${OUT:-/tmp/adamatch_resolution}; mkdir -p $OUT; L=$OUT/all.log
M="python3 -m medvl.cli"
for size in 256 128; do
  /usr/bin/time -f "phantom $size: %e s" timeout 120 $M prepare phantom --out /tmp/ph$size --size $size --workers ${WORKERS:-16} 2>&1 | tail -3 | tee -a $L
done
run() {  # name size grid
  /usr/bin/time -f "$1 train: %e s" timeout 200 $M train adamatch --config demo --data /tmp/ph$2 --out /tmp/$1 \
    --set model.image_size=$2 --set model.patches.grid=$3 --set train.num_workers=${LOADERS:-6} 2>&1 | grep -E "^step|Error|error|train:" | tee -a $L
  timeout 60 $M evaluate adamatch --run /tmp/$1 --data /tmp/ph$2 --split test --out $OUT/$1_test.json 2>&1 | tail -2 | tee -a $L
  python3 -c "import json;d=json.load(open('$OUT/$1_test.json'));print('$1', {k:round(v,3) for k,v in d.items() if k.startswith('localization.') and 'per_finding' not in k})" | tee -a $L
}
run px256_g16 256 16
run px256_g8 256 8
run px128_g8 128 8
echo "== done" | tee -a $L
