"""The training child: `python -m elite_core.child RUN_DIR [--event-fd N] [--resume] [--probe-steps N]`.

Reads RUN_DIR/config.yaml, trains, and reports every event twice: as a JSON line on the event pipe (when the parent
gave one) and appended to RUN_DIR/events.jsonl. Commands arrive as JSON lines on stdin. The child outlives its parent:
it ignores SIGHUP, and a broken event pipe only stops the pipe copy of the events, not the training.

With --probe-micro-batch N it trains nothing lasting: it probes micro-batches with real steps and writes
RUN_DIR/probe.json (elite_core.probe). With --lr-find-steps N it sweeps the learning rate over N real steps and writes
RUN_DIR/lr_find.json (elite_core.lr_finder).
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import threading
from pathlib import Path

from elite_core import distributed, protocol
from elite_core.config import ConfigError, RunConfig
from elite_core.lr_finder import LrFindRequest
from elite_core.probe import PROBE_FILE, ProbeRequest

EVENTS_FILE = "events.jsonl"
CHILD_PID_FILE = "child.pid"


class EventSink:
    """Writes each event to events.jsonl (always) and to the parent's pipe (while the parent listens)."""

    def __init__(self, run_dir: Path, event_fd: int | None):
        self._file = open(run_dir / EVENTS_FILE, "a", encoding="utf-8")
        self._pipe = os.fdopen(event_fd, "w", encoding="utf-8", buffering=1) if event_fd is not None else None
        self._lock = threading.Lock()

    def __call__(self, event) -> None:
        line = protocol.encode(event) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            if self._pipe is not None:
                try:
                    self._pipe.write(line)
                    self._pipe.flush()
                except (BrokenPipeError, OSError):
                    # The parent is gone (SSH drop, UI closed): keep training, events.jsonl still records everything.
                    self._pipe = None

    def close(self) -> None:
        with self._lock:
            self._file.close()
            if self._pipe is not None:
                try:
                    self._pipe.close()
                except OSError:
                    pass


class CommandReader:
    """Reads commands from stdin on a daemon thread so the training loop only polls a queue."""

    def __init__(self, stream, on_error):
        self._queue: queue.Queue = queue.Queue()
        self._on_error = on_error
        thread = threading.Thread(target=self._read, args=(stream,), daemon=True, name="command-reader")
        thread.start()

    def _read(self, stream) -> None:
        try:
            for line in stream:
                line = line.strip()
                if not line:
                    continue
                try:
                    self._queue.put(protocol.decode_command(line))
                except protocol.ProtocolError as exc:
                    self._on_error(protocol.Warning(message=f"ignored a bad command: {exc}"))
        except (OSError, ValueError):
            pass

    def poll(self) -> list:
        commands = []
        while True:
            try:
                commands.append(self._queue.get_nowait())
            except queue.Empty:
                return commands


class EarlySignals:
    """The commands signals carry (SIGUSR1: checkpoint now; SIGINT, SIGTERM: stop) that arrive before the engine exists:
    child.pid is written first, and torch takes seconds to import, so an attach may signal that early. Their default
    actions would end the process; they are remembered instead and handed to the engine."""

    def __init__(self) -> None:
        self.checkpoint = False
        self.stop = False
        # SIGHUP comes with an SSH drop: keep training.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "checkpoint", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stop", True))
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop", True))


def install_signal_handlers(engine, early: EarlySignals | None = None) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, lambda *_: engine.request_checkpoint())
    signal.signal(signal.SIGINT, lambda *_: engine.request_stop("signal"))
    signal.signal(signal.SIGTERM, lambda *_: engine.request_stop("signal"))
    if early is not None and early.checkpoint:
        engine.request_checkpoint()
    if early is not None and early.stop:
        engine.request_stop("signal")


def run_probe_mode(engine, request: ProbeRequest, run_dir: Path, emit) -> protocol.Finished:
    """Probe micro-batches with real steps, keep what they measured in RUN_DIR/probe.json, and say how it ended."""
    import time

    from elite_core.probe import run_probes

    started = time.monotonic()
    result = run_probes(engine, request, emit)
    result.save(run_dir / PROBE_FILE)
    return protocol.Finished(step=engine.step, final_loss=result.loss, adapter_path="", report_path="",
                             stopped_early=engine.stop_requested, elapsed_s=time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elite_core.child")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--event-fd", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--probe-steps", type=int, default=0)
    parser.add_argument("--dataset-dir", type=Path, default=None, help="default: RUN_DIR/dataset")
    parser.add_argument("--event-pipe", default=None, help="FD:DEV:INODE of the runner's event pipe, under a launcher")
    ProbeRequest.add_arguments(parser)
    LrFindRequest.add_arguments(parser)
    args = parser.parse_args(argv)
    probe = ProbeRequest.from_args(args)
    lr_find = LrFindRequest.from_args(args)

    run_dir: Path = args.run_dir.resolve()
    # distributed: under a launcher only rank 0 owns child.pid, events.jsonl, the pipe and the commands on stdin
    rank = distributed.rank_info()
    early_signals = EarlySignals()
    if rank.is_main:
        (run_dir / CHILD_PID_FILE).write_text(str(os.getpid()))
        distributed.clear_rank_failures(run_dir)
        sink = EventSink(run_dir, distributed.event_fd_for(rank, args.event_fd, args.event_pipe))
    else:
        sink = distributed.RankLog(rank)
    try:
        config = RunConfig.load(run_dir / "config.yaml")
    except (OSError, ConfigError) as exc:
        sink(protocol.Error(message=f"cannot read {run_dir / 'config.yaml'}: {exc}", kind="config"))
        sink.close()
        return 2

    # Imported here: torch takes seconds, and a bad config should be reported before that.
    from elite_core.training import TrainingEngine, describe_exception

    poll = CommandReader(sys.stdin, sink).poll if rank.is_main else (lambda: [])
    emit = sink
    if rank.is_main and not args.probe_steps and probe is None and lr_find is None:
        from elite_core.metric_sinks import FanOut, default_sinks

        emit = FanOut(sink, default_sinks(run_dir))  # TensorBoard event files beside events.jsonl
    probe_steps = max(args.probe_steps, 1) if probe is not None else args.probe_steps
    if lr_find is not None:
        probe_steps = lr_find.steps  # a short run of its own: no plan file, no checkpoints
    engine = TrainingEngine(config, run_dir, emit=emit, poll_commands=poll, resume=args.resume,
                            probe_steps=probe_steps, dataset_dir=args.dataset_dir)
    install_signal_handlers(engine, early_signals)
    try:
        if probe is not None:
            sink(run_probe_mode(engine, probe, run_dir, emit))
            return 0
        if lr_find is not None:
            from elite_core.lr_finder import lr_find_mode

            sink(lr_find_mode(engine, lr_find, run_dir, emit))
            return 0
        finished = engine.run()
        if finished.report_path and rank.is_main:
            from elite_core.evaluation import evaluate_run
            from elite_core.report import write_report

            # Compile rate of held-out completions, with and without the adapter; a stop asked to end, not to
            # generate completions first.
            if config.compile_eval_prompts and not finished.stopped_early:
                evaluate_run(engine, prompts=config.compile_eval_prompts)
            write_report(run_dir, finished)
        sink(finished)
        return 0
    except BaseException as exc:  # every failure reaches the parent as an Error event, never a silent exit
        distributed.report_failure(run_dir, describe_exception(exc), rank, sink, args.event_pipe)
        return 1
    finally:
        if emit is not sink:
            emit.close()
        sink.close()
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
