#!/usr/bin/env bash
# Fine-tunes of the pretrained demo model as a user's run makes them (grad_accum auto, about 32K tokens per update),
# on repositories it never saw, for bench/projection_accuracy.py to score from their fixtures. Each run writes its own
# fixture line to OUT as soon as it ends, so a call cut short keeps the runs it finished.
# Usage: bash bench/projection_gpu.sh OUT "LABEL:REPO:TIER:SEED:STEPS[:FIELD=VALUE,...]" ...
# (the optional overrides replace grad_accum auto, e.g. micro_batch=4,grad_accum=7 for 4 times the tokens per update)
set -uo pipefail
out=$1; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
for spec in "$@"; do
    IFS=: read -r label repo tier seed steps overrides <<< "$spec"
    settings=(--set warmup_steps=10)
    IFS=, read -ra extra <<< "${overrides:-grad_accum=0}"
    for setting in "${extra[@]}"; do settings+=(--set "$setting"); done
    runs=/tmp/projection-gpu/$label-t$tier-s$seed-n$steps
    rm -rf "$runs"; mkdir -p "$(dirname "$runs")"
    start=$(date +%s)
    python3 bench/projection_accuracy.py --repo "$repo" --seeds "$seed" --tiers "$tier" --steps "$steps" \
        "${settings[@]}" --runs-dir "$runs" --out "$runs/score" \
        --fixture "$runs/fixture.jsonl" > "$runs.stdout" 2>&1
    rc=$?
    echo "$label tier $tier seed $seed steps $steps ${overrides:-}: rc=$rc in $(( $(date +%s) - start )) s"
    if [ -f "$runs/fixture.jsonl" ]; then
        sed "s/\"runs_dir\":\"[^\"]*\"/\"runs_dir\":\"$label\"/" "$runs/fixture.jsonl" >> "$out/fixture.jsonl"
        tail -n 3 "$runs/score.txt"
    else
        tail -n 20 "$runs.stdout"; tail -n 20 "$runs"/*.log 2>/dev/null
    fi
done
