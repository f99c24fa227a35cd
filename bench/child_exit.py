"""How long a training child lives, and holds memory, after it reports its end: one `elite-tui run` with the given
arguments, watched from outside. The times are from the Finished event's own timestamp (written just before the
child closes its pipe) to the child's exit and to the CLI's exit; the memory is what NVML says the child's process
holds on GPU 0 (its RSS on a CPU run), sampled every 50 ms from Finished to exit.

Usage: python bench/child_exit.py --output RUNS --run-name NAME [more `elite-tui run` arguments]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

from elite_core import nvml, protocol
from elite_core.child import CHILD_PID_FILE
from elite_core.runs import read_events

SAMPLE_S = 0.05


def finished_time(run_dir: Path) -> float | None:
    return next((event.time for event in reversed(read_events(run_dir)) if isinstance(event, protocol.Finished)), None)


def main(argv: list[str]) -> int:
    run_dir = Path(argv[argv.index("--output") + 1]) / argv[argv.index("--run-name") + 1]
    cli = subprocess.Popen([sys.executable, "-m", "elite_tui.cli", "run", *argv], stdout=sys.stdout, stderr=sys.stderr)
    pid = None
    child = None
    samples: list[tuple[float, int]] = []
    finished_at = None
    child_exit = None
    while True:
        now = time.time()
        if pid is None and (run_dir / CHILD_PID_FILE).exists():
            try:
                pid = int((run_dir / CHILD_PID_FILE).read_text().strip())
                child = psutil.Process(pid)
            except (ValueError, OSError, psutil.Error):
                pid = None
        if finished_at is None:
            finished_at = finished_time(run_dir)
        alive = child is not None and child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        if finished_at is not None and child is not None:
            if alive:
                held = nvml.process_used_bytes(pid)  # GPU 0, the run's one GPU
                if held is None:
                    try:
                        held = child.memory_info().rss
                    except psutil.Error:
                        held = 0
                samples.append((now, held))
            elif child_exit is None:
                child_exit = now
        if cli.poll() is not None and (child_exit is not None or not alive):
            break
        time.sleep(SAMPLE_S)
    cli_exit = time.time()
    child_exit = child_exit or cli_exit
    if finished_at is None:
        print(f"no finished event in {run_dir / 'events.jsonl'} (the CLI exited {cli.returncode})")
        return 1
    gib = 2**30
    print(f"\nafter the finished event of {run_dir.name} (CLI exit code {cli.returncode}):")
    print(f"{'child exit s':>12} {'CLI exit s':>10} {'held at finished':>17} {'held 1 s later':>15} "
          f"{'last sample':>12} {'last sample s':>13}")
    at = [held for t, held in samples if t - finished_at <= 0.25]
    later = [held for t, held in samples if t - finished_at >= 1.0]
    first = (at or [held for _, held in samples] or [0])[0]
    one_s = later[0] if later else 0
    last_t, last = samples[-1] if samples else (finished_at, 0)
    print(f"{child_exit - finished_at:>12.2f} {cli_exit - finished_at:>10.2f} {first / gib:>13.2f} GiB "
          f"{one_s / gib:>11.2f} GiB {last / gib:>8.2f} GiB {last_t - finished_at:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
