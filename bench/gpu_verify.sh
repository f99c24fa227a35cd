#!/usr/bin/env bash
# After changes to the profiler, planner and report: the NVML/CUDA_VISIBLE_DEVICES check, a fresh profile, the GPU
# tests and a 5-step demo run through `elite-tui run`. Usage: bash bench/gpu_verify.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/elite-verify}
runs=/tmp/elite-verify-runs
rm -rf "$runs"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
git rev-parse --short HEAD | tee -a "$out/gpu.txt"
python3 bench/nvml_visible_check.py 2>&1 | tee "$out/nvml-visible.txt"
python3 -m elite_tui.cli profile --output $runs --reprofile > "$out/profile.json" 2> "$out/profile.err"; echo "profile rc=$?"
python3 -m elite_tui.cli plan --output $runs 2>&1 | tee "$out/plan-demo.txt"
PYTHONPATH=$PYTHONPATH:. python3 bench/memory_spot_check.py "$out/spot-all-linear.jsonl" 2>&1 | tail -4 | tee "$out/spot.txt"
PYTHONPATH=$PYTHONPATH:. python3 bench/memory_spot_check.py "$out/spot-targets.jsonl" --targets 2>&1 | tail -12 | tee -a "$out/spot.txt"
echo "spot checks done at $SECONDS s"
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -15 | tee "$out/gpu-tests.txt"
echo "tests done at $SECONDS s"
python3 -m elite_tui.cli run --repo . --output $runs --max-steps 5 --run-name demo-gpu --set compile_eval_prompts=2 \
    2>&1 | tail -40 | tee "$out/run-demo.txt"
echo "demo done at $SECONDS s"
cp $runs/demo-gpu/report.md "$out/report-demo.md" 2>/dev/null
exit 0
