"""Pre-flight checks before a run: each says pass or fail, and how to fix a failure."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator

from elite_core import protocol
from elite_core.config import RunConfig
from elite_core.units import format_bytes

PROBE_DIR = "preflight-probe"


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    message: str
    fix_hint: str = ""


def check_output_writable(config: RunConfig) -> CheckResult:
    name = "output directory writable"
    try:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=config.run_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        return CheckResult(name, False, f"cannot write in {config.run_dir}: {exc.strerror or exc}",
                           "choose another output directory, or fix its permissions")
    free = shutil.disk_usage(config.run_dir).free
    return CheckResult(name, True, f"{config.run_dir} ({format_bytes(free)} free)")


def check_model_loads(config: RunConfig) -> CheckResult:
    from elite_core.model_loading import ModelSourceError, load_hf_config, load_tokenizer

    name = "model and tokenizer load"
    try:
        hf_config = load_hf_config(config.model, config.trust_remote_code)
        tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    except ModelSourceError as exc:
        return CheckResult(name, False, str(exc), "check the model id or path on the Setup screen")
    return CheckResult(name, True, f"{config.model}: {type(hf_config).__name__}, vocabulary {len(tokenizer):,}")


def check_dataset(config: RunConfig, summary) -> CheckResult:
    name = "dataset has training windows"
    if summary is None:
        return CheckResult(name, False, "the dataset has not been built", "go back to the Dataset screen and build it")
    windows = summary.train_windows(config.window_tokens)
    if windows == 0:
        return CheckResult(name, False, f"no training windows in {summary.files} files",
                           "point the repository at a directory with source files")
    return CheckResult(name, True, f"{windows:,} windows of {config.window_tokens:,} tokens from {summary.files:,} files")


def check_memory(config: RunConfig, profile, shape) -> CheckResult:
    from elite_core.planner import plan_for_config

    name = "memory fits with headroom"
    plan = plan_for_config(shape, profile, config)
    where = "GPU" if profile.has_gpu else "RAM"
    text = (f"predicted {format_bytes(plan.breakdown.total_bytes)} of {format_bytes(plan.budget_bytes)} {where}, "
            f"headroom {format_bytes(plan.headroom_bytes)}")
    if not plan.fits:
        return CheckResult(name, False, text, "pick a lower tier, a smaller micro-batch, or turn on checkpoint offload")
    return CheckResult(name, True, text)


def check_training_step(config: RunConfig, timeout_s: float = 600.0) -> CheckResult:
    """Runs one real optimizer step in a child process, exactly as training will, then discards it."""
    from elite_core.runner import TrainingProcess

    name = "one training step runs"
    probe_dir = config.run_dir / PROBE_DIR
    shutil.rmtree(probe_dir, ignore_errors=True)
    probe_dir.mkdir(parents=True)
    config.save(probe_dir / "config.yaml")
    process = TrainingProcess.spawn(probe_dir, probe_steps=1, dataset_dir=config.run_dir / "dataset")
    step = None
    try:
        for event in process.events():
            if isinstance(event, protocol.StepMetrics):
                step = event
            elif isinstance(event, protocol.Error):
                hint = "lower the tier or micro-batch" if event.kind == "oom" else f"see {probe_dir / 'child.log'}"
                return CheckResult(name, False, event.message, hint)
    finally:
        if process.is_alive():
            process.kill()
    if step is None:
        return CheckResult(name, False, "the probe finished without a step", f"see {probe_dir / 'child.log'}")
    shutil.rmtree(probe_dir, ignore_errors=True)
    return CheckResult(name, True, f"loss {step.loss:.3f}, {step.tokens_per_s:,.0f} tokens/s, "
                                   f"peak {format_bytes(step.memory_bytes)}")


def run_preflight(config: RunConfig, profile, summary, shape, *, run_step: bool = True) -> Iterator[CheckResult]:
    """The checks in order; the training step runs only when everything before it passed."""
    results = [check_output_writable(config)]
    yield results[-1]
    results.append(check_model_loads(config))
    yield results[-1]
    results.append(check_dataset(config, summary))
    yield results[-1]
    results.append(check_memory(config, profile, shape))
    yield results[-1]
    if run_step:
        if all(result.ok for result in results):
            yield check_training_step(config)
        else:
            yield CheckResult("one training step runs", False, "skipped: fix the failures above first")


def all_passed(results: list[CheckResult]) -> bool:
    return bool(results) and all(result.ok for result in results)

