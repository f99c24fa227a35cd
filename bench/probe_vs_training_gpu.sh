#!/usr/bin/env bash
# Does the training run what the pre-flight probe confirmed? For each tier given, one short `elite-tui run` of a
# random-initialised model (saved with save_pretrained), then a table: the memory model's prediction at the confirmed
# micro-batch, the probe's peak and rate, the training steps' peak and rate. Ratios last.
# Usage: bash bench/probe_vs_training_gpu.sh OUT_DIR [MODEL [TIERS...]]   (default Qwen2.5-Coder-1.5B, tiers 1 2 3;
# MODEL demo: the embedded demo model, nothing built)
# Environment: STEPS (training steps a run, default 4), RUN_TIMEOUT (seconds a run may take, default 300), RUN_ARGS
# (more `elite-tui run` arguments for every run, e.g. "--set qlora=true"), RUN_COMMAND (what runs each tier, default
# `python3 -m elite_tui.cli run`; `python3 bench/child_exit.py` also times the child's exit after its report).
set -uo pipefail
out=${1:-/tmp/elite-probe-vs-training}; model=${2:-Qwen2.5-Coder-1.5B}; shift $(( $# > 2 ? 2 : $# ))
tiers=${*:-1 2 3}
runs=/tmp/elite-probe-runs; weights=/tmp/random-$model
[ "$model" = demo ] && weights=demo
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MODEL=$model WEIGHTS=$weights
[ "$model" = demo ] || python3 - <<'PY'
import os, torch
from transformers import AutoModelForCausalLM
from bench.reference_models import reference_config
from elite_core.demo_model import demo_tokenizer
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(reference_config(os.environ["MODEL"]), dtype=torch.bfloat16)
model.save_pretrained(os.environ["WEIGHTS"])
demo_tokenizer().save_pretrained(os.environ["WEIGHTS"])
PY
for tier in $tiers; do
    rm -rf "$runs/tier-$tier"  # a fresh run each call: elite-tui refuses a directory a run started in
    timeout "${RUN_TIMEOUT:-300}" ${RUN_COMMAND:-python3 -m elite_tui.cli run} --model "$weights" --repo . --output $runs --tier "$tier" --max-steps "${STEPS:-4}" \
        --run-name "tier-$tier" --set compile_eval_prompts=0 ${RUN_ARGS:-} > "$out/run-tier-$tier.txt" 2>&1
    echo "tier $tier rc=$? at $SECONDS s"
done
python3 - "$runs" $tiers <<'PY' | tee "$out/probe-vs-training.txt"
import json, subprocess, sys
from pathlib import Path
from elite_core import protocol
from elite_core.config import RunConfig
from elite_core.probe import PROBE_FILE, ProbeResult, options_mismatch
from elite_core.runs import read_events
runs, tiers = Path(sys.argv[1]), sys.argv[2:]
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
print(f"probe vs training on 1 x {gpu}; steps after the first (compile and warm-up excluded)")
print(f"{'tier':>4} {'window':>7} {'mb':>3} {'compiled':>8} {'predicted':>10} {'probe':>10} {'steps':>10} "
      f"{'probe tok/s':>12} {'steps tok/s':>12} {'pred/steps':>10} {'probe/steps mem':>15} {'probe/steps rate':>16}")
gib = 1024**3
for tier in tiers:
    run = runs / f"tier-{tier}"
    events = read_events(run) if run.is_dir() else []
    probe = ProbeResult.load(run / PROBE_FILE)
    if probe is None or not any(isinstance(e, protocol.Finished) for e in events):
        print(f"{tier:>4} did not finish: see run-tier-{tier}.txt")
        continue
    config = RunConfig.load(run / "config.yaml")
    options = tuple(json.loads((run / "plan.json").read_text())["options"])
    started = next(e for e in events if isinstance(e, protocol.Started))
    steps = [e for e in events if isinstance(e, protocol.StepMetrics)][1:]
    peak = max(e.memory_bytes for e in steps)
    rate = sum(e.tokens_per_s for e in steps) / len(steps)
    mismatch = options_mismatch(run, options)
    if mismatch:
        print(f"{tier:>4} {mismatch}")
    print(f"{tier:>4} {config.window_tokens:>7,} {config.micro_batch:>3} {str('compiled' in options):>8} "
          f"{started.predicted_peak_bytes / gib:>8.1f} G {probe.peak_bytes / gib:>8.1f} G {peak / gib:>8.1f} G "
          f"{probe.tokens_per_s:>12,.0f} {rate:>12,.0f} {started.predicted_peak_bytes / peak:>10.3f} "
          f"{probe.peak_bytes / peak:>15.3f} {probe.tokens_per_s / rate:>16.3f}")
PY
exit 0
