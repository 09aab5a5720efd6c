#!/bin/bash
# The GPU rows of the speed tables in docs/results.md in one go (what ran on one H200 as a single device call):
#   RUN=demo_full/runs/diffusion DATA=demo_full/data OUT=/tmp/gpu_checks bash benchmarks/gpu_checks.sh
# sampling_speed.py on the demo's diffusion run (batch 16 with the extra rows, batch 64), unet_scale_speed.py on the
# base preset's UNet, decode_throughput.py at batch 16 and 64. JSONs and one log land in OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
RUN=${RUN:?set RUN to a diffusion run} DATA=${DATA:?set DATA to its prepared dataset}
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"; L=$OUT/all.log
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
  python3 -c "import sys, torch, monai, transformers; print(sys.version.split()[0], torch.__version__, monai.__version__, transformers.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee -a "$L"
echo "== sampling_speed batch 16" | tee -a "$L"
timeout 170 python3 benchmarks/sampling_speed.py --run "$RUN" --data "$DATA" --device cuda --out "$OUT/sampling_speed_cuda.json" 2>&1 | grep -v Warning | tee -a "$L"
echo "== sampling_speed batch 64" | tee -a "$L"
timeout 90 python3 benchmarks/sampling_speed.py --run "$RUN" --data "$DATA" --device cuda --batch 64 --no-extra --out "$OUT/sampling_speed_cuda_b64.json" 2>&1 | grep -v Warning | tee -a "$L"
echo "== unet_scale_speed" | tee -a "$L"
timeout 150 python3 benchmarks/unet_scale_speed.py --device cuda --out "$OUT/unet_scale_speed_cuda.json" 2>&1 | tee -a "$L"
echo "== decode_throughput" | tee -a "$L"
timeout 120 python3 benchmarks/decode_throughput.py --device cuda --batch 16 64 --out "$OUT/decode_throughput_cuda.json" 2>&1 | tee -a "$L"
echo "== done" | tee -a "$L"
