"""Pre-flight checks before a run: each says pass or fail, and how to fix a failure."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from elite_core.config import RunConfig
from elite_core.units import format_bytes

if TYPE_CHECKING:
    from elite_core.lr_finder import LrFindRequest, LrFindResult

PROBE_DIR = "preflight-probe"


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    message: str
    fix_hint: str = ""
    probe: Any = None
    """The probe.ProbeResult of the training-step check."""
    config: RunConfig | None = None
    """The config the run should use when the check changed it (the micro-batch the probes confirmed)."""


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


def check_options_installed(config: RunConfig, profile) -> CheckResult:
    from elite_core.planner import BITSANDBYTES_OPTIONS, asked_options, missing_libraries

    name = "options' libraries installed"
    missing = missing_libraries(config, profile)
    if missing:
        return CheckResult(name, False, "; ".join(missing.values()), "install it, or turn the option off on the "
                           "Overrides screen (--set FIELD=false)")
    asked = asked_options(config, BITSANDBYTES_OPTIONS) if profile.for_device(config.device).has_gpu else []
    return CheckResult(name, True, f"bitsandbytes ({', '.join(option for _, option in asked)})" if asked
                       else "no option needs one")


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
    on_gpu = plan.setup.device == "cuda"
    text = (f"predicted {format_bytes(plan.breakdown.total_bytes)} of {format_bytes(plan.budget_bytes)} "
            f"{'GPU' if on_gpu else 'RAM'}, headroom {format_bytes(plan.headroom_bytes)}")
    held = held_by_others_bytes(profile) if on_gpu else 0
    if held:
        # An earlier run's detached child, for one, keeps its memory after its CLI is gone: the budget says why
        text += (f" (other processes held {format_bytes(held)} of the GPU's {format_bytes(profile.gpus[0].total_bytes)} "
                 "when it was profiled)")
    if not plan.fits:
        fix = "pick a lower tier, a smaller micro-batch, or turn on checkpoint offload"
        return CheckResult(name, False, text, fix + (", or free the GPU (nvidia-smi lists its processes)" if held else ""))
    return CheckResult(name, True, text)


OTHERS_HOLD_FRACTION = 0.05
"""Memory other processes held on GPU 0 is named when it was more than this share of the GPU (an idle GPU's driver
reserve is about 0.4 %)."""


def held_by_others_bytes(profile) -> int:
    """What other processes held on GPU 0 when it was profiled, when that is worth naming; 0 otherwise."""
    gpu = profile.gpus[0]
    held = max(0, gpu.total_bytes - gpu.free_bytes)
    return held if held > OTHERS_HOLD_FRACTION * gpu.total_bytes else 0


def check_training_step(config: RunConfig, profile=None, shape=None, summary=None,
                        timeout_s: float = 600.0) -> CheckResult:
    """Runs real optimizer steps in one child process, exactly as training will, then discards them.

    On a CUDA GPU the steps search the largest micro-batch that runs, from the planner's prediction; everywhere they
    measure the training rate. The result is kept in RUN_DIR/probe.json; the check's config carries the micro-batch.
    """
    from elite_core.probe import PROBE_FILE, ProbeFailed, config_with_micro_batch, probe_request, probe_training

    name = "training steps run"
    probe_dir = config.run_dir / PROBE_DIR
    shutil.rmtree(probe_dir, ignore_errors=True)
    request = probe_request(config, profile, shape)
    try:
        result = probe_training(config, request, probe_dir, config.run_dir / "dataset", timeout_s=timeout_s)
    except ProbeFailed as exc:
        return CheckResult(name, False, exc.message, exc.hint)
    if result.micro_batch == 0:
        last = result.probes[-1] if result.probes else None
        why = last.failure if last is not None else "out of memory"
        if last is not None and last.failure == "over the margin":
            why = f"ran but peaked at {format_bytes(last.peak_bytes)}, inside the planner's safety margin"
        return CheckResult(name, False, f"micro-batch 1 ({config.window_tokens:,} tokens): {why}",
                           "lower the tier, or turn on checkpoint offload on the Overrides screen")
    shutil.rmtree(probe_dir, ignore_errors=True)
    confirmed = config_with_micro_batch(config, result.micro_batch)
    predicted_bytes = 0
    if profile is not None and shape is not None:
        from elite_core.planner import estimated_tokens_per_s, plan_for_config

        plan = plan_for_config(shape, profile, confirmed)
        predicted_bytes = plan.breakdown.total_bytes
        result = dataclasses.replace(result, estimated_tokens_per_s=estimated_tokens_per_s(plan))
    result.save(config.run_dir / PROBE_FILE)
    return CheckResult(name, True, describe_probe(result, config, confirmed, summary, predicted_bytes), probe=result,
                       config=confirmed)


def describe_probe(result, config: RunConfig, confirmed: RunConfig, summary=None, predicted_bytes: int = 0) -> str:
    """One paragraph: the micro-batch and how it was found, the measured rate and peak beside the peak predicted at
    that micro-batch (the memory check above predicts the planned one, which the search may have changed), the epoch
    time it implies."""
    from elite_core.estimates import epoch_seconds, epoch_tokens_from_summary
    from elite_core.units import format_coarse_duration

    if result.searched:
        trail = ", ".join(f"{step.micro_batch} {step.failure or 'ran'}" for step in result.probes)
        how = f"micro-batch {result.micro_batch} confirmed by {len(result.probes)} probes ({trail})"
        if result.deadline_hit:
            how += "; the search hit its time limit"
    else:
        how = (f"micro-batch {result.micro_batch} as planned (the search for a larger one runs only on a CUDA GPU; "
               "a CPU does not run out of memory, it swaps)")
    if confirmed.grad_accum != config.grad_accum or confirmed.micro_batch != config.micro_batch:
        tokens = confirmed.micro_batch * confirmed.grad_accum * confirmed.window_tokens
        how += f"; gradient accumulation {confirmed.grad_accum} ({tokens:,} tokens per update)"
    where = "GPU" if result.device == "cuda" else "RSS"
    text = (f"{how}. Measured {result.tokens_per_s:,.0f} tokens/s, loss {result.loss:.3f}, "
            f"peak {format_bytes(result.peak_bytes)} {where}")
    if predicted_bytes and result.peak_bytes:
        error = (predicted_bytes - result.peak_bytes) / result.peak_bytes * 100
        text += (f" (predicted {format_bytes(predicted_bytes)} at micro-batch {confirmed.micro_batch}, "
                 f"{error:+.1f} %)")
    if summary is not None and result.tokens_per_s > 0:
        tokens = epoch_tokens_from_summary(summary).tokens_per_epoch(result.window_tokens)
        text += f"; one epoch ({tokens:,} tokens) ~{format_coarse_duration(epoch_seconds(tokens, result.tokens_per_s))}"
    return text + "."


def find_learning_rate(config: RunConfig, request: LrFindRequest | None = None, *, timeout_s: float = 600.0,
                       on_event: Callable[[object], None] | None = None) -> LrFindResult:
    """The learning-rate range test (elite_core.lr_finder) for this run: not one of the checks, it costs a model load
    and up to 40 real steps, so the user asks for it. Runs in one child in RUN_DIR/lr-find on the run's dataset (built
    there if it is not yet); the result is kept as RUN_DIR/lr_find.json. The default request sweeps 1e-6 to 1e-1 in
    40 steps. Raises lr_finder.LrFindFailed with a hint.
    """
    from elite_core.lr_finder import LR_FIND_DIR, LR_FIND_FILE, LrFindRequest, lr_find_training

    find_dir = config.run_dir / LR_FIND_DIR
    shutil.rmtree(find_dir, ignore_errors=True)
    result = lr_find_training(config, request or LrFindRequest(), find_dir, config.run_dir / "dataset",
                              timeout_s=timeout_s, on_event=on_event)
    result.save(config.run_dir / LR_FIND_FILE)
    # Kept after a failure for its child.log; after a result nothing in it is needed.
    shutil.rmtree(find_dir, ignore_errors=True)
    return result


def run_preflight(config: RunConfig, profile, summary, shape, *, run_step: bool = True) -> Iterator[CheckResult]:
    """The checks in order; the training step runs only when everything before it passed."""
    from elite_core.hardware import save_planning_profile

    results = [check_output_writable(config)]
    if results[-1].ok:
        # the probe and the run plan from the profile these checks plan with, not from the free memory of their start
        save_planning_profile(profile, config.run_dir)
    yield results[-1]
    results.append(check_model_loads(config))
    yield results[-1]
    results.append(check_options_installed(config, profile))
    yield results[-1]
    results.append(check_dataset(config, summary))
    yield results[-1]
    results.append(check_memory(config, profile, shape))
    yield results[-1]
    if run_step:
        if all(result.ok for result in results):
            yield check_training_step(config, profile, shape, summary)
        else:
            yield CheckResult("training steps run", False, "skipped: fix the failures above first")


def all_passed(results: list[CheckResult]) -> bool:
    return bool(results) and all(result.ok for result in results)

