"""Where training numbers go besides the event stream, behind one small Protocol so the loop never knows.

TensorBoard is the one sink today: event files under RUN_DIR/tensorboard, written while training runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from elite_core import protocol

TENSORBOARD_DIR = "tensorboard"


class MetricSink(Protocol):
    def event(self, event: object) -> None:
        """Take any protocol event; sinks ignore the kinds they do not record."""

    def close(self) -> None: ...


class TensorBoardSink:
    """Scalars per optimizer step (loss, lr, tokens/s, memory, grad norm) and per evaluation (held-out loss,
    perplexity). Needs the `tensorboard` package; torch.utils.tensorboard writes the files."""

    def __init__(self, run_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        # flush_secs: a live `tensorboard --logdir` sees steps within seconds, not at the end
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=5)

    def event(self, event: object) -> None:
        if isinstance(event, protocol.StepMetrics):
            scalars = {"train/loss": event.loss, "train/lr": event.lr, "train/tokens_per_s": event.tokens_per_s,
                       "train/memory_gib": event.memory_bytes / 2**30, "train/grad_norm": event.grad_norm}
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, event.step, walltime=event.time)
        elif isinstance(event, protocol.EvalMetrics):
            self._writer.add_scalar("eval/loss", event.loss, event.step, walltime=event.time)
            self._writer.add_scalar("eval/perplexity", event.perplexity, event.step, walltime=event.time)
        elif isinstance(event, protocol.Finished):
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class FanOut:
    """Wraps an emit function: every event goes to it first, then to each sink. A failing sink is dropped with a
    warning through emit, never taking training down with it."""

    def __init__(self, emit, sinks: list[MetricSink]):
        self._emit = emit
        self._sinks = list(sinks)

    def __call__(self, event: object) -> None:
        self._emit(event)
        for sink in list(self._sinks):
            try:
                sink.event(event)
            except Exception as exc:  # a full disk under tensorboard/ must not stop the run
                self._sinks.remove(sink)
                self._emit(protocol.Warning(message=f"{type(sink).__name__} stopped recording: {exc}"))

    def close(self) -> None:
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                pass


def default_sinks(run_dir: str | Path) -> list[MetricSink]:
    """TensorBoard when its package is installed, otherwise none."""
    try:
        return [TensorBoardSink(run_dir)]
    except ImportError:
        return []


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard log directory, by tag: [(step, value), ...]. For tests and the report."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
