"""The typed, versioned protocol between the UI (or the headless runner) and the training child.

Events flow child -> parent, commands parent -> child. Both are frozen dataclasses, sent as one JSON object per
line with a "type" field and the protocol version "v". The child writes the same lines to RUN_DIR/events.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    pass


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class Started:
    type: ClassVar[str] = "started"
    run_dir: str
    pid: int
    device: str
    total_steps: int
    """Optimizer steps the run will take."""
    tokens_per_step: int
    trainable_params: int
    total_params: int
    predicted_peak_bytes: int
    start_step: int = 0
    """Non-zero when the run resumed from a checkpoint."""
    time: float = field(default_factory=_now)


@dataclass(frozen=True)
class StepMetrics:
    type: ClassVar[str] = "step"
    step: int
    """Optimizer steps done so far (1-based after the first update)."""
    epoch: float
    loss: float
    lr: float
    tokens_per_s: float
    memory_bytes: int
    """Peak memory of the step: GPU reserved + non-torch on CUDA, process RSS on CPU."""
    elapsed_s: float
    grad_norm: float = 0.0
    windows: tuple[int, ...] = ()
    """The training set's windows this update trained on (every rank's), by index: which window a step drew is most
    of its loss's scatter (bench/projection_window_levels.py fits a level per window). Empty where unknown (probe,
    rate sweep)."""
    time: float = field(default_factory=_now)

    def __post_init__(self):
        object.__setattr__(self, "windows", tuple(self.windows))  # JSON brings a list


@dataclass(frozen=True)
class EvalMetrics:
    type: ClassVar[str] = "eval"
    step: int
    loss: float
    perplexity: float
    time: float = field(default_factory=_now)


@dataclass(frozen=True)
class CheckpointSaved:
    type: ClassVar[str] = "checkpoint"
    step: int
    path: str
    reason: str
    """"periodic", "requested", "stop", "signal" or "final"."""
    seconds: float
    time: float = field(default_factory=_now)


@dataclass(frozen=True)
class Warning:
    type: ClassVar[str] = "warning"
    message: str
    time: float = field(default_factory=_now)


@dataclass(frozen=True)
class Error:
    type: ClassVar[str] = "error"
    message: str
    traceback: str = ""
    kind: str = "exception"
    """"exception", "oom" or "config"."""
    time: float = field(default_factory=_now)


@dataclass(frozen=True)
class Finished:
    type: ClassVar[str] = "finished"
    step: int
    final_loss: float
    adapter_path: str
    report_path: str
    stopped_early: bool
    elapsed_s: float
    time: float = field(default_factory=_now)


@dataclass(frozen=True)
class CheckpointNow:
    type: ClassVar[str] = "checkpoint_now"


@dataclass(frozen=True)
class Stop:
    type: ClassVar[str] = "stop"
    checkpoint: bool = True


Event = Union[Started, StepMetrics, EvalMetrics, CheckpointSaved, Warning, Error, Finished]
Command = Union[CheckpointNow, Stop]

EVENT_TYPES: dict[str, type] = {
    cls.type: cls for cls in (Started, StepMetrics, EvalMetrics, CheckpointSaved, Warning, Error, Finished)
}
COMMAND_TYPES: dict[str, type] = {cls.type: cls for cls in (CheckpointNow, Stop)}


def encode(message: Any) -> str:
    """One JSON line (no trailing newline) for an event or a command."""
    payload = {"type": message.type, "v": PROTOCOL_VERSION, **dataclasses.asdict(message)}
    return json.dumps(payload, separators=(",", ":"), allow_nan=True)


def _decode(line: str, registry: dict[str, type]) -> Any:
    try:
        payload = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"not a JSON line: {line[:80]!r}") from exc
    if not isinstance(payload, dict) or "type" not in payload:
        raise ProtocolError(f"no 'type' in {line[:80]!r}")
    version = payload.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, this side speaks {PROTOCOL_VERSION}")
    kind = payload.pop("type")
    cls = registry.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{key: value for key, value in payload.items() if key in names})
    except TypeError as exc:
        raise ProtocolError(f"bad {kind!r} message: {exc}") from exc


def decode_event(line: str) -> Event:
    return _decode(line, EVENT_TYPES)


def decode_command(line: str) -> Command:
    return _decode(line, COMMAND_TYPES)


class ChildJobFailed(Exception):
    """A short job of the training child (pre-flight probe, learning-rate sweep) that ended without its result."""

    def __init__(self, message: str, hint: str = "", kind: str = "exception"):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.kind = kind
