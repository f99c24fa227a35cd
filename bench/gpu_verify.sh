#!/usr/bin/env bash
# After changes to the profiler, planner, memory model and report, in two device calls of under 10 minutes:
#   a: the NVML/CUDA_VISIBLE_DEVICES check, a fresh profile, the memory spot checks (all-linear, target subsets)
#      and the GPU tests;
#   b: the memory spot check of Qwen3 and two mixtures of experts, and a 5-step demo run through `elite-tui run`;
#   c: the spot checks of DeepSeek-V2-Lite and gpt-oss-20b at 12 layers and StarCoder2-3B (memory_spot_check --dense).
# Usage: bash bench/gpu_verify.sh OUT_DIR a|b|c
set -uo pipefail
out=${1:-/tmp/elite-verify}
part=${2:-a}
runs=/tmp/elite-verify-runs
rm -rf "$runs"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-$part.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu-$part.txt"
if [ "$part" = a ]; then
    python3 bench/nvml_visible_check.py 2>&1 | tee "$out/nvml-visible.txt"
    python3 -m elite_tui.cli profile --output $runs --reprofile > "$out/profile.json" 2> "$out/profile.err"; echo "profile rc=$?"
    python3 -m elite_tui.cli plan --output $runs 2>&1 | tee "$out/plan-demo.txt"
    PYTHONPATH=$PYTHONPATH:. python3 bench/memory_spot_check.py "$out/spot-all-linear.jsonl" 2>&1 | grep -v Warn | tail -4 | tee "$out/spot.txt"
    PYTHONPATH=$PYTHONPATH:. python3 bench/memory_spot_check.py "$out/spot-targets.jsonl" --targets 2>&1 | grep -v Warn | tail -12 | tee -a "$out/spot.txt"
    echo "spot checks done at $SECONDS s"
    timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -15 | tee "$out/gpu-tests.txt"
    echo "tests done at $SECONDS s"
elif [ "$part" = c ]; then
    PYTHONPATH=$PYTHONPATH:. timeout 500 python3 bench/memory_spot_check.py "$out/spot-dense.jsonl" --dense 2>&1 | grep -v Warn | tail -8 | tee "$out/spot-dense.txt"
else
    PYTHONPATH=$PYTHONPATH:. timeout 330 python3 bench/memory_spot_check.py "$out/spot-moe.jsonl" --moe 2>&1 | grep -v Warn | tail -12 | tee "$out/spot-moe.txt"
    echo "moe spot check done at $SECONDS s"
    timeout 240 python3 -m elite_tui.cli run --repo . --output $runs --max-steps 5 --run-name demo-gpu \
        --set compile_eval_prompts=2 2>&1 | tail -40 | tee "$out/run-demo.txt"
    echo "demo done at $SECONDS s"
    cp $runs/demo-gpu/report.md "$out/report-demo.md" 2>/dev/null
fi
exit 0
