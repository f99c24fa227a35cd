"""The learning-rate range test (Leslie Smith, "Cyclical Learning Rates for Training Neural Networks", 2017): a short
run of real optimizer steps with the learning rate rising exponentially, the smoothed loss recorded at each step.

The parent starts one training child in finder mode (`python -m elite_core.child DIR --lr-find-steps N ...`) in a
scratch directory. The child builds the model, optimizer, loss and autocast exactly as training does (engine.setup)
and runs engine.train_step on the run's own training windows; only the LR schedule is the sweep's. It stops early when
the smoothed loss passes DIVERGENCE_FACTOR times the best so far (or is not finite), or at its time bound, and writes
DIR/lr_find.json. Nothing needs restoring afterwards: the sweep's model lives and dies in that child, so the real run
starts from a fresh model. The parent keeps a copy as RUN_DIR/lr_find.json.

The suggestion is one tenth of the learning rate at the lowest smoothed loss (fastai's `lr_min` rule, after Smith's
advice to train an order of magnitude below where the loss stops falling). It is chosen over the steepest-descent rule
because a sweep of 40 steps at a micro-batch of one or two windows is noisy, and the slope of a noisy curve jumps from
step to step far more than the position of its minimum does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from elite_core import protocol
from elite_core.config import RunConfig

LR_FIND_FILE = "lr_find.json"
LR_FIND_DIR = "lr-find"
"""The child's scratch directory under the run directory; removed after a sweep that produced a result."""
DEFAULT_STEPS = 40
MAX_STEPS = 40
DEFAULT_MIN_LR = 1e-6
DEFAULT_MAX_LR = 1e-1
LR_FIND_DEADLINE_S = 300.0
"""The sweep stops starting new steps this long after the model is loaded; the steps so far still give a suggestion."""
DIVERGENCE_FACTOR = 4.0
SMOOTHING = 0.8
"""Weight of the running average in the smoothed loss; fastai's 0.98 averages over ~50 steps, more than a sweep here."""
SUGGESTION_RULE = "one tenth of the learning rate at the lowest smoothed loss"

STOP_DIVERGED = "diverged"
STOP_DEADLINE = "deadline"
STOP_SIGNAL = "stopped"


@dataclass(frozen=True)
class LrFindRequest:
    steps: int = DEFAULT_STEPS
    min_lr: float = DEFAULT_MIN_LR
    max_lr: float = DEFAULT_MAX_LR
    deadline_s: float = LR_FIND_DEADLINE_S

    def __post_init__(self) -> None:
        if not 2 <= self.steps <= MAX_STEPS:
            raise ValueError(f"the sweep takes 2 to {MAX_STEPS} steps, not {self.steps}")
        if not 0.0 < self.min_lr < self.max_lr:
            raise ValueError(f"the sweep needs 0 < min_lr < max_lr, got {self.min_lr:g} and {self.max_lr:g}")
        if self.deadline_s <= 0:
            raise ValueError("the time bound must be positive")

    def learning_rates(self) -> tuple[float, ...]:
        """min_lr to max_lr, evenly spaced on a log scale: each step multiplies the rate by the same factor."""
        ratio = self.max_lr / self.min_lr
        return tuple(self.min_lr * ratio ** (index / (self.steps - 1)) for index in range(self.steps))

    def child_args(self) -> list[str]:
        return ["--lr-find-steps", str(self.steps), "--lr-find-min-lr", repr(self.min_lr),
                "--lr-find-max-lr", repr(self.max_lr), "--lr-find-deadline-s", repr(self.deadline_s)]

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--lr-find-steps", type=int, default=0,
                            help="finder mode: sweep the learning rate over this many real steps, write lr_find.json")
        parser.add_argument("--lr-find-min-lr", type=float, default=DEFAULT_MIN_LR)
        parser.add_argument("--lr-find-max-lr", type=float, default=DEFAULT_MAX_LR)
        parser.add_argument("--lr-find-deadline-s", type=float, default=LR_FIND_DEADLINE_S)

    @classmethod
    def from_args(cls, args) -> "LrFindRequest | None":
        """The request on a child's command line; None when the child is not in finder mode."""
        if not args.lr_find_steps:
            return None
        return cls(steps=args.lr_find_steps, min_lr=args.lr_find_min_lr, max_lr=args.lr_find_max_lr,
                   deadline_s=args.lr_find_deadline_s)


@dataclass(frozen=True)
class LrFindResult:
    model: str
    device: str
    tier: int
    window_tokens: int
    tokens_per_update: int
    """Micro-batch x accumulation x window: the rate found holds for updates of this size."""
    min_lr: float
    max_lr: float
    """The range requested; `lrs` ends below max_lr when the sweep stopped early."""
    lrs: tuple[float, ...]
    """The rate each step ran at, as the optimizer had it (strictly increasing)."""
    losses: tuple[float, ...]
    """Each step's training loss, computed before that step's update (the convention of Smith and fastai)."""
    smoothed: tuple[float, ...]
    suggested_lr: float
    """SUGGESTION_RULE, rounded to two significant digits and kept inside the rates swept."""
    min_loss_lr: float
    """The rate at the lowest smoothed loss."""
    stopped_early: bool
    stop_reason: str
    """"" (the whole range ran), "diverged", "deadline" or "stopped"."""
    elapsed_s: float
    note: str = ""
    """Why the suggestion deserves doubt (the loss never fell, or still fell at the top of the range); "" if none."""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("lrs", "losses", "smoothed"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LrFindResult":
        values = dict(data)
        for key in ("lrs", "losses", "smoothed"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)

    def save(self, path: str | Path) -> None:
        # allow_nan: a diverged step's loss may be inf or nan, and it is part of the record
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=True), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "LrFindResult | None":
        """The result saved at path; None when there is none or it cannot be read."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None


class LrFindFailed(protocol.ChildJobFailed):
    pass


def smoothed_losses(losses: Sequence[float], beta: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction, so the first values are not pulled towards zero."""
    smoothed = []
    average = 0.0
    for index, loss in enumerate(losses):
        average = beta * average + (1.0 - beta) * loss
        smoothed.append(average / (1.0 - beta ** (index + 1)))
    return smoothed


def has_diverged(smoothed: Sequence[float], factor: float = DIVERGENCE_FACTOR) -> bool:
    """The last smoothed loss is not finite, or above `factor` times the lowest one so far."""
    if not smoothed:
        return False
    last = smoothed[-1]
    if not math.isfinite(last):
        return True
    best = min(value for value in smoothed if math.isfinite(value))
    return last > factor * best


def round_rate(rate: float) -> float:
    return float(f"{rate:.2g}")


def suggest_learning_rate(lrs: Sequence[float], smoothed: Sequence[float],
                          diverged: bool = False) -> tuple[float, float, str]:
    """(suggested rate, rate at the lowest smoothed loss, note) by SUGGESTION_RULE; the note says when to doubt it."""
    finite = [(loss, index) for index, loss in enumerate(smoothed) if math.isfinite(loss)]
    if not finite:
        raise ValueError("no finite loss was recorded: the sweep has nothing to suggest from")
    _, best = min(finite)
    min_loss_lr = lrs[best]
    suggested = min(max(round_rate(min_loss_lr / 10.0), lrs[0]), lrs[-1])
    note = ""
    if best == 0:
        note = "the loss never fell below its first value: start the sweep lower"
    elif best == len(lrs) - 1 and not diverged:
        note = "the loss still fell at the top of the range: a higher maximum may find a higher rate"
    return suggested, min_loss_lr, note


def describe_lr_find(result: LrFindResult) -> str:
    """One paragraph: the suggestion and how it was found, and how the sweep ended."""
    steps = len(result.lrs)
    if result.stop_reason == STOP_DIVERGED:
        ended = f"the loss diverged at {result.lrs[-1]:.1e} after {steps} steps"
    elif result.stop_reason == STOP_DEADLINE:
        ended = f"the time bound stopped it at {result.lrs[-1]:.1e} after {steps} steps"
    elif result.stop_reason == STOP_SIGNAL:
        ended = f"it was stopped at {result.lrs[-1]:.1e} after {steps} steps"
    else:
        ended = f"all {steps} steps ran"
    text = (f"Suggested learning rate {result.suggested_lr:.1e}: {SUGGESTION_RULE} ({result.min_loss_lr:.1e}). "
            f"Swept {result.min_lr:.0e} to {result.max_lr:.0e} at {result.tokens_per_update:,} tokens per update; "
            f"{ended}, in {result.elapsed_s:.0f} s.")
    if result.note:
        text += f" Note: {result.note}."
    return text


# ---------------------------------------------------------------------------------------------------------------------
# The child side: runs in the training child, after TrainingEngine is constructed.


def run_lr_find(engine, request: LrFindRequest, emit: Callable[[object], None]) -> LrFindResult:
    """Load the model once (engine.setup), then one engine.train_step per rate of the sweep until it ends or diverges."""
    import torch

    from elite_core.training import MemoryMeter

    engine.setup()
    config = engine.config  # after setup: automatic accumulation resolved
    planned = request.learning_rates()
    last = len(planned) - 1
    # The sweep's own schedule replaces warm-up and cosine; initial_lr is the base LambdaLR multiplies.
    for group in engine.optimizer.param_groups:
        group["initial_lr"] = planned[0]
    engine.scheduler = torch.optim.lr_scheduler.LambdaLR(
        engine.optimizer, lambda step: planned[min(step, last)] / planned[0])
    if engine.parallel_loss.deepspeed is not None:
        # ZeRO steps the schedule it was given at initialisation, inside its own step
        engine.parallel_loss.deepspeed.lr_scheduler = engine.scheduler
    meter = MemoryMeter(engine.device)
    started = time.monotonic()
    deadline = started + request.deadline_s
    lrs: list[float] = []
    losses: list[float] = []
    stop_reason = ""
    for wanted in planned:
        if engine.stop_requested:
            stop_reason = STOP_SIGNAL
            break
        if lrs and time.monotonic() > deadline:  # the first step always runs: a sweep of none suggests nothing
            stop_reason = STOP_DEADLINE
            break
        rate = float(engine.optimizer.param_groups[0]["lr"])
        if not math.isclose(rate, wanted, rel_tol=1e-6):
            raise RuntimeError(f"the sweep's learning rate did not reach the optimizer: {rate:.3e}, not {wanted:.3e}")
        step_started = time.monotonic()
        loss, grad_norm, tokens = engine.train_step()
        if engine.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.monotonic() - step_started
        engine.step += 1
        if engine.step == 1:
            meter.refresh_outside_torch()
        lrs.append(rate)
        losses.append(loss)
        emit(protocol.StepMetrics(step=engine.step, epoch=0.0, loss=loss, lr=rate,
                                  tokens_per_s=tokens / max(seconds, 1e-9), memory_bytes=meter.step_peak_bytes(),
                                  elapsed_s=time.monotonic() - started, grad_norm=grad_norm))
        if has_diverged(smoothed_losses(losses)):
            stop_reason = STOP_DIVERGED
            break
    if not losses:
        raise RuntimeError("the learning-rate sweep was stopped before its first step")
    smoothed = smoothed_losses(losses)
    suggested, min_loss_lr, note = suggest_learning_rate(lrs, smoothed, diverged=stop_reason == STOP_DIVERGED)
    return LrFindResult(
        model=config.model, device=engine.device, tier=config.tier, window_tokens=config.window_tokens,
        tokens_per_update=config.micro_batch * config.grad_accum * config.window_tokens, min_lr=request.min_lr,
        max_lr=request.max_lr, lrs=tuple(lrs), losses=tuple(losses), smoothed=tuple(smoothed),
        suggested_lr=suggested, min_loss_lr=min_loss_lr, stopped_early=bool(stop_reason), stop_reason=stop_reason,
        elapsed_s=time.monotonic() - started, note=note,
    )


def lr_find_mode(engine, request: LrFindRequest, run_dir: Path, emit) -> protocol.Finished:
    """The child's finder mode: sweep, keep the result in RUN_DIR/lr_find.json, and say how it ended."""
    result = run_lr_find(engine, request, emit)
    result.save(Path(run_dir) / LR_FIND_FILE)
    return protocol.Finished(step=engine.step, final_loss=result.losses[-1] if result.losses else float("nan"),
                             adapter_path="", report_path="", stopped_early=result.stopped_early,
                             elapsed_s=result.elapsed_s)


# ---------------------------------------------------------------------------------------------------------------------
# The parent side


def lr_find_training(config: RunConfig, request: LrFindRequest, find_dir: Path, dataset_dir: Path,
                     timeout_s: float = 600.0, on_event: Callable[[object], None] | None = None) -> LrFindResult:
    """Run the sweep in one training child in find_dir (its config.yaml is written here); raises LrFindFailed."""
    from elite_core.runner import run_child_job

    path = run_child_job(config, find_dir, dataset_dir, request.child_args(), LR_FIND_FILE,
                         what="learning-rate sweep", oom_hint="lower the tier or micro-batch, then sweep again",
                         failure=LrFindFailed, timeout_s=timeout_s, on_event=on_event)
    result = LrFindResult.load(path)
    if result is None:
        raise LrFindFailed("the learning-rate sweep ended without a result", f"see {Path(find_dir) / 'child.log'}")
    return result

