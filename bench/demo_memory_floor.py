"""The demo model's GPU memory: the fixed allocator floor (before) against the floor a share of a small allocation
(now), scored on measured H200 steps, side by side.

    python bench/demo_memory_floor.py > bench/results/demo-memory-floor-h200.txt

Measured points: the bench steps of bench/compiled_memory_gpu.py (--points 7x1 3x2 1x3, expandable segments; their
measured_gib, the third step's peak reserved + what lives outside torch) and the training steps of `elite-tui run`
at tiers 1-3 (bench/probe_vs_training_gpu.sh; their peak is read back from the pred/steps column against the
prediction the run printed, the memory model of the tree it ran). Predictions are made here for the planner's setup of
each point on the H200's recorded profile.
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
RUNS = RESULTS / "probe-vs-training-h200" / "demo-memory-floor" / "probe-vs-training.txt"
HARDWARE = RESULTS / "memory-h200-planned-hardware.json"
FIXED_FLOOR = replace(DEFAULT_CONSTANTS, cuda_allocator_floor_fraction=float("inf"))


def _run_points() -> list[tuple[str, int, int, bool, float]]:
    """(source, tier, micro-batch, compiled, measured GiB) of each finished run: the run printed its prediction with
    today's model, so its steps' peak is that prediction over the pred/steps ratio."""
    points = []
    for line in RUNS.read_text().splitlines():
        fields = line.split()
        # tier window mb compiled predicted G probe G steps G probe-tok/s steps-tok/s pred/steps ...
        if len(fields) < 13 or not fields[0].isdigit() or fields[3] not in ("True", "False"):
            continue
        points.append(("run", int(fields[0]), int(fields[2]), fields[3] == "True", float(fields[12])))
    return points


def main() -> int:
    hardware = load_profile(HARDWARE)
    shape = shape_from_hf_config(load_hf_config("demo"), name="demo")

    def setup_of(tier: int, micro_batch: int, compiled: bool):
        config = default_config(model="demo", micro_batch=micro_batch, compile_layers="on" if compiled else "off",
                                device="cuda").with_tier(tier)
        return plan_for_config(shape, hardware, config).setup

    rows = []
    for row in map(json.loads, BENCH_STEPS.read_text().splitlines()):
        setup = setup_of(row["tier"], row["micro_batch"], row["compiled"])
        rows.append(("bench", row["tier"], row["micro_batch"], row["compiled"], row["measured_gib"], setup))
    for source, tier, micro_batch, compiled, ratio in _run_points():
        setup = setup_of(tier, micro_batch, compiled)
        rows.append((source, tier, micro_batch, compiled, predict_memory(shape, setup).total_bytes / GIB / ratio, setup))

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
    within = sum(abs(error) <= 5.0 for error in errors_now)
    print(f"max |error|: fixed floor {max(map(abs, errors_before)):.1f} %, share floor {max(map(abs, errors_now)):.1f} %; "
          f"within 5 %: {sum(abs(e) <= 5.0 for e in errors_before)}/{len(rows)} before, {within}/{len(rows)} now; "
          f"floor share {DEFAULT_CONSTANTS.cuda_allocator_floor_fraction}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
