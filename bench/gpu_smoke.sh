#!/usr/bin/env bash
# One short run of the whole headless path on a GPU: profile, plan, the demo model, and a random-initialised
# Qwen2.5-Coder-1.5B saved with save_pretrained. Usage: bash bench/gpu_smoke.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/elite-smoke}
runs=/tmp/elite-smoke-runs
rm -rf "$runs"  # fresh runs each call: elite-tui refuses a directory a run started in
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m elite_tui.cli profile --output $runs --reprofile > "$out/profile.json"; echo "profile rc=$?"
python3 -m elite_tui.cli plan --output $runs 2>&1 | tee "$out/plan-demo.txt"
# Two compile-rate prompts, not the default 8: the whole script fits one 10-minute device call (it took over 420 s).
python3 -m elite_tui.cli run --repo . --output $runs --max-steps 5 --run-name demo-gpu --set compile_eval_prompts=2 \
    2>&1 | tee "$out/run-demo.txt"
echo "demo done at $SECONDS s"
python3 - <<'PY'
import torch
from transformers import AutoModelForCausalLM
from bench.reference_models import reference_config
from elite_core.demo_model import demo_tokenizer
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(reference_config("Qwen2.5-Coder-1.5B"), dtype=torch.bfloat16)
model.save_pretrained("/tmp/qwen-1.5b-random")
demo_tokenizer().save_pretrained("/tmp/qwen-1.5b-random")
PY
python3 -m elite_tui.cli plan --model /tmp/qwen-1.5b-random --output $runs 2>&1 | tee "$out/plan-qwen.txt"
python3 -m elite_tui.cli run --model /tmp/qwen-1.5b-random --repo . --output $runs --tier 3 --max-steps 3 \
    --run-name qwen-gpu --set compile_eval_prompts=2 2>&1 | tee "$out/run-qwen.txt"
echo "qwen done at $SECONDS s"
cp $runs/demo-gpu/report.md "$out/report-demo.md" 2>/dev/null
cp $runs/qwen-gpu/report.md "$out/report-qwen.md" 2>/dev/null
tail -20 $runs/qwen-gpu/child.log > "$out/child-qwen.log" 2>/dev/null
exit 0
