"""The tier table's training speed before any probe: the planner's step-time estimate against measured steps.

The table shows each tier's tokens/s and epoch time from elite_core.planner.estimate_step_time_s (the measured matmul
peak, a launch-bound time per layer pass, factors for the engine's options) until a pre-flight probe measures one tier;
then every other tier is scaled by that tier's measured/estimated ratio. So both the level and the shape across tiers
matter. This scores the shipped constants (planner.STEP_TIME) beside the ones before them (planner.STEP_TIME_BEFORE),
through the same formula, on:

- the fit set: the H100's recorded engine steps (bench/results/memory-h100*.jsonl, 144 points without DeepSpeed, offloaded
  checkpoints or the tiled MLP: the offload rows predate the overlapped copies, the tiled rows are 3);
- `elite-tui run` on an H200: the training steps of the probe-vs-training runs (rate-heldout-h200-runs.jsonl, read off
  bench/results/probe-vs-training-h200/; each tier re-planned as its run planned it, at the micro-batch its probe found);
- the planner's own fitting tiers of two architectures no constant was fitted on, run on an H200
  (`memory_accuracy.py run --set planned`: bench/results/memory-h200-planned.jsonl);
- the embedded demo model through `elite-tui run` on an H200, tiers 1-7 (rate-heldout-h200-demo.jsonl, read off
  bench/results/probe-vs-training-h200/demo/): 2 layers, head dimension 32, where the fit set's models have 128. Its
  tiers 1-3 (steps of 17-20 ms) fit the fixed cost per step; tiers 4-7 are held out.

    python bench/rate_accuracy.py                 # the tables; --fit also refits the constants on the fit set
    python bench/rate_accuracy.py --fit --out bench/results/rate-accuracy-h200.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import sys
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from bench.memory_accuracy import point_of, setup_for  # noqa: E402
from bench.reference_models import reference_config  # noqa: E402
from elite_core.config import DEMO_MODEL, default_config  # noqa: E402
from elite_core.demo_model import demo_model_config  # noqa: E402
from elite_core.hardware import HardwareProfile  # noqa: E402
from elite_core.memory_model import attention_flops_per_step, shape_from_hf_config, training_flops_per_step  # noqa: E402
from elite_core.planner import STEP_TIME, STEP_TIME_BEFORE, StepTimeConstants, estimate_step_time_s, plan_tiers  # noqa: E402

RESULTS = PROJECT_ROOT / "bench" / "results"
FIXED_COST_MAX_WINDOW = 18432
"""The demo's tiers up to this window (1-3: 17-20 ms steps) fit the per-step fixed cost; its longer ones are held out."""


@dataclasses.dataclass(frozen=True)
class MeasuredStep:
    label: str
    shape: object
    setup: object
    profile: HardwareProfile
    step_s: float

    @property
    def tokens(self) -> int:
        return self.setup.micro_batch * self.setup.seq_tokens

    def estimate_s(self, constants: StepTimeConstants) -> float:
        return estimate_step_time_s(self.shape, self.setup, self.profile, 1, constants)


def load_profile(path: Path) -> HardwareProfile:
    data = json.loads(path.read_text())
    data.pop("wall_s", None)  # the benchmark's own timing of the profiler, not a profile field
    return HardwareProfile.from_dict(data)


def _shape(model: str):
    if model == DEMO_MODEL:
        return shape_from_hf_config(demo_model_config(), name=model)
    return shape_from_hf_config(reference_config(model), name=model)


def engine_steps(paths: list[Path], profile: HardwareProfile, fit_set: bool) -> list[MeasuredStep]:
    steps = []
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if not row.get("ok") or not row.get("step_s") or row.get("deepspeed", "off") != "off":
                continue
            if fit_set and (row["checkpointing"] == "offload" or row.get("tiled_mlp")):
                continue
            point = point_of(row)
            label = f"{point.model} {point.seq:,} {','.join(point.options)}"
            steps.append(MeasuredStep(label, _shape(point.model), setup_for(point), profile, row["step_s"]))
    return steps


def run_steps(path: Path, profile: HardwareProfile) -> list[MeasuredStep]:
    """The training steps of `elite-tui run`: each tier planned as the run planned it, at its probe's micro-batch."""
    steps = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        shape = _shape(row["model"])
        config = default_config(model=row["model"], qlora=row["qlora"])
        plan = plan_tiers(shape, profile, config)[row["tier"] - 1]
        setup = dataclasses.replace(plan.setup, micro_batch=row["micro_batch"])
        label = f"{row['model']} tier {row['tier']} x{row['micro_batch']} {','.join(plan.options)}"
        steps.append(MeasuredStep(label, shape, setup, profile,
                                  setup.micro_batch * setup.seq_tokens / row["steps_tokens_per_s"]))
    return steps


def fit_step_fixed_s(steps: list[MeasuredStep], constants: StepTimeConstants) -> float:
    """The per-step cost no FLOP or layer count explains: the mean of measured minus estimated (without it) over
    steps bound by it, the demo model's short tiers."""
    without = dataclasses.replace(constants, step_fixed_s=0.0)
    return float(np.mean([s.step_s - s.estimate_s(without) for s in steps]))


def fit_constants(steps: list[MeasuredStep], step_fixed_s: float = 0.0) -> StepTimeConstants:
    """Least squares in log error (a step estimated 2x too long weighs as one 2x too short). The step is
    (FLOPs / (efficiency x peak) + layer passes x time) x the compiled factor x the nf4 factor; on a grid of efficiency
    and layer-pass time, each factor is the mean log residual of its own points (no fit-set point is both)."""
    # attention at its head size's speed, as the planner times it (1.0 for the fit set's head size, 128)
    flops = np.array([(training_flops_per_step(s.shape, s.setup) + attention_flops_per_step(s.shape, s.setup)
                       * (1.0 / STEP_TIME.attention_speed(s.shape.head_dim) - 1.0))
                      / (s.profile.gpus[0].tflops_bf16 * 1e12) for s in steps])
    passes = np.array([s.shape.layers * (3 if s.setup.checkpointing in ("on", "offload") else 2) for s in steps])
    compiled = np.array([s.setup.compiled for s in steps])
    nf4 = np.array([s.setup.weight_dtype == "nf4" for s in steps])
    if np.any(compiled & nf4):
        raise ValueError("a fit-set point is both compiled and nf4: the factors would not separate")
    log_measured = np.log([s.step_s - step_fixed_s for s in steps])
    efficiency = np.arange(0.30, 0.95, 0.002)[:, None, None]
    layer_pass_s = np.arange(0.0, 0.006, 0.00002)[None, :, None]
    residual = log_measured - np.log(flops / efficiency + passes * layer_pass_s)  # (efficiency, layer pass, point)
    log_compiled = residual[..., compiled].mean(axis=-1, keepdims=True) if compiled.any() else 0.0
    log_nf4 = residual[..., nf4].mean(axis=-1, keepdims=True) if nf4.any() else 0.0
    residual = residual - np.where(compiled, log_compiled, 0.0) - np.where(nf4, log_nf4, 0.0)
    loss = np.sum(residual**2, axis=-1)
    i, j = np.unravel_index(np.argmin(loss), loss.shape)
    return StepTimeConstants(
        matmul_efficiency=float(efficiency[i, 0, 0]), layer_pass_s=float(layer_pass_s[0, j, 0]),
        compiled_factor=float(np.exp(log_compiled[i, j, 0])) if compiled.any() else 1.0,
        nf4_factor=float(np.exp(log_nf4[i, j, 0])) if nf4.any() else 1.0, step_fixed_s=step_fixed_s)


def errors_pct(steps: list[MeasuredStep], constants: StepTimeConstants) -> np.ndarray:
    """Estimated tokens/s over measured, minus 1: negative means the table promises fewer tokens/s (longer epochs)."""
    return np.array([100.0 * (s.step_s / s.estimate_s(constants) - 1.0) for s in steps])


def calibrated_errors_pct(steps: list[MeasuredStep], constants: StepTimeConstants) -> np.ndarray:
    """After a probe of one tier, every other tier of the same model is scaled by that tier's measured/estimated ratio:
    the errors of all such (probed, other) pairs. A table is one model at one weight type (QLoRA or not)."""
    errors = []
    by_model: dict[tuple[str, str], list[MeasuredStep]] = {}
    for step in steps:
        by_model.setdefault((step.shape.name, step.setup.weight_dtype), []).append(step)
    for group in by_model.values():
        ratios = [s.estimate_s(constants) / s.step_s for s in group]
        for i, probed in enumerate(ratios):
            errors += [100.0 * (probed / other - 1.0) for j, other in enumerate(ratios) if j != i]
    return np.array(errors)


def summary(name: str, errors: np.ndarray) -> str:
    if not len(errors):
        return f"{name:<56} no points"
    return (f"{name:<56} n={len(errors):>3}  median abs {np.median(np.abs(errors)):5.1f} %  mean {errors.mean():+6.1f} %  "
            f"max abs {np.abs(errors).max():5.1f} %  within 10 % {np.mean(np.abs(errors) <= 10) * 100:3.0f} %")


def point_table(steps: list[MeasuredStep]) -> list[str]:
    lines = [f"{'point':<78} {'measured':>9} {'before':>8} {'now':>8} {'before/meas':>11} {'now/meas':>8}"]
    for step in steps:
        measured = step.tokens / step.step_s
        before, now = step.tokens / step.estimate_s(STEP_TIME_BEFORE), step.tokens / step.estimate_s(STEP_TIME)
        lines.append(f"{step.label[:78]:<78} {measured:>9,.0f} {before:>8,.0f} {now:>8,.0f} {before / measured:>11.2f} "
                     f"{now / measured:>8.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="refit the constants on the fit set and print them")
    parser.add_argument("--out", help="also write the tables to this file")
    args = parser.parse_args(argv)

    h100 = load_profile(RESULTS / "memory-h100-hardware.json")
    fit_set = engine_steps([Path(p) for p in sorted(glob.glob(str(RESULTS / "memory-h100*.jsonl")))], h100, fit_set=True)
    runs = run_steps(RESULTS / "rate-heldout-h200-runs.jsonl", load_profile(RESULTS / "gpu-smoke-h200" / "profile.json"))
    planned = engine_steps([RESULTS / "memory-h200-planned.jsonl"], load_profile(RESULTS / "memory-h200-planned-hardware.json"),
                           fit_set=False)
    demo = run_steps(RESULTS / "rate-heldout-h200-demo.jsonl", load_profile(RESULTS / "gpu-smoke-h200" / "profile.json"))
    demo_short = [step for step in demo if step.setup.seq_tokens <= FIXED_COST_MAX_WINDOW]
    demo_long = [step for step in demo if step.setup.seq_tokens > FIXED_COST_MAX_WINDOW]

    lines = ["tokens/s the tier table estimates before a probe, against measured steps; error = estimated/measured - 1",
             "machines: the fit set on 1 x NVIDIA H100 80GB HBM3, the held-out sets on 1 x NVIDIA H200 (their profiles'"
             " measured bf16 peaks: memory-h100-hardware.json, gpu-smoke-h200/profile.json, memory-h200-planned-hardware.json);"
             " scored on a CPU",
             f"before: {STEP_TIME_BEFORE}", f"now:    {STEP_TIME}", ""]
    if args.fit:
        # The fit set's steps (0.1-10 s) barely see the fixed cost and the demo's short steps see little else: the
        # rest on the fit set, the fixed cost on the demo's short tiers with those, in turn until they settle.
        step_fixed_s = 0.0
        for _ in range(20):
            fitted = fit_constants(fit_set, step_fixed_s)
            step_fixed_s = fit_step_fixed_s(demo_short, dataclasses.replace(STEP_TIME, **{
                name: getattr(fitted, name) for name in ("matmul_efficiency", "layer_pass_s", "compiled_factor", "nf4_factor")}))
        lines += [f"refitted on the fit set ({len(fit_set)} points) and the demo's tiers 1-3 (the fixed cost): efficiency "
                  f"{fitted.matmul_efficiency:.3f}, layer pass {fitted.layer_pass_s * 1000:.2f} ms, compiled "
                  f"x{fitted.compiled_factor:.2f}, nf4 x{fitted.nf4_factor:.2f}, fixed {step_fixed_s * 1000:.1f} ms a step",
                  ""]
    for name, steps in (("held out: elite-tui run on an H200", runs), ("held out: planned tiers on an H200", planned),
                        ("held out: the demo model (head dimension 32) through elite-tui run on an H200", demo)):
        lines += [name] + point_table(steps) + [""]
    lines.append("summary (before, then now)")
    sets = (("elite-tui run (H200)", runs), ("planned, held-out models (H200)", planned),
            ("demo, tiers 4-7, elite-tui run (H200)", demo_long))
    for name, steps in (("fit set (H100 engine steps)", fit_set), ("demo, tiers 1-3 (fixed cost fitted)", demo_short)) + sets:
        for tag, constants in (("before", STEP_TIME_BEFORE), ("now", STEP_TIME)):
            lines.append(summary(f"{name}, {tag}", errors_pct(steps, constants)))
    for name, steps in sets:
        for tag, constants in (("before", STEP_TIME_BEFORE), ("now", STEP_TIME)):
            lines.append(summary(f"{name}, after a probe, {tag}", calibrated_errors_pct(steps, constants)))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
