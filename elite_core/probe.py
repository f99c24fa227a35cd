"""Pre-flight probes of real training steps: the largest micro-batch that runs, and the measured training rate.

The parent starts one training child in probe mode (`python -m elite_core.child DIR --probe-micro-batch N ...`). The
child loads the model once and runs the probes one after another, each one real optimizer step: a binary search through
planner.find_micro_batch from the planner's prediction (at most MAX_PROBES, within a time bound), then a few timed
steps at the confirmed micro-batch. A probe that runs out of memory is recorded and freed, not fatal. The child writes
DIR/probe.json; the parent keeps a copy as RUN_DIR/probe.json for the tier table and the report.

The search runs only on CUDA: a CPU does not run out of memory at a batch size, it swaps, so there the planner's
micro-batch is kept and only timed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from elite_core import protocol
from elite_core.config import RunConfig
from elite_core.estimates import RateCalibration
from elite_core.units import format_bytes

PROBE_FILE = "probe.json"
MAX_PROBES = 6
PROBE_DEADLINE_S = 180.0
"""The search stops starting new probes this long after the model is loaded; the best confirmed size so far stands."""
TIMED_STEPS = 2
"""Steps timed at the confirmed micro-batch after the search; the search's own steps carry one-time costs."""


@dataclass(frozen=True)
class ProbeRequest:
    predicted_micro_batch: int
    """Where the search starts (planner.max_micro_batch), or the micro-batch to time when there is no search."""
    max_micro_batch: int
    """No probe above this; the child lowers it further to the number of training windows."""
    search: bool
    timed_steps: int = TIMED_STEPS
    deadline_s: float = PROBE_DEADLINE_S
    max_peak_bytes: int = 0
    """A step that peaks above this counts as not fitting, like an out-of-memory one (0: no limit). The planner's
    safety margin: a size that squeezes into the last few percent may run out a few hundred steps later."""

    def child_args(self) -> list[str]:
        args = ["--probe-micro-batch", str(self.predicted_micro_batch),
                "--probe-max-micro-batch", str(self.max_micro_batch),
                "--probe-steps", str(self.timed_steps), "--probe-deadline-s", str(self.deadline_s),
                "--probe-max-peak-bytes", str(self.max_peak_bytes)]
        return args + (["--probe-search"] if self.search else [])

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--probe-micro-batch", type=int, default=0,
                            help="probe mode: confirm micro-batches from this one with real steps, write probe.json")
        parser.add_argument("--probe-max-micro-batch", type=int, default=0)
        parser.add_argument("--probe-search", action="store_true", help="binary-search the largest micro-batch")
        parser.add_argument("--probe-deadline-s", type=float, default=PROBE_DEADLINE_S)
        parser.add_argument("--probe-max-peak-bytes", type=int, default=0)

    @classmethod
    def from_args(cls, args) -> "ProbeRequest | None":
        """The request on a child's command line; None when the child is not in probe mode."""
        if not args.probe_micro_batch:
            return None
        return cls(predicted_micro_batch=args.probe_micro_batch,
                   max_micro_batch=args.probe_max_micro_batch or args.probe_micro_batch, search=args.probe_search,
                   timed_steps=args.probe_steps, deadline_s=args.probe_deadline_s,
                   max_peak_bytes=args.probe_max_peak_bytes)


@dataclass(frozen=True)
class ProbeStep:
    micro_batch: int
    fits: bool
    tokens: int
    step_s: float
    peak_bytes: int
    """Peak of the step as the training monitor measures it (GPU reserved + non-torch, or process RSS on a CPU)."""
    failure: str = ""
    """Why it does not fit: "out of memory", or "over the margin" when it ran but peaked above max_peak_bytes."""


@dataclass(frozen=True)
class ProbeResult:
    model: str
    device: str
    tier: int
    window_tokens: int
    predicted_micro_batch: int
    micro_batch: int
    """The largest micro-batch confirmed to run; 0 when not even 1 did."""
    searched: bool
    probes: tuple[ProbeStep, ...]
    """The search's steps in the order they ran (one step without a search)."""
    tokens_per_s: float
    """Measured over the timed steps at micro_batch."""
    step_s: float
    """Mean time of one timed step (one micro-batch, one optimizer update)."""
    peak_bytes: int
    loss: float
    deadline_hit: bool = False
    estimated_tokens_per_s: float = 0.0
    """What the planner estimated for the probed configuration (filled in by the parent, which has the profile)."""
    options: tuple[str, ...] = ()
    """The engine options the probed layers were built with (planner.options_of), for the run to check against."""

    def calibration(self) -> RateCalibration:
        return RateCalibration(tier=self.tier, measured_tokens_per_s=self.tokens_per_s,
                               estimated_tokens_per_s=self.estimated_tokens_per_s, window_tokens=self.window_tokens)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["probes"] = [dataclasses.asdict(step) for step in self.probes]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProbeResult":
        values = dict(data)
        values["probes"] = tuple(ProbeStep(**step) for step in values.get("probes", ()))
        values["options"] = tuple(values.get("options", ()))
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "ProbeResult | None":
        """The result saved at path; None when there is none or it cannot be read."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None


def options_mismatch(run_dir: str | Path, options: tuple[str, ...]) -> str | None:
    """A warning when RUN_DIR's probe confirmed layers built with other engine options than the run's, else None:
    its memory and rate then say nothing about the run (an H200 run probed compiled layers and trained eager ones)."""
    probe = ProbeResult.load(Path(run_dir) / PROBE_FILE)
    if probe is None or not probe.options or tuple(probe.options) == tuple(options):
        return None
    return (f"the pre-flight probe ran {', '.join(probe.options)}; this run trains {', '.join(options)}: "
            "its confirmed memory and rate do not apply")


def saved_calibration(run_dir: str | Path, config: RunConfig, profile) -> RateCalibration | None:
    """The calibration from RUN_DIR/probe.json when a probe ran there for this config's model on the device it plans
    for (a `device: cpu` run on a GPU machine: the CPU), else None."""
    probe = ProbeResult.load(Path(run_dir) / PROBE_FILE)
    if probe is None or probe.model != config.model or probe.device != profile.for_device(config.device).device:
        return None
    if probe.tokens_per_s <= 0 or probe.estimated_tokens_per_s <= 0:
        return None
    return probe.calibration()


class ProbeFailed(protocol.ChildJobFailed):
    pass


class _SearchCut(Exception):
    """The time bound passed, or a stop arrived: the search ends with the best size confirmed so far."""


def micro_batch_limit(config: RunConfig) -> int:
    """The largest micro-batch worth probing: one that holds the run's tokens per update, or the planner's target
    (planner.TOKENS_PER_UPDATE) if that is more. Beyond it a larger micro-batch only changes the optimisation."""
    from elite_core.planner import TOKENS_PER_UPDATE

    from elite_core.planner import resolved_grad_accum

    wanted = max(config.micro_batch * resolved_grad_accum(config) * config.window_tokens, TOKENS_PER_UPDATE)
    return max(1, config.micro_batch, wanted // config.window_tokens)


def probe_request(config: RunConfig, profile, shape) -> ProbeRequest:
    """Search from the planner's largest predicted micro-batch on a CUDA GPU; on a CPU time the config's micro-batch."""
    from elite_core.planner import SAFETY_FRACTION, max_micro_batch, plan_for_config

    on_gpu = profile is not None and profile.for_device(config.device).has_gpu
    if not on_gpu or shape is None:
        return ProbeRequest(predicted_micro_batch=config.micro_batch, max_micro_batch=config.micro_batch, search=False)
    limit = micro_batch_limit(config)
    plan = plan_for_config(shape, profile, config)
    predicted = max_micro_batch(shape, plan.setup, plan.budget_bytes, limit=limit)
    return ProbeRequest(predicted_micro_batch=max(1, min(predicted, limit)), max_micro_batch=limit, search=True,
                        max_peak_bytes=int(plan.budget_bytes * (1.0 - SAFETY_FRACTION)))


def config_with_micro_batch(config: RunConfig, micro_batch: int) -> RunConfig:
    """The config at a new micro-batch, with gradient accumulation set to keep its tokens per update
    (planner.grad_accum_for); one micro-batch larger than that raises the tokens per update to its own size."""
    from elite_core.planner import grad_accum_for, resolved_grad_accum

    if micro_batch < 1 or micro_batch == config.micro_batch:
        return config
    tokens_per_update = config.micro_batch * resolved_grad_accum(config) * config.window_tokens
    return config.replace(micro_batch=micro_batch,
                          grad_accum=grad_accum_for(config.window_tokens, micro_batch, tokens_per_update))


# ---------------------------------------------------------------------------------------------------------------------
# The child side: runs in the training child, after TrainingEngine is constructed.


def run_probes(engine, request: ProbeRequest, emit: Callable[[object], None]) -> ProbeResult:
    """Load the model once (engine.setup), run the probes and the timed steps, and return what they measured."""
    import torch

    from elite_core.planner import find_micro_batch
    from elite_core.training import MemoryMeter

    engine.setup()
    base = engine.config
    on_cuda = engine.device == "cuda"
    # A micro-batch larger than the training set would only repeat windows inside one step.
    limit = max(1, min(request.max_micro_batch, len(engine.train_data)))
    meter = MemoryMeter(engine.device)
    started = time.monotonic()
    deadline = started + request.deadline_s
    probes: list[ProbeStep] = []
    losses: list[float] = []

    def one_step(batch: int) -> ProbeStep:
        engine.config = base.replace(micro_batch=batch, grad_accum=1)
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        begin = time.monotonic()
        try:
            loss, grad_norm, tokens = engine.train_step()
            if on_cuda:
                torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            # The step's tensors go with the exception; the grads it accumulated so far go here.
            engine.optimizer.zero_grad(set_to_none=True)
            peak = meter.step_peak_bytes() if on_cuda else 0
            emit(protocol.Warning(message=f"probe: micro-batch {batch} ({batch * base.window_tokens:,} tokens) ran "
                                          "out of memory"))
            return ProbeStep(batch, False, batch * base.window_tokens, time.monotonic() - begin, peak, "out of memory")
        seconds = time.monotonic() - begin
        engine.step += 1
        if engine.step == 1:
            meter.refresh_outside_torch()
        peak = meter.step_peak_bytes()
        losses.append(loss)
        emit(protocol.StepMetrics(step=engine.step, epoch=0.0, loss=loss, lr=engine.scheduler.get_last_lr()[0],
                                  tokens_per_s=tokens / max(seconds, 1e-9), memory_bytes=peak,
                                  elapsed_s=time.monotonic() - started, grad_norm=grad_norm))
        if request.max_peak_bytes and peak > request.max_peak_bytes:
            emit(protocol.Warning(message=f"probe: micro-batch {batch} peaked at {format_bytes(peak)}, within the "
                                          f"safety margin of the memory (over {format_bytes(request.max_peak_bytes)})"))
            return ProbeStep(batch, False, tokens, seconds, peak, "over the margin")
        return ProbeStep(batch, True, tokens, seconds, peak)

    def try_step(batch: int) -> bool:
        if batch > limit:
            return False  # not wanted, so no step is needed to rule it out
        if time.monotonic() > deadline or engine.stop_requested:
            raise _SearchCut
        step = one_step(batch)
        probes.append(step)
        return step.fits

    deadline_hit = False
    if request.search:
        try:
            confirmed = find_micro_batch(try_step, min(request.predicted_micro_batch, limit), max_probes=MAX_PROBES)
        except _SearchCut:
            deadline_hit = True
            confirmed = max((step.micro_batch for step in probes if step.fits), default=0)
    else:
        step = one_step(base.micro_batch)
        probes.append(step)
        confirmed = base.micro_batch if step.fits else 0

    timed: list[ProbeStep] = []
    while confirmed > 0 and len(timed) < request.timed_steps:
        step = one_step(confirmed)
        if step.fits:
            timed.append(step)
            continue
        # It fitted once and not again (fragmentation, a longer last window): take the next size down that ran.
        probes.append(step)
        timed.clear()
        confirmed = max((p.micro_batch for p in probes if p.fits and p.micro_batch < confirmed), default=confirmed // 2)
    if not timed and confirmed > 0:
        timed = [next(step for step in reversed(probes) if step.fits and step.micro_batch == confirmed)]
    seconds = sum(step.step_s for step in timed)
    return ProbeResult(
        model=base.model, device=engine.device, tier=base.tier, window_tokens=base.window_tokens,
        predicted_micro_batch=request.predicted_micro_batch, micro_batch=confirmed, searched=request.search,
        probes=tuple(probes), tokens_per_s=sum(step.tokens for step in timed) / seconds if seconds > 0 else 0.0,
        step_s=seconds / len(timed) if timed else 0.0, peak_bytes=max((step.peak_bytes for step in timed), default=0),
        loss=losses[-1] if losses else float("nan"), deadline_hit=deadline_hit, options=tuple(engine.plan.options),
    )


# ---------------------------------------------------------------------------------------------------------------------
# The parent side


def probe_training(config: RunConfig, request: ProbeRequest, probe_dir: Path, dataset_dir: Path,
                   timeout_s: float = 600.0, on_event: Callable[[object], None] | None = None) -> ProbeResult:
    """Run the probes in one training child in probe_dir (its config.yaml is written here); raises ProbeFailed."""
    from elite_core.runner import run_child_job

    path = run_child_job(config, probe_dir, dataset_dir, request.child_args(), PROBE_FILE, what="probe",
                         oom_hint="lower the tier or micro-batch", failure=ProbeFailed, timeout_s=timeout_s,
                         on_event=on_event)
    result = ProbeResult.load(path)
    if result is None:
        raise ProbeFailed("the probe ended without a result", f"see {Path(probe_dir) / 'child.log'}")
    return result
