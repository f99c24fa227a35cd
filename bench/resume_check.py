"""A run stopped by SIGTERM, its config edited, then resumed, beside a run started with the edited config: the resumed
steps must train on the same windows with the same rates as that run, and report the edit. Written for the resume
changes of 2026-12-07 (own dataset, edited learning rate applied), to check their CUDA side (optimizer state on the
GPU); runs on a CPU too.

    python bench/resume_check.py --out bench/results/resume-check-h100.txt
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from elite_core import protocol
from elite_core.config import RunConfig
from elite_core.runs import read_events

STEPS = 12
STOP_AFTER = 4
FIRST_RATE, EDITED_RATE = "3.0e-03", "3.0e-05"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "elite_tui.cli", *args]


def run_command(runs: Path, name: str, rate: str) -> list[str]:
    return cli("run", "--repo", ".", "--output", str(runs), "--run-name", name, "--tier", "1", "--max-steps",
               str(STEPS), "--preflight", "off", "--set", "compile_eval_prompts=0", "--set", f"learning_rate={rate}")


def steps(run_dir: Path) -> list[protocol.StepMetrics]:
    return [e for e in read_events(run_dir) if isinstance(e, protocol.StepMetrics)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("/tmp/elite-resume-check"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    subprocess.run(["rm", "-rf", str(args.runs)], check=True)

    subprocess.run(run_command(args.runs, "reference", EDITED_RATE), check=True, capture_output=True)
    reference = {s.step: s for s in steps(args.runs / "reference")}

    stopped = args.runs / "stopped"
    first = subprocess.Popen(run_command(args.runs, "stopped", FIRST_RATE), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (stopped.exists() and any(s.step >= STOP_AFTER for s in steps(stopped))):
        if time.monotonic() > deadline or first.poll() is not None:
            raise SystemExit("the first session did not reach the stop")
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
    stopped_at = max(s.step for s in steps(stopped))
    config = RunConfig.load(stopped / "config.yaml")
    config.replace(learning_rate=float(EDITED_RATE)).save(stopped / "config.yaml")
    (Path(".") / "bench" / "resume_check_edit.tmp").write_text("an edit to the repository after the stop\n")
    try:
        resumed_out = subprocess.run(cli("resume", str(stopped)), capture_output=True, text=True, timeout=300)
    finally:
        (Path(".") / "bench" / "resume_check_edit.tmp").unlink()
    warnings = [e.message for e in read_events(stopped) if isinstance(e, protocol.Warning)]
    resumed = [s for s in steps(stopped) if s.step > stopped_at]

    devices = {e.device for e in read_events(stopped) if isinstance(e, protocol.Started)}
    lines = [f"device: {', '.join(sorted(devices))}",
             f"first session stopped by SIGTERM after step {stopped_at} (learning rate {FIRST_RATE}); config edited to "
             f"{EDITED_RATE}, a file added to the repository, then `elite-tui resume` (rc {resumed_out.returncode})",
             "warnings of the resume: " + " | ".join(w for w in warnings if "resumed" in w or "changed" in w),
             "", "step  resumed lr   reference lr  resumed windows  reference windows  same"]
    same_all = True
    for step in resumed:
        ref = reference[step.step]
        same = abs(step.lr - ref.lr) <= 1e-9 + 1e-6 * ref.lr and step.windows == ref.windows
        same_all &= same
        lines.append(f"{step.step:>4}  {step.lr:.4e}   {ref.lr:.4e}    {str(step.windows):<16} {str(ref.windows):<18} "
                     f"{'yes' if same else 'NO'}")
    lines += ["", f"steps after the stop: {[s.step for s in resumed]}; every rate and window as in the reference: "
                  f"{'yes' if same_all and len(resumed) == STEPS - stopped_at else 'NO'}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if same_all else 1


if __name__ == "__main__":
    sys.exit(main())
