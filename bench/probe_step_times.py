"""Step by step: the pre-flight probe's steps beside the training steps of the same run.

The probe's rate is the mean of its TIMED_STEPS steps after the search; a run's rate is what its steps report. Where
the two differ (QLoRA at tiers 2-3 on an H200: the probe 8-10 % below the steps), this shows which step differs. For
each finished run directory given, it probes the run's config again (its micro-batch, one search step, then
`--timed-steps` steps, in a fresh child) and prints every probe step's rate beside every training step's.

    python bench/probe_step_times.py RUN_DIR [RUN_DIR ...] [--timed-steps 6]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from elite_core import protocol  # noqa: E402
from elite_core.config import RunConfig  # noqa: E402
from elite_core.probe import ProbeRequest, probe_training  # noqa: E402
from elite_core.runs import read_events  # noqa: E402


def probe_rates(run_dir: Path, timed_steps: int) -> list[protocol.StepMetrics]:
    """The StepMetrics of a fresh probe of the run's config: the search's one step, then the timed ones."""
    config = RunConfig.load(run_dir / "config.yaml")
    request = ProbeRequest(predicted_micro_batch=config.micro_batch, max_micro_batch=config.micro_batch, search=True,
                           timed_steps=timed_steps)
    steps: list[protocol.StepMetrics] = []
    probe_dir = Path(tempfile.mkdtemp(prefix="probe-steps-", dir=run_dir))
    try:
        probe_training(config, request, probe_dir, run_dir / "dataset",
                       on_event=lambda event: steps.append(event) if isinstance(event, protocol.StepMetrics) else None)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--timed-steps", type=int, default=6)
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        config = RunConfig.load(run_dir / "config.yaml")
        trained = [e for e in read_events(run_dir) if isinstance(e, protocol.StepMetrics)]
        probed = probe_rates(run_dir, args.timed_steps)
        print(f"{run_dir.name}: tier {config.tier}, window {config.window_tokens:,}, micro-batch {config.micro_batch}"
              f"{', QLoRA' if config.qlora else ''}; tokens/s of each step (probe step 1 is the search's)")
        print(f"{'step':>4} {'probe':>10} {'training':>10} {'probe/training':>14}")
        for index in range(len(probed)):  # the training's later steps are in its events.jsonl
            probe = probed[index].tokens_per_s
            train = trained[index].tokens_per_s if index < len(trained) else None
            ratio = f"{probe / train:>14.3f}" if probe and train else f"{'':>14}"
            print(f"{index + 1:>4} {probe:>10,.0f} {train or 0:>10,.0f} {ratio}")
        later_probe = [e.tokens_per_s for e in probed[1:]]
        later_train = [e.tokens_per_s for e in trained[1:]]
        if later_probe and later_train:
            # as probe.json and the probe-vs-training table average them: the probe over its timed steps, the
            # training over its steps after the first
            probe_mean = sum(later_probe[:2]) / len(later_probe[:2])
            train_mean = sum(later_train) / len(later_train)
            print(f"probe's first 2 timed steps {probe_mean:,.0f}, all {len(later_probe)} timed "
                  f"{sum(later_probe) / len(later_probe):,.0f}; training after step 1 {train_mean:,.0f}; "
                  f"ratio (2 timed) {probe_mean / train_mean:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
