"""The demo model's GPU memory: the fixed allocator floor (before) against the floor a share of a small allocation
(now), scored on measured H200 steps, side by side.

    python bench/demo_memory_floor.py > bench/results/demo-memory-floor-h200.txt

Measured points: the bench steps of bench/compiled_memory_gpu.py (--points 7x1 3x2 1x3, expandable segments; their
measured_gib, the third step's peak reserved + what lives outside torch) and the training steps of `elite-tui run`
at tiers 1-3 (bench/probe_vs_training_gpu.sh, probe-vs-training-h200/demo-memory-floor/). The runs' peaks are kept in
demo-memory-floor-runs.jsonl: the prediction of the tree they ran (3f6cd0c) over the table's pred/steps ratio, so they
do not move when the model changes (that ratio has 3 decimals: tier 2's run, +5.0 %, is +4.95 .. +5.05 %).
Predictions are made here for the planner's setup of each point on the H200's recorded profile.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rate_accuracy import load_profile  # noqa: E402
from elite_core.config import default_config  # noqa: E402
from elite_core.memory_model import DEFAULT_CONSTANTS, predict_memory, shape_from_hf_config  # noqa: E402
from elite_core.model_loading import load_hf_config  # noqa: E402
from elite_core.planner import plan_for_config  # noqa: E402

GIB = 1024**3
RESULTS = ROOT / "bench" / "results"
BENCH_STEPS = RESULTS / "compiled-memory-h200-floor.jsonl"
RUNS = RESULTS / "demo-memory-floor-runs.jsonl"
HARDWARE = RESULTS / "memory-h200-planned-hardware.json"
FIXED_FLOOR = replace(DEFAULT_CONSTANTS, cuda_allocator_floor_fraction=float("inf"))


def within_5_percent(errors: list[float]) -> int:
    return sum(abs(error) <= 5.0 for error in errors)


def main() -> int:
    hardware = load_profile(HARDWARE)
    shape = shape_from_hf_config(load_hf_config("demo"), name="demo")

    def setup_of(tier: int, micro_batch: int, compiled: bool):
        config = default_config(model="demo", micro_batch=micro_batch, compile_layers="on" if compiled else "off",
                                device="cuda").with_tier(tier)
        return plan_for_config(shape, hardware, config).setup

    rows = []
    for source, path in (("bench", BENCH_STEPS), ("run", RUNS)):
        for row in map(json.loads, path.read_text().splitlines()):
            setup = setup_of(row["tier"], row["micro_batch"], row["compiled"])
            rows.append((source, row["tier"], row["micro_batch"], row["compiled"], row["measured_gib"], setup))

    print(f"the demo model on 1 x NVIDIA H200 (expandable segments): {len(rows)} measured points")
    print(f"{'source':6} {'tier':>4} {'mb':>3} {'mode':8} {'allocated':>9} {'measured':>8} {'fixed floor':>11} "
          f"{'share floor':>11} {'error before':>12} {'error now':>9}   (GiB; allocated: the model's)")
    errors_before, errors_now = [], []
    for source, tier, micro_batch, compiled, measured, setup in rows:
        now = predict_memory(shape, setup)
        before = predict_memory(shape, setup, FIXED_FLOOR).total_bytes / GIB
        allocated = (now.total_bytes - now.overhead_bytes) / GIB
        error_before, error_now = 100 * (before / measured - 1), 100 * (now.total_bytes / GIB / measured - 1)
        errors_before.append(error_before)
        errors_now.append(error_now)
        print(f"{source:6} {tier:>4} {micro_batch:>3} {'compiled' if compiled else 'eager':8} {allocated:>9.3f} "
              f"{measured:>8.3f} {before:>11.3f} {now.total_bytes / GIB:>11.3f} {error_before:>+11.1f}% {error_now:>+8.1f}%")
    print(f"max |error|: fixed floor {max(map(abs, errors_before)):.1f} %, share floor {max(map(abs, errors_now)):.1f} %; "
          f"within 5 %: {within_5_percent(errors_before)}/{len(rows)} before, {within_5_percent(errors_now)}/{len(rows)} now; "
          f"floor share {DEFAULT_CONSTANTS.cuda_allocator_floor_fraction}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
